"""Attention modules on ``mome.ops.attention``: a drop-in ``nn.MultiheadAttention`` and the MoME self-attentions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mome import ops
from mome.nn.masks import attached_structure
from mome.nn.multiway import MultiwayLayerNorm, MultiwayLinear


def _as_padding_bool(key_padding_mask: Tensor | None) -> tuple[bool, Tensor | None]:
    """(expressible, bool mask True = ignore). A float mask is expressible when it holds only 0 and -inf."""
    if key_padding_mask is None or key_padding_mask.dtype == torch.bool:
        return True, key_padding_mask
    if not key_padding_mask.is_floating_point():
        return False, None
    ignored = torch.isneginf(key_padding_mask)
    if bool(((key_padding_mask == 0) | ignored).all()):
        return True, ignored
    return False, None


def _is_causal_pattern(attn_mask: Tensor, length: int) -> bool:
    """Whether a ``(L, L)`` mask (bool True = masked, or float 0 / -inf) is exactly the causal mask."""
    if attn_mask.dim() != 2 or tuple(attn_mask.shape) != (length, length):
        return False
    future = torch.ones(length, length, dtype=torch.bool, device=attn_mask.device).triu(1)
    if attn_mask.dtype == torch.bool:
        return bool(torch.equal(attn_mask, future))
    if not attn_mask.is_floating_point():
        return False
    return bool(torch.equal(torch.isneginf(attn_mask), future) and (attn_mask[~future] == 0).all())


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose attention runs on ``mome.ops.attention``.

    Same constructor, parameters, state_dict keys and ``forward`` contract as the parent; load an
    existing state_dict unchanged. The fused op runs when ``need_weights=False`` and the masks are
    structure it expresses: no attn_mask, or the causal mask (``is_causal=True``, or an ``(L, L)`` bool /
    0-and-``-inf`` float mask equal to it, with query and key lengths equal), and a bool key_padding_mask
    (or a float one holding only 0 and ``-inf``), or any attn_mask (2-D or the 3-D ``(B·H, L, S)``) that carries its
    structure (:func:`mome.nn.masks.attach_structure`, read without a host sync; a leading ``[:L, :L]`` slice of a
    causal mask that carries it counts too). Everything else falls back to the parent's forward:
    ``need_weights=True``, any other attn_mask (arbitrary float biases, 3-D per-head masks), attention
    dropout while training, ``add_bias_kv`` and ``add_zero_attn``. A query whose keys are all masked gets a
    zero attention output (then ``out_proj``), as the parent gives with ``need_weights=False``; the parent's
    ``need_weights=True`` path, which mome leaves to the parent, gives NaN there.
    """

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> MultiheadAttention:
        """A copy of ``module`` (same configuration, weights, device, dtype and train/eval mode)."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        weight = module.out_proj.weight
        new = cls(
            module.embed_dim,
            module.num_heads,
            dropout=module.dropout,
            bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn,
            kdim=module.kdim,
            vdim=module.vdim,
            batch_first=module.batch_first,
            device=weight.device,
            dtype=weight.dtype,
        )
        new.load_state_dict(module.state_dict())
        return new.train(module.training)

    def _fused_masks(
        self, key_padding_mask, need_weights, attn_mask, is_causal, tgt_len, src_len
    ) -> tuple[bool, bool, Tensor | None]:
        """(use the op, causal, bool key padding)."""
        if need_weights or self.bias_k is not None or self.add_zero_attn or (self.training and self.dropout > 0):
            return False, False, None
        expressible, padding = _as_padding_bool(key_padding_mask)
        if not expressible:
            return False, False, None
        if attn_mask is None:
            if is_causal:
                raise RuntimeError("Need attn_mask if specifying the is_causal hint")  # the parent's message
            return True, False, padding
        known, structure = attached_structure(attn_mask)
        if known and structure is not None and (tgt_len == src_len or not structure.causal):
            extra = structure.key_padding_mask
            if extra is not None:
                padding = extra if padding is None else padding | extra
            return True, structure.causal, padding
        if tgt_len != src_len:
            return False, False, None
        if is_causal and key_padding_mask is None:
            return True, True, padding  # the parent also trusts the hint and ignores the mask's values here
        if _is_causal_pattern(attn_mask, tgt_len):
            return True, True, padding
        return False, False, None

    def _projections(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        return w_q, w_k, w_v, b_q, b_k, b_v

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        seq_dim = 1 if (self.batch_first and batched) else 0
        tgt_len, src_len = query.shape[seq_dim], key.shape[seq_dim]
        fused, causal, padding = self._fused_masks(
            key_padding_mask, need_weights, attn_mask, is_causal, tgt_len, src_len
        )
        if not fused or query.dim() not in (2, 3):
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            padding = None if padding is None else padding.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch = query.shape[0]
        if padding is not None and padding.shape[0] != batch:  # a structure's (1, S) padding, shared by the batch
            padding = padding.expand(batch, src_len)
        w_q, w_k, w_v, b_q, b_k, b_v = self._projections()
        heads, head_dim = self.num_heads, self.head_dim
        q = F.linear(query, w_q, b_q).reshape(batch, tgt_len, heads, head_dim).transpose(1, 2)  # [B, H, L, Dh]
        k = F.linear(key, w_k, b_k).reshape(batch, src_len, heads, head_dim).transpose(1, 2)  # [B, H, S, Dh]
        v = F.linear(value, w_v, b_v).reshape(batch, src_len, heads, head_dim).transpose(1, 2)
        out = ops.attention(q, k, v, causal=causal, key_padding_mask=padding)  # [B, H, L, Dh]
        out = out.transpose(1, 2).reshape(batch, tgt_len, self.embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def replace_attention(model: nn.Module) -> int:
    """Swap every ``torch.nn.MultiheadAttention`` inside ``model`` for mome's, in place (weights kept).

    Returns how many were swapped. Note that ``nn.TransformerEncoderLayer``'s eval-mode fast path calls
    torch's fused kernel directly, bypassing any attention module: it runs ours in training mode, with
    gradients enabled, or with the fast path off (``torch.backends.mha.set_fastpath_enabled(False)``).
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention) and not isinstance(child, MultiheadAttention):
                setattr(parent, name, MultiheadAttention.from_torch(child))
                swapped += 1
    return swapped


def _split_heads(x: Tensor, heads: int) -> Tensor:
    batch, seq, dim = x.shape
    return x.reshape(batch, seq, heads, dim // heads).transpose(1, 2)  # [B, H, N, Dh]


def _merge_heads(x: Tensor) -> Tensor:
    batch, heads, seq, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq, heads * head_dim)  # [B, N, D]


class SharedSelfAttention(nn.Module):
    """VLMo's self-attention, one set of weights for all modalities: a single qkv projection with a
    q and a v bias but no k bias (BEiT style), softmax attention, output projection."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.dim, self.heads = dim, heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """x ``(B, N, D)``; key_padding_mask ``(B, N)`` bool, True = pad."""
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)  # 3 x [B, N, D]
        q, k, v = (_split_heads(t, self.heads) for t in (q, k, v))
        out = ops.attention(q, k, v, key_padding_mask=key_padding_mask)
        return self.proj(_merge_heads(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, qkv_bias={self.q_bias is not None}"


class MultiwaySelfAttention(nn.Module):
    """torchscale / BEiT-3 self-attention: q, k, v and out projections and the sub-LayerNorm before
    out_proj are per-modality experts; only the softmax attention is shared by all tokens."""

    def __init__(self, dim: int, heads: int, num_experts: int = 2, subln: bool = True, eps: float = 1e-5):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.dim, self.heads = dim, heads
        self.q_proj = MultiwayLinear(dim, dim, num_experts)
        self.k_proj = MultiwayLinear(dim, dim, num_experts)
        self.v_proj = MultiwayLinear(dim, dim, num_experts)
        self.inner_attn_ln = MultiwayLayerNorm(dim, num_experts, eps) if subln else None
        self.out_proj = MultiwayLinear(dim, dim, num_experts)

    def forward(self, x: Tensor, modality: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """x ``(B, N, D)``; modality ``(B, N)`` ids; key_padding_mask ``(B, N)`` bool, True = pad."""
        q, k, v = (_split_heads(proj(x, modality), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = _merge_heads(ops.attention(q, k, v, key_padding_mask=key_padding_mask))
        if self.inner_attn_ln is not None:
            out = self.inner_attn_ln(out, modality)
        return self.out_proj(out, modality)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}"
