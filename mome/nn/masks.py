"""Dense attention masks and the structure they stand for (causal, key padding), so a fused op can take structure.

Code that builds a dense mask from structure it knows (a model's mask builder, an integration) attaches that
structure to the tensor with :func:`attach_structure`; the attention that receives the tensor reads it back with
:func:`attached_structure` at no cost, instead of reading the values back to the host in every layer. A mask that
carries no structure can be recognised from its values once (:func:`structure_of`: one host sync), and the answer is
attached to it, so the other layers that receive the same tensor find it there.

An attached structure is valid while the tensor is not modified in place (``Tensor._version`` is recorded). What
:func:`attach_structure` records holds for every reader; what a recognition records holds for readers of the same
convention only (a bool mask means "take part" to sdpa and "masked" to ``nn.MultiheadAttention``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

_ATTRIBUTE = "_mome_structure"
SDPA = "sdpa"  # bool True = take part; float 0 = take part, -inf or finfo.min = masked (transformers' eager masks)
MHA = "mha"  # torch.nn.MultiheadAttention's attn_mask: bool True = masked; float added (0 and -inf only are structure)
_KEY_PADDING = "key_padding"  # a float key_padding_mask of nn.MultiheadAttention


class MaskStructure(NamedTuple):
    """What a dense mask means: ``causal`` (bottom-right aligned over its own query and key dims) and keys to ignore."""

    causal: bool = False
    key_padding_mask: Tensor | None = None  # [B or 1, Nk] bool, True = ignore that key


def _version(mask: Tensor) -> int | None:
    try:
        return mask._version
    except RuntimeError:  # an inference tensor has no version counter (and cannot change outside inference mode)
        return None


def attach_structure(mask: Tensor, structure: MaskStructure | None) -> Tensor:
    """Record on ``mask`` that it means ``structure`` (None: it has none, e.g. an additive bias); returns ``mask``."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
    if structure is not None and not isinstance(structure, MaskStructure):
        raise TypeError(f"structure must be a MaskStructure or None, got {type(structure).__name__}")
    setattr(mask, _ATTRIBUTE, (_version(mask), structure, None))
    return mask


def _attach_recognised(mask: Tensor, structure: MaskStructure | None, convention: str) -> None:
    setattr(mask, _ATTRIBUTE, (_version(mask), structure, convention))


def _recorded(mask: Tensor, convention: str) -> tuple[bool, MaskStructure | None]:
    record = getattr(mask, _ATTRIBUTE, None)
    if record is None or record[0] != _version(mask) or record[2] not in (None, convention):
        return False, None
    return True, record[1]


def _is_leading_square_view(mask: Tensor, base: Tensor) -> bool:
    return (
        mask.dim() == 2
        and base.dim() == 2
        and mask.shape[0] == mask.shape[1]
        and mask.storage_offset() == base.storage_offset()
        and mask.stride() == base.stride()
    )


def _is_reshape_view(mask: Tensor, base: Tensor) -> bool:
    return (
        mask.numel() == base.numel()
        and mask.storage_offset() == base.storage_offset()
        and mask.is_contiguous()
        and base.is_contiguous()
        and mask.shape[-2:] == base.shape[-2:]
    )


def attached_structure(mask: Tensor, convention: str = SDPA) -> tuple[bool, MaskStructure | None]:
    """(known, structure) for ``mask``: its attached structure, or that of the mask it is a view of, when the view
    is a reshape of the whole (``(B·H, L, S)`` as ``(B, H, L, S)``) or a leading ``[:L, :L]`` slice of a causal 2-D
    mask (the common ``self.mask[:L, :L]`` of a causal buffer). ``known`` is False when nothing is attached (or the
    tensor changed since, or what is attached was recognised under another ``convention``: ``SDPA`` or ``MHA``)."""
    known, structure = _recorded(mask, convention)
    if known:
        return True, structure
    base = mask._base
    if base is None:
        return False, None
    known, structure = _recorded(base, convention)
    if known and _is_reshape_view(mask, base):
        return True, structure
    plain_causal = structure is not None and structure.causal and structure.key_padding_mask is None
    if known and plain_causal and _is_leading_square_view(mask, base):
        return True, structure
    return False, None


def _visible(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(visible, well-formed) of an sdpa-style mask: bool True = take part, or additive float 0 / -inf or
    ``finfo.min`` (transformers' eager masks). ``well-formed`` is a 0-d bool tensor (no host sync here)."""
    if mask.dtype == torch.bool:
        return mask, torch.ones((), dtype=torch.bool, device=mask.device)
    visible = mask == 0
    ignored = mask <= torch.finfo(mask.dtype).min  # -inf too
    return visible, (visible | ignored).all()


def recognise(mask: Tensor, nq: int, nk: int) -> MaskStructure | None:
    """The structure of an sdpa-style mask broadcastable to ``(B, H, nq, nk)`` (bool True = take part, or additive
    0 / -inf), or None when it is something else (a bias, a per-head or a sliding-window pattern). One host sync."""
    if mask.dim() > 4 or mask.dim() < 2 or mask.shape[-1] != nk or mask.shape[-2] not in (1, nq):
        return None
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    visible, well_formed = _visible(mask)
    same_heads = (visible == visible[:, :1]).all()
    visible = visible[:, 0]  # [B', Nq', Nk]
    keys = visible[:, -1]  # [B', Nk]: the last query sees every key that is not padding, causal or not
    padding_only = (visible == keys[:, None, :]).all()
    rows = visible.shape[1]
    offset = nk - rows  # bottom-right: query i sits at key position i + Nk - Nq
    causal = torch.ones(rows, nk, dtype=torch.bool, device=mask.device).tril(offset)
    causal_padding = (visible == (keys[:, None, :] & causal)).all()
    any_padding = (~keys).any()
    flags = torch.stack([well_formed, same_heads, padding_only, causal_padding, any_padding]).tolist()
    well_formed, same_heads, padding_only, causal_padding, any_padding = flags
    if not (well_formed and same_heads):
        return None
    padding = ~keys if any_padding else None
    if padding_only:
        return MaskStructure(False, padding)
    if causal_padding and rows == nq:
        return MaskStructure(True, padding)
    return None


def structure_of(mask: Tensor, nq: int, nk: int) -> MaskStructure | None:
    """The attached structure of an sdpa-style ``mask``, else :func:`recognise` (one host sync), whose answer is then
    attached so the next layer given the same tensor reads it for free."""
    known, structure = attached_structure(mask, SDPA)
    if known:
        return structure
    structure = recognise(mask, nq, nk)
    _attach_recognised(mask, structure, SDPA)
    return structure


def recognise_mha(mask: Tensor, batch: int, heads: int, nq: int, nk: int) -> MaskStructure | None:
    """The structure of an ``nn.MultiheadAttention`` attn_mask, ``(L, S)`` or ``(B·H, L, S)`` (bool True = masked, or
    float added to the scores, of which only 0 and -inf are structure), or None. One host sync."""
    if mask.dim() == 2 and tuple(mask.shape) == (nq, nk):
        mask = mask[None, None]
    elif mask.dim() == 3 and tuple(mask.shape) == (batch * heads, nq, nk):
        mask = mask.view(batch, heads, nq, nk)
    else:
        return None
    if mask.dtype == torch.bool:
        return recognise(~mask, nq, nk)
    if not mask.is_floating_point():
        return None
    # finfo.min is a large bias here, not a mask (torch adds it): NaN makes recognise refuse what is not 0 / -inf
    structural = (mask == 0) | torch.isneginf(mask)
    return recognise(mask.masked_fill(~structural, float("nan")), nq, nk)


def mha_structure_of(mask: Tensor, batch: int, heads: int, nq: int, nk: int) -> MaskStructure | None:
    """:func:`structure_of` for an ``nn.MultiheadAttention`` attn_mask (:func:`recognise_mha` once per tensor). A
    float mask that requires grad is a learned bias: None without reading it."""
    known, structure = attached_structure(mask, MHA)
    if known:
        return structure
    if mask.requires_grad:
        return None
    structure = recognise_mha(mask, batch, heads, nq, nk)
    _attach_recognised(mask, structure, MHA)
    return structure


def key_padding_of(mask: Tensor) -> Tensor | None:
    """A float ``nn.MultiheadAttention`` key_padding_mask as bool (True = ignore) when it holds only 0 and -inf, else
    None (a bias, added to the scores). Read once per tensor (one host sync), then attached."""
    known, structure = _recorded(mask, _KEY_PADDING)
    if known:
        return None if structure is None else structure.key_padding_mask
    if mask.requires_grad:
        return None
    ignored = torch.isneginf(mask)
    structure = MaskStructure(False, ignored) if bool(((mask == 0) | ignored).all()) else None
    _attach_recognised(mask, structure, _KEY_PADDING)
    return None if structure is None else structure.key_padding_mask
