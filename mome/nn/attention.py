"""Attention modules on ``mome.ops.attention``: a drop-in ``nn.MultiheadAttention`` and the MoME self-attentions."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mome import ops
from mome.nn._heads import merge_heads, split_heads
from mome.nn.masks import MaskStructure, key_padding_of, mha_structure_of
from mome.nn.multiway import MultiwayLayerNorm, MultiwayLinear


class _FusedMasks(NamedTuple):
    """How ``MultiheadAttention``'s masks reach ``mome.ops.attention``."""

    causal: bool = False
    key_padding_mask: Tensor | None = None  # [B or 1, S] bool, True = ignore
    bias: Tensor | None = None  # [1|B, 1|H, L, S] float, added to the scaled scores


def _batched_key_padding(key_padding_mask: Tensor, batched: bool, batch: int, src_len: int) -> Tensor | None:
    """The key_padding_mask as ``(B, S)``, or None when its shape is not the one torch takes (torch says why)."""
    expected = (batch, src_len) if batched else (src_len,)
    if tuple(key_padding_mask.shape) != expected:
        return None
    return key_padding_mask if batched else key_padding_mask.unsqueeze(0)


def _attn_mask_bias(attn_mask: Tensor, dtype: torch.dtype, batch: int, heads: int) -> Tensor:
    """torch's attn_mask as an additive ``(1|B, 1|H, L, S)`` bias (views of a float mask, never a copy)."""
    if attn_mask.dtype == torch.bool:  # True = not allowed, as torch's MHA reads it
        attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(
            attn_mask, float("-inf")
        )
    if attn_mask.dim() == 2:
        return attn_mask[None, None]  # [1, 1, L, S]
    return attn_mask.view(batch, heads, *attn_mask.shape[1:])  # [B·H, L, S] -> [B, H, L, S]


def _mask_dtypes_fit(query_dtype: torch.dtype, *masks: Tensor | None) -> bool:
    """Whether torch's MHA accepts these masks with this query: the float ones add up to the query's dtype or fp32."""
    dtypes = [m.dtype for m in masks if m is not None and m.dtype != torch.bool]
    if any(not dtype.is_floating_point for dtype in dtypes):
        return False
    if not dtypes:
        return True
    merged = dtypes[0]
    for dtype in dtypes[1:]:
        merged = torch.promote_types(merged, dtype)
    return merged in (query_dtype, torch.float32)


def _structure_fits(structure: MaskStructure, batch: int, src_len: int) -> bool:
    padding = structure.key_padding_mask
    return padding is None or (padding.dim() == 2 and padding.shape[0] in (1, batch) and padding.shape[1] == src_len)


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose attention runs on ``mome.ops.attention``.

    Same constructor, parameters, state_dict keys and ``forward`` contract as the parent; load an existing
    state_dict unchanged. With ``need_weights=False`` the fused op runs, with every mask torch takes:

    - as structure (no dense tensor reaches the op) when it is causal and/or key padding: ``is_causal=True`` (the
      parent then ignores the mask's values too), a bool key_padding_mask or a float one of only 0 and ``-inf``, and
      an attn_mask, 2-D ``(L, S)`` or per head ``(B·H, L, S)``, that carries its structure
      (:func:`mome.nn.masks.attach_structure`: no host sync; a reshape of such a mask, or a leading ``[:L, :L]``
      slice of a causal one, counts too) or whose values are exactly that (bool True = masked, or 0 / ``-inf``;
      read once per mask tensor, one host sync, then attached to it);
    - as the op's ``attn_bias`` otherwise: a float attn_mask (a view, never a copy; differentiable, so a learned
      mask gets its gradient and is never read back), a bool one as ``-inf`` where True, a float key_padding_mask
      of other values (added, as torch adds it);
    and attention dropout while training runs fused too (``dropout_p=self.dropout``, 0 in eval; a Philox mask drawn
    from torch's default generator, not torch's dropout mask: training outputs differ from the parent's draw by draw).

    Falls back to the parent's forward for ``need_weights=True``, ``add_bias_kv``, ``add_zero_attn``, ``is_causal``
    with ``L != S`` and no key_padding_mask (sdpa's top-left causal), and masks the parent refuses (it raises in its
    own words). A query whose keys are all masked gets a zero attention output (then ``out_proj``), as the parent
    gives with ``need_weights=False``; the parent's ``need_weights=True`` path gives NaN there.
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
        self, key_padding_mask, need_weights, attn_mask, is_causal, dtype, batched, batch, tgt_len, src_len
    ) -> _FusedMasks | None:
        """How the masks run on the op, or None for the parent's forward."""
        if need_weights or self.bias_k is not None or self.add_zero_attn:
            return None
        if attn_mask is None and is_causal:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")  # the parent's message
        if not _mask_dtypes_fit(dtype, key_padding_mask, attn_mask):
            return None  # the parent raises (or warns) in its own words
        padding = bias = None
        if key_padding_mask is not None:
            key_padding_mask = _batched_key_padding(key_padding_mask, batched, batch, src_len)
            if key_padding_mask is None:
                return None
            padding = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_of(key_padding_mask)
            if padding is None:  # a float mask that is not only 0 / -inf: torch adds it to the scores
                bias = key_padding_mask[:, None, None, :].expand(batch, 1, tgt_len, src_len)
        if attn_mask is None:
            return _FusedMasks(False, padding, bias)
        if attn_mask.shape not in ((tgt_len, src_len), (batch * self.num_heads, tgt_len, src_len)):
            return None
        if is_causal and key_padding_mask is None:
            # the parent trusts the hint and drops the mask; its causal is sdpa's, top-left aligned when L != S
            return _FusedMasks(True) if tgt_len == src_len else None
        structure = mha_structure_of(attn_mask, batch, self.num_heads, tgt_len, src_len)
        if structure is not None and _structure_fits(structure, batch, src_len):
            extra = structure.key_padding_mask
            if extra is not None:
                padding = extra.expand(batch, src_len) if padding is None else padding | extra
            return _FusedMasks(structure.causal, padding, bias)
        mask_bias = _attn_mask_bias(attn_mask, dtype, batch, self.num_heads)
        return _FusedMasks(False, padding, mask_bias if bias is None else mask_bias + bias)

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
        batch = query.shape[1 - seq_dim] if batched else 1
        masks = None
        if query.dim() in (2, 3):
            masks = self._fused_masks(
                key_padding_mask, need_weights, attn_mask, is_causal, query.dtype, batched, batch, tgt_len, src_len
            )
        if masks is None:
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
        elif not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        w_q, w_k, w_v, b_q, b_k, b_v = self._projections()
        heads, head_dim = self.num_heads, self.head_dim
        q = F.linear(query, w_q, b_q).reshape(batch, tgt_len, heads, head_dim).transpose(1, 2)  # [B, H, L, Dh]
        k = F.linear(key, w_k, b_k).reshape(batch, src_len, heads, head_dim).transpose(1, 2)  # [B, H, S, Dh]
        v = F.linear(value, w_v, b_v).reshape(batch, src_len, heads, head_dim).transpose(1, 2)
        out = ops.attention(
            q,
            k,
            v,
            causal=masks.causal,
            key_padding_mask=masks.key_padding_mask,
            attn_bias=masks.bias,
            dropout_p=self.dropout if self.training else 0.0,
        )  # [B, H, L, Dh]
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


def _check_dropout(dropout: float) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout (attention dropout probability) must be a float in [0, 1], got {dropout!r}")
    return float(dropout)


class SharedSelfAttention(nn.Module):
    """VLMo's self-attention, one set of weights for all modalities: a single qkv projection with a
    q and a v bias but no k bias (BEiT style), softmax attention, output projection.

    ``dropout``: attention dropout on the probabilities, applied only in training."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.dim, self.heads, self.dropout = dim, heads, _check_dropout(dropout)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, attn_bias: Tensor | None = None) -> Tensor:
        """x ``(B, N, D)``; key_padding_mask ``(B, N)`` bool, True = pad; attn_bias broadcastable as
        ``(B, H, N, N)`` (e.g. a relative position bias), added to the scaled scores."""
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)  # 3 x [B, N, D]
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        out = ops.attention(q, k, v, key_padding_mask=key_padding_mask, attn_bias=attn_bias, dropout_p=dropout_p)
        return self.proj(merge_heads(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, qkv_bias={self.q_bias is not None}, dropout={self.dropout}"


class MultiwaySelfAttention(nn.Module):
    """torchscale / BEiT-3 self-attention: q, k, v and out projections and the sub-LayerNorm before
    out_proj are per-modality experts; only the softmax attention is shared by all tokens.

    ``dropout``: attention dropout on the probabilities, applied only in training."""

    def __init__(
        self, dim: int, heads: int, num_experts: int = 2, subln: bool = True, eps: float = 1e-5, dropout: float = 0.0
    ):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.dim, self.heads, self.dropout = dim, heads, _check_dropout(dropout)
        self.q_proj = MultiwayLinear(dim, dim, num_experts)
        self.k_proj = MultiwayLinear(dim, dim, num_experts)
        self.v_proj = MultiwayLinear(dim, dim, num_experts)
        self.inner_attn_ln = MultiwayLayerNorm(dim, num_experts, eps) if subln else None
        self.out_proj = MultiwayLinear(dim, dim, num_experts)

    def forward(
        self, x: Tensor, modality: Tensor, key_padding_mask: Tensor | None = None, attn_bias: Tensor | None = None
    ) -> Tensor:
        """x ``(B, N, D)``; modality ``(B, N)`` ids; key_padding_mask ``(B, N)`` bool, True = pad; attn_bias
        broadcastable as ``(B, H, N, N)``, added to the scaled scores."""
        q, k, v = (split_heads(proj(x, modality), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        dropout_p = self.dropout if self.training else 0.0
        out = ops.attention(q, k, v, key_padding_mask=key_padding_mask, attn_bias=attn_bias, dropout_p=dropout_p)
        out = merge_heads(out)
        if self.inner_attn_ln is not None:
            out = self.inner_attn_ln(out, modality)
        return self.out_proj(out, modality)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, dropout={self.dropout}"
