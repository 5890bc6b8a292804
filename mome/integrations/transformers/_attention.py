"""The ``"mome"`` attention and mask functions for transformers' ``AttentionInterface`` / ``AttentionMaskInterface``.

The mask function builds the same boolean mask as ``"sdpa"`` (so every fallback gets what it expects) and, when
it knows the pattern (plain causal or bidirectional, with padding from the 2-D mask), attaches it as structure:
the attention function then reads the structure without looking at the values. Masks that arrive without one (a
model's own 4-D mask, a user's) are recognised once per tensor (one host sync per forward, not per layer).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from mome.integrations._sdpa import attention_like_sdpa
from mome.integrations._tally import Tally
from mome.nn.masks import MaskStructure, attach_structure

TALLY = Tally("transformers")


def _weights_requested(kwargs: dict) -> bool:
    if kwargs.get("output_attentions"):
        return True
    try:  # transformers >= 5 records attention weights with hooks, requested through this context variable
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return bool(collected) and ("attentions" in collected or "cross_attentions" in collected)


def _reason_to_fall_back(attention_mask, kwargs: dict) -> str | None:
    if _weights_requested(kwargs):
        return "output_attentions (only eager returns attention weights)"
    for name, what in (("softcap", "logit soft-capping"), ("s_aux", "attention sinks")):
        if kwargs.get(name) is not None:
            return f"{name} ({what})"
    if attention_mask is not None and not isinstance(attention_mask, Tensor):
        return f"an attention_mask of type {type(attention_mask).__name__} (not a tensor)"
    return None


def _broadcast_batch(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Learned queries of batch 1 against a batch of keys (BLIP-2's Q-Former), or the reverse: expand the one."""
    if query.shape[0] == key.shape[0]:
        return query, key, value
    if query.shape[0] == 1:
        return query.expand(key.shape[0], -1, -1, -1), key, value
    if key.shape[0] == 1:
        return query, key.expand(query.shape[0], -1, -1, -1), value.expand(query.shape[0], -1, -1, -1)
    return query, key, value


def _fused(module, query, key, value, attention_mask, dropout, scaling, is_causal, position_bias) -> Tensor | str:
    query, key, value = _broadcast_batch(query, key, value)
    common = dict(dropout_p=dropout, scale=scaling, enable_gqa=True)
    if attention_mask is not None:  # the mask holds causality when there is one, as for sdpa
        return attention_like_sdpa(query, key, value, attn_mask=attention_mask, position_bias=position_bias, **common)
    causal = (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and query.shape[2] > 1
    if causal and key.shape[2] > query.shape[2]:  # sdpa's top-left causal (an empty static cache's prefill)
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
        if position_bias is not None:
            position_bias = position_bias[..., : query.shape[2]]
    return attention_like_sdpa(query, key, value, is_causal=causal, position_bias=position_bias, **common)


def _eager(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    """The eager function of the module's own modeling file (the one that returns weights), with an additive mask."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    nq, nk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and nq > 1:
        attention_mask = torch.ones(nq, nk, dtype=torch.bool, device=query.device).tril(nk - nq)[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        minimum = torch.finfo(query.dtype).min
        attention_mask = torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(~attention_mask, minimum)
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def mome_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """An ``AttentionInterface`` function: q ``(B, H, Nq, D)``, k/v ``(B, Hkv, Nk, D)`` -> ``((B, Nq, H, D), None)``.

    Runs ``mome.ops.attention`` with the mask as structure (or as a bias when it is neither causal nor padding), a
    ``position_bias`` (T5) as a bias, and the module's attention dropout; falls back (reason tallied and logged once)
    to the modeling file's eager function when weights are requested or for softcap / sinks, and to sdpa otherwise."""
    reason = _reason_to_fall_back(attention_mask, kwargs)
    if reason is None:
        out = _fused(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs.get("position_bias")
        )
        if not isinstance(out, str):
            TALLY.ran()
            return out.transpose(1, 2).contiguous(), None
        reason = out
    TALLY.fell_back(reason)
    if reason.startswith(("output_attentions", "softcap", "s_aux")):
        return _eager(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)


def _known_structure(mask_function, q_length, kv_length, q_offset, kv_offset, attention_mask) -> MaskStructure | None:
    """The structure of the mask sdpa_mask builds from these arguments, when the pattern is one mome has."""
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int)):
        return None  # a static cache's tensor offsets: the mask covers unfilled slots; recognised from values instead
    if mask_function is causal_mask_function:
        if q_offset - kv_offset != kv_length - q_length:
            return None  # not mome's bottom-right alignment
        causal = True
    elif mask_function is bidirectional_mask_function:
        causal = False
    else:
        return None
    keep = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    padding = None if keep is None else ~keep[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    return MaskStructure(causal, padding)


def mome_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> Tensor | None:
    """An ``AttentionMaskInterface`` function: sdpa's boolean mask (or None), carrying its structure when known."""
    mask = sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        **kwargs,
    )
    if mask is not None:
        structure = _known_structure(mask_function, q_length, kv_length, q_offset, kv_offset, attention_mask)
        if structure is not None:
            attach_structure(mask, structure)
    return mask
