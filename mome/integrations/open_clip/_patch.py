"""``patch(model)``: an open_clip model's attentions on mome, its masks handed over as structure.

- every ``nn.MultiheadAttention`` (vision and text towers, CoCa's attentional pooler, the multimodal decoder's
  self- and cross-attention) becomes ``mome.nn.MultiheadAttention`` (``replace_attention``, weights kept);
- the text towers' masks carry their structure: the causal buffer (checked once per buffer tensor), and the
  ``(B·H, L, L)`` causal + padding (+ CLS) mask of CoCa's text tower, whose padding comes from the token ids as
  the tower builds it; so no layer reads a mask back to the host;
- open_clip's own ``Attention`` (custom blocks) runs its sdpa call on mome
  (:class:`~mome.integrations._sdpa.SdpaOnMome`; scaled-cosine attention stays as it is);
- a timm vision trunk goes through :func:`mome.integrations.timm.patch`;
- a CoCa's ``generate`` becomes :func:`mome.integrations.open_clip.generate` (KV-cached; same arguments and ids).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mome.integrations._sdpa import SdpaOnMome
from mome.integrations.open_clip._common import TALLY, causal_buffer
from mome.integrations.open_clip._generate import coca_generate
from mome.nn.attention import replace_attention
from mome.nn.masks import MaskStructure, attach_structure


def _text_padding(tower, text: Tensor) -> Tensor:
    """The keys the text tower's additive mask hides: pad tokens, and the CLS slot where the tower puts it."""
    valid = text != tower.pad_id  # [B, L]
    if tower.cls_emb is not None:
        cls_valid = valid.new_ones(valid.shape[0], 1)
        valid = torch.cat([valid, cls_valid] if tower.correct_cls_mask else [cls_valid, valid], 1)
    return ~valid


def _text_embeds(self, text: Tensor):
    x, attn_mask = type(self).__mro__[1]._embeds(self, text)
    if attn_mask is None or attn_mask is self.attn_mask:
        return x, attn_mask  # the causal buffer: checked by the Transformer it goes to
    causal = self.attn_mask is not None
    if causal and not causal_buffer(self.attn_mask):
        return x, attn_mask  # a modified buffer: its values decide, on the library's path
    attach_structure(attn_mask, MaskStructure(causal, _text_padding(self, text)))
    return x, attn_mask


def _stack_forward(self, x: Tensor, attn_mask: Tensor | None = None):
    if attn_mask is not None and attn_mask.dim() == 2:
        causal_buffer(attn_mask)  # once per tensor: CLIP's and the text tower's causal buffer
    return type(self).__mro__[1].forward(self, x, attn_mask=attn_mask)


def _decoder_forward(self, image_embs, text_embs):
    causal_buffer(self.attn_mask)  # its [:L, :L] slices then carry the structure too
    return type(self).__mro__[1].forward(self, image_embs, text_embs)


def _custom_attention_forward(self, *args, **kwargs):
    with SdpaOnMome(TALLY):
        return type(self).__mro__[1].forward(self, *args, **kwargs)


_SUBCLASSES: dict[type, type] = {}


def _swap(module: nn.Module, methods: dict) -> None:
    cls = type(module)
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Mome{cls.__name__}", (cls,), methods)
    module.__class__ = _SUBCLASSES[cls]


def patch(model: nn.Module) -> nn.Module:
    """Run ``model``'s attentions on mome, in place (same parameters and state_dict); returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from open_clip import coca_model, timm_model, transformer  # the library, only now

    replace_attention(model)
    for module in list(model.modules()):
        if type(module) in _SUBCLASSES.values():
            continue
        if type(module) is transformer.Transformer:
            _swap(module, {"forward": _stack_forward})
        elif type(module) is transformer.TextTransformer:
            _swap(module, {"_embeds": _text_embeds})
        elif type(module) is transformer.MultimodalTransformer:
            _swap(module, {"forward": _decoder_forward})
        elif type(module) is transformer.Attention:
            if module.logit_scale is not None:
                TALLY.fell_back("scaled cosine attention (an open_clip Attention with scaled_cosine=True) left as is")
                continue
            module.use_fsdpa = True
            _swap(module, {"forward": _custom_attention_forward})
        elif type(module) is coca_model.CoCa:
            _swap(module, {"generate": coca_generate})
        elif type(module) is timm_model.TimmModel:
            from mome.integrations import timm as timm_integration

            timm_integration.patch(module.trunk)
    return model
