"""mome inside timm models: :func:`patch` runs the sdpa call of timm's attentions on ``mome.ops.attention``.

Patched: ``timm.layers.Attention`` (ViT, DeiT, ...), ``timm.layers.AttentionRope``, ``timm.models.eva.EvaAttention``
(RoPE is applied by timm's own forward before the attention) and ``timm.layers.AttentionPoolLatent`` (the latent
pooling head of SigLIP-style ViTs). Each keeps its own forward, which now runs inside
:class:`~mome.integrations._sdpa.SdpaOnMome`: only its ``F.scaled_dot_product_attention`` call changes, so q/k norms,
gates and RoPE stay exactly timm's. Masks passed to a patched attention map as structure when they are key padding
or causal; other masks and attention dropout while training fall back to sdpa (reason logged once, tallied in
``TALLY``). The cost: one Python dispatch per torch call inside the patched forwards.

BEiT's attention is left as it is: its relative position bias is an additive bias, which needs the attention op's
bias support (issue 14).
"""

from __future__ import annotations

from torch import nn

from mome.integrations._sdpa import SdpaOnMome
from mome.integrations._tally import Tally

TALLY = Tally("timm")
BEIT_REASON = "BEiT attention blocks left as they are: their relative position bias needs an attention bias (issue 14)"


def _forward_on_mome(self, *args, **kwargs):
    with SdpaOnMome(TALLY):
        return type(self).__mro__[1].forward(self, *args, **kwargs)


_SUBCLASSES: dict[type, type] = {}


def _targets() -> tuple[type, ...]:
    from timm.layers import Attention, AttentionPoolLatent, AttentionRope  # the library, only now
    from timm.models.eva import EvaAttention

    return Attention, AttentionRope, EvaAttention, AttentionPoolLatent


def patch(model: nn.Module) -> nn.Module:
    """Run ``model``'s timm attentions on mome, in place (same parameters and state_dict); returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from timm.models.beit import Attention as BeitAttention

    targets = _targets()
    for module in model.modules():
        cls = type(module)
        if cls is BeitAttention:
            TALLY.fell_back(BEIT_REASON)
        elif cls in targets:
            if cls not in _SUBCLASSES:
                _SUBCLASSES[cls] = type(f"Mome{cls.__name__}", (cls,), {"forward": _forward_on_mome})
            module.fused_attn = True  # timm's sdpa path, the one mome takes over
            module.__class__ = _SUBCLASSES[cls]
    return model
