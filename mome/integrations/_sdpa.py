"""``F.scaled_dot_product_attention``'s arguments onto ``mome.ops.attention``, or the reason they do not map.

:class:`SdpaOnMome` routes the sdpa calls made inside a block to it (a ``TorchFunctionMode``: the library's own
forward runs unchanged, RoPE, norms and gates included, and only its sdpa call changes), falling back to the real
sdpa with the reason tallied. Masks map as structure where they are causal and/or key padding: an attached one
(:mod:`mome.nn.masks`), else recognised from the values once per mask tensor. Any other mask runs as the op's
``attn_bias`` (a float mask as it is, a bool one as ``-inf`` where False); a float mask that requires grad (a
learned bias: BEiT's relative position bias) is a bias without being read. ``dropout_p`` maps onto the op's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from mome import ops
from mome.integrations._tally import Tally
from mome.nn.masks import MaskStructure, attached_structure, structure_of


def _padding_for(structure_padding: Tensor | None, batch: int, nk: int) -> Tensor | None | str:
    if structure_padding is None:
        return None
    if structure_padding.shape[0] not in (1, batch):
        return f"a key padding mask for batch {structure_padding.shape[0]}, attention batch {batch}"
    return structure_padding.expand(batch, nk)


def _bias_of(attn_mask: Tensor, query: Tensor, nk: int) -> Tensor:
    """sdpa's attn_mask (broadcastable to ``(B, H, Nq, Nk)``) as the op's ``(1|B, 1|H, Nq, Nk)`` bias."""
    nq = query.shape[2]
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if mask.dtype == torch.bool:  # sdpa's bool: True = take part
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.expand(mask.shape[0], mask.shape[1], nq, nk)  # a query or key dim of 1 broadcast (a view)


def _bias_reason(mask: Tensor, name: str, query: Tensor, nk: int) -> str | None:
    """Why a bool or float ``mask`` does not broadcast to ``(B, H, Nq, Nk)`` as sdpa takes it, or None when it does."""
    batch, heads, nq, _ = query.shape
    if not isinstance(mask, Tensor) or not (mask.dtype == torch.bool or mask.is_floating_point()):
        what = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        return f"{name} of {what} (not a bool or float tensor)"
    if mask.dtype != torch.bool and mask.dtype not in (torch.float32, query.dtype):
        return f"{name} of dtype {mask.dtype} with q of dtype {query.dtype}"  # sdpa refuses it too
    if not 2 <= mask.dim() <= 4 or mask.shape[-2] not in (1, nq) or mask.shape[-1] not in (1, nk):
        return f"{name} of shape {tuple(mask.shape)} for {nq} queries and {nk} keys"
    leading = (1,) * (4 - mask.dim()) + tuple(mask.shape[:-2])
    if leading[0] not in (1, batch) or leading[1] not in (1, heads):
        return f"{name} of shape {tuple(mask.shape)} that does not broadcast to ({batch}, {heads}, ...)"
    if name == "position_bias" and mask.dtype == torch.bool:
        return "a bool position_bias (a bias is a float tensor)"
    return None


def _masks_of(attn_mask: Tensor, query: Tensor, nk: int) -> tuple[MaskStructure, Tensor | None] | str:
    """(structure, bias) of sdpa's attn_mask, or why it does not map."""
    batch, _, nq, _ = query.shape
    why = _bias_reason(attn_mask, "attn_mask", query, nk)
    if why is not None:
        return why
    known, structure = attached_structure(attn_mask)
    if not known and not attn_mask.requires_grad:
        structure = structure_of(attn_mask, nq, nk)
    if structure is None:
        return MaskStructure(), _bias_of(attn_mask, query, nk)
    padding = _padding_for(structure.key_padding_mask, batch, nk)
    return padding if isinstance(padding, str) else (MaskStructure(structure.causal, padding), None)


def attention_like_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    position_bias: Tensor | None = None,
) -> Tensor | str:
    """What ``F.scaled_dot_product_attention`` returns, computed by ``mome.ops.attention``; or why it cannot be.

    ``position_bias`` (not an sdpa argument: transformers' T5-style models pass one beside the mask) is a float
    ``(1|B, 1|H, Nq, Nk)`` bias added to the scores on top of ``attn_mask``."""
    if not all(isinstance(t, Tensor) and t.dim() == 4 for t in (query, key, value)):
        return "inputs that are not (batch, heads, seq, head_dim) tensors"
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p <= 1:
        return f"a dropout_p of {dropout_p!r} (not a number in [0, 1])"
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        return "a value head dim different from the query's"
    if not (query.dtype == key.dtype == value.dtype):
        return "q, k and v of different dtypes"
    batch, heads, nq, _ = query.shape
    if key.shape[0] != batch or value.shape[0] != batch:
        return "q and k/v of different batch sizes (broadcast batch)"
    kv_heads, nk = key.shape[1], key.shape[2]
    if kv_heads != heads and not (enable_gqa and heads % kv_heads == 0):
        return "k/v heads that do not match q's heads"
    structure, bias = MaskStructure(), None
    if is_causal:
        if attn_mask is not None:
            return "attn_mask together with is_causal"
        if nq != nk:
            return "is_causal with query and key lengths that differ (sdpa aligns it top-left)"
        structure = MaskStructure(causal=True)
    elif attn_mask is not None:
        masks = _masks_of(attn_mask, query, nk)
        if isinstance(masks, str):
            return masks
        structure, bias = masks
    if position_bias is not None:
        why = _bias_reason(position_bias, "position_bias", query, nk)
        if why is not None:
            return why
        extra = _bias_of(position_bias, query, nk)
        bias = extra if bias is None else bias + extra
    return ops.attention(
        query,
        key,
        value,
        causal=structure.causal,
        key_padding_mask=structure.key_padding_mask,
        attn_bias=bias,
        dropout_p=float(dropout_p),
        scale=scale,
    )


class SdpaOnMome(TorchFunctionMode):
    """Inside ``with SdpaOnMome(tally):``, ``F.scaled_dot_product_attention`` runs on mome where it maps."""

    def __init__(self, tally: Tally):
        super().__init__()
        self.tally = tally

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        out = attention_like_sdpa(*args, **kwargs)
        if isinstance(out, str):
            self.tally.fell_back(out)
            return func(*args, **kwargs)
        self.tally.ran()
        return out
