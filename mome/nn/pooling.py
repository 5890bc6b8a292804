"""``AttentionalPooler``: learned queries cross-attending to a sequence of tokens (CoCa's attentional pooling)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mome.nn.attention import MultiheadAttention


class AttentionalPooler(nn.Module):
    """``queries`` learned vectors attend to the tokens ``(B, M, context_dim)`` and give ``(B, queries, dim)``.

    CoCa pools its image encoder this way: one query for the contrastive embedding, 256 for the captioning
    decoder's cross-attention. Both sides are layer-normed first (``ln_q`` on the queries, ``ln_k`` on the
    tokens), then one multi-head attention (:class:`mome.nn.MultiheadAttention`, so it runs on
    ``mome.ops.attention``) with the normed tokens as keys and values. The parameter names are those of
    open_clip's ``AttentionalPooler`` (``query``, ``ln_q``, ``ln_k``, ``attn.*``): its state_dict loads unchanged.

    Equivalent PyTorch::

        mha = nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        tokens = ln_k(tokens)
        out = mha(ln_q(query).expand(B, -1, -1), tokens, tokens, key_padding_mask, need_weights=False)[0]
    """

    def __init__(
        self, dim: int, context_dim: int | None = None, heads: int = 8, queries: int = 256, eps: float = 1e-5
    ) -> None:
        super().__init__()
        context_dim = dim if context_dim is None else context_dim
        for name, value in (("dim", dim), ("context_dim", context_dim), ("heads", heads), ("queries", queries)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.dim, self.context_dim, self.heads, self.queries = dim, context_dim, heads, queries
        self.query = nn.Parameter(torch.empty(queries, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn = MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=eps)
        self.ln_k = nn.LayerNorm(context_dim, eps=eps)

    def forward(self, tokens: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``tokens`` ``(B, M, context_dim)``; ``key_padding_mask`` ``(B, M)`` bool, True = ignore that token.

        A row whose tokens are all ignored pools to ``attn.out_proj.bias`` (zero attention output)."""
        self._check(tokens, key_padding_mask)
        keys = self.ln_k(tokens)  # [B, M, Dc]
        queries = self.ln_q(self.query).to(keys.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)  # [B, Q, D]
        pooled, _ = self.attn(queries, keys, keys, key_padding_mask=key_padding_mask, need_weights=False)
        return pooled  # [B, Q, D]

    def _check(self, tokens: Tensor, key_padding_mask: Tensor | None) -> None:
        if not isinstance(tokens, Tensor) or not tokens.is_floating_point() or tokens.dim() != 3:
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, Tensor) else type(tokens).__name__
            raise TypeError(f"tokens must be a float tensor (B, M, context_dim={self.context_dim}), got {got}")
        if tokens.shape[-1] != self.context_dim or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be (B, M >= 1, context_dim={self.context_dim}), got {tuple(tokens.shape)}")
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
                got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(key_padding_mask)
                raise TypeError(f"key_padding_mask must be a bool tensor (True = ignore), got {got}")
            if key_padding_mask.shape != tokens.shape[:2]:
                raise ValueError(
                    f"key_padding_mask must be (B, M) = {tuple(tokens.shape[:2])}, got {tuple(key_padding_mask.shape)}"
                )
            if key_padding_mask.device != tokens.device:
                raise ValueError(f"key_padding_mask must be on tokens' device {tokens.device}, got "
                                 f"{key_padding_mask.device}")  # fmt: skip

    def extra_repr(self) -> str:
        return f"dim={self.dim}, context_dim={self.context_dim}, heads={self.heads}, queries={self.queries}"
