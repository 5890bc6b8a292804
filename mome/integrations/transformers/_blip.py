"""BLIP's attentions on ``mome.ops.attention``: ``BlipAttention`` (vision) and ``BlipTextSelfAttention`` (text
self-attention, cross-attention to the image tokens, and cached keys/values one query at a time in ``generate``).

Both hard-code matmul + softmax and ignore ``attn_implementation``. ``BlipTextModel.forward`` is wrapped to hand
its layers the structure of their masks, taken from its own arguments (the 2-D padding masks and ``is_decoder``),
so no layer reads a dense mask back to the host.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math

import torch
from torch import Tensor, nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextModel, BlipTextSelfAttention

from mome import ops
from mome.integrations.transformers._attention import TALLY, _weights_requested
from mome.nn.masks import MaskStructure, structure_of

_ORIGINAL = {cls: cls.forward for cls in (BlipAttention, BlipTextSelfAttention, BlipTextModel)}
_TEXT_SIGNATURE = inspect.signature(BlipTextModel.forward)
# {"self": structure, "cross": structure} of the BlipTextModel call in progress
_STRUCTURES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("mome_blip_structures", default=None)


def _fallback_reason() -> str | None:
    if _weights_requested({}):
        return "output_attentions (BLIP's own attention returns the weights)"
    return None


def _dropout_p(module: nn.Module) -> float:
    return module.dropout.p if module.training else 0.0  # BLIP's nn.Dropout on the attention probabilities


def _vision_forward(self: BlipAttention, hidden_states: Tensor, **kwargs):
    reason = _fallback_reason()
    if reason is not None:
        TALLY.fell_back(reason)
        return _ORIGINAL[BlipAttention](self, hidden_states, **kwargs)
    batch, tokens, dim = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    out = ops.attention(*qkv.unbind(0), scale=self.scale, dropout_p=_dropout_p(self))  # [B, H, N, Dh]
    TALLY.ran()
    return self.projection(out.transpose(1, 2).reshape(batch, tokens, dim)), None


def _as_structure(mask: Tensor | None, causal: bool) -> MaskStructure | None:
    """The structure of a 2-D keep-mask (1 = attend), None for a mask of another form."""
    if mask is None:
        return MaskStructure(causal, None)
    if mask.dim() != 2:
        return None
    return MaskStructure(causal, mask == 0)


def _text_model_forward(self: BlipTextModel, *args, **kwargs):
    bound = _TEXT_SIGNATURE.bind(self, *args, **kwargs).arguments
    structures = {
        "self": _as_structure(bound.get("attention_mask"), bool(bound.get("is_decoder", False))),
        "cross": _as_structure(bound.get("encoder_attention_mask"), False),
    }
    token = _STRUCTURES.set(structures)
    try:
        return _ORIGINAL[BlipTextModel](self, *args, **kwargs)
    finally:
        _STRUCTURES.reset(token)


def _mask_structure(mask: Tensor | None, cross: bool, batch: int, nq: int) -> MaskStructure | None:
    if mask is None:
        return MaskStructure()
    nk = mask.shape[-1]
    handed = (_STRUCTURES.get() or {}).get("cross" if cross else "self")
    if handed is not None and (handed.key_padding_mask is None or handed.key_padding_mask.shape == (batch, nk)):
        return handed
    return structure_of(mask, nq, nk)  # not called through BlipTextModel: read the dense mask (once per tensor)


def _as_bias(mask: Tensor, dtype: torch.dtype, batch: int, heads: int, nq: int) -> Tensor | None:
    """BLIP's additive mask (added to the scores, as the op adds attn_bias) as ``(1|B, 1|H, Nq, Nk)``, or None."""
    if mask.dtype not in (dtype, torch.float32) or not 2 <= mask.dim() <= 4 or mask.shape[-2] not in (1, nq):
        return None
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads):
        return None
    return mask.expand(mask.shape[0], mask.shape[1], nq, mask.shape[-1])


def _keys_values(self: BlipTextSelfAttention, current_states: Tensor, cross: bool, cache, kwargs):
    """BLIP's own key/value path: project, or reuse a filled cross-attention cache, or append to the cache."""
    layer_cache, reuse = cache, False
    if isinstance(cache, EncoderDecoderCache):
        reuse = cross and cache.is_updated.get(self.layer_idx)
        layer_cache = cache.cross_attention_cache if cross else cache.self_attention_cache
    if reuse:
        return layer_cache.layers[self.layer_idx].keys, layer_cache.layers[self.layer_idx].values
    shape = (*current_states.shape[:-1], -1, self.attention_head_size)
    key = self.key(current_states).view(shape).transpose(1, 2)
    value = self.value(current_states).view(shape).transpose(1, 2)
    if cache is not None:
        key, value = layer_cache.update(key, value, self.layer_idx, kwargs=kwargs)
        if cross and isinstance(cache, EncoderDecoderCache):
            cache.is_updated[self.layer_idx] = True
    return key, value


def _text_forward(
    self: BlipTextSelfAttention,
    hidden_states: Tensor,
    attention_mask: Tensor | None = None,
    encoder_hidden_states: Tensor | None = None,
    encoder_attention_mask: Tensor | None = None,
    cache=None,
    **kwargs,
):
    cross = encoder_hidden_states is not None
    mask = encoder_attention_mask if cross else attention_mask
    batch, nq = hidden_states.shape[:2]
    reason = _fallback_reason()
    structure = _mask_structure(mask, cross, batch, nq) if reason is None else None
    bias = None
    if reason is None and structure is None:
        bias = _as_bias(mask, hidden_states.dtype, batch, self.num_attention_heads, nq)
        structure = MaskStructure()
        if bias is None:
            reason = f"a mask of shape {tuple(mask.shape)} and dtype {mask.dtype} (neither structure nor a bias)"
    if reason is not None:  # decided before the cache is touched: the original updates it itself
        TALLY.fell_back(reason)
        return _ORIGINAL[BlipTextSelfAttention](
            self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, cache=cache, **kwargs
        )
    query = self.query(hidden_states).view(batch, nq, -1, self.attention_head_size).transpose(1, 2)
    key, value = _keys_values(self, encoder_hidden_states if cross else hidden_states, cross, cache, kwargs)
    padding = structure.key_padding_mask
    scale = 1.0 / math.sqrt(self.attention_head_size)
    out = ops.attention(
        query,
        key,
        value,
        causal=structure.causal,
        key_padding_mask=padding,
        attn_bias=bias,
        dropout_p=_dropout_p(self),
        scale=scale,
    )
    TALLY.ran()
    return out.transpose(1, 2).reshape(batch, nq, self.all_head_size), None


_FORWARDS = {BlipAttention: _vision_forward, BlipTextSelfAttention: _text_forward, BlipTextModel: _text_model_forward}
_SUBCLASSES: dict[type, type] = {}


def _subclass(cls: type) -> type:
    if cls not in _SUBCLASSES:
        forward = functools.wraps(_ORIGINAL[cls])(_FORWARDS[cls])
        _SUBCLASSES[cls] = type(f"Mome{cls.__name__}", (cls,), {"forward": forward})
    return _SUBCLASSES[cls]


def apply_mome_to_blip(model: nn.Module | None = None, *, attention: bool = True) -> nn.Module | None:
    """Run BLIP's attentions on mome: in ``model`` (its modules' classes swapped, weights and state_dict unchanged),
    or, with ``model=None``, in every BLIP model (transformers' BLIP classes patched). Returns ``model``.

    Attention dropout while training runs fused; a text mask that is not structure runs as the op's ``attn_bias``.
    Falls back to BLIP's own code (reason tallied in ``TALLY`` and logged once) when attention weights are
    requested."""
    if not attention:
        return model
    if model is None:
        for cls in _FORWARDS:
            cls.forward = functools.wraps(_ORIGINAL[cls])(_FORWARDS[cls])
        return None
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    for module in model.modules():
        cls = type(module)
        if cls in _FORWARDS:
            module.__class__ = _subclass(cls)
    return model
