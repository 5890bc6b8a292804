"""mome inside timm models: :func:`patch` runs the sdpa call of timm's attentions on ``mome.ops.attention``.

Patched: ``timm.layers.Attention`` (ViT, DeiT, ...), ``timm.layers.AttentionRope``, ``timm.models.eva.EvaAttention``
(RoPE is applied by timm's own forward before the attention), ``timm.layers.AttentionPoolLatent`` (the latent
pooling head of SigLIP-style ViTs) and ``timm.models.beit.Attention`` (BEiT: its relative position bias, which timm
hands sdpa as ``attn_mask``, becomes the op's ``attn_bias``, gradient included). Each keeps its own forward, which now
runs inside :class:`~mome.integrations._sdpa.SdpaOnMome`: only its ``F.scaled_dot_product_attention`` call changes,
so q/k norms, gates and RoPE stay exactly timm's. Masks passed to a patched attention map as structure when they are
key padding or causal, as a bias otherwise; attention dropout while training runs fused too. What cannot map falls
back to sdpa (reason logged once, tallied in ``TALLY``). The cost: one Python dispatch per torch call inside the
patched forwards.

BEiT's relative position biases are marked as biases where they are made, so no layer reads one back to the host;
the sum of a per-layer and a shared bias (``use_shared_rel_pos_bias`` with ``use_rel_pos_bias``) is a new tensor,
read once per layer in a forward without gradients (with gradients a bias is never read).
"""

from __future__ import annotations

from torch import Tensor, nn

from mome.integrations._sdpa import SdpaOnMome
from mome.integrations._tally import Tally
from mome.nn.masks import attach_structure

TALLY = Tally("timm")


def _forward_on_mome(self, *args, **kwargs):
    with SdpaOnMome(TALLY):
        return type(self).__mro__[1].forward(self, *args, **kwargs)


def _rel_pos_bias_on_mome(self) -> Tensor:
    return attach_structure(type(self).__mro__[1]._get_rel_pos_bias(self), None)  # a bias: no mask to look for


def _shared_rel_pos_bias_on_mome(self) -> Tensor:
    return attach_structure(type(self).__mro__[1].forward(self), None)


_SUBCLASSES: dict[type, type] = {}


def _targets() -> dict[type, dict]:
    """timm's classes that mome patches -> the methods their mome subclasses define."""
    from timm.layers import Attention, AttentionPoolLatent, AttentionRope  # the library, only now
    from timm.models import beit
    from timm.models.eva import EvaAttention

    on_mome = {"forward": _forward_on_mome}
    targets = {cls: on_mome for cls in (Attention, AttentionRope, EvaAttention, AttentionPoolLatent)}
    targets[beit.Attention] = {"forward": _forward_on_mome, "_get_rel_pos_bias": _rel_pos_bias_on_mome}
    targets[beit.RelativePositionBias] = {"forward": _shared_rel_pos_bias_on_mome}
    return targets


def patch(model: nn.Module) -> nn.Module:
    """Run ``model``'s timm attentions on mome, in place (same parameters and state_dict); returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets = _targets()
    for module in model.modules():
        cls = type(module)
        if cls in targets:
            if cls not in _SUBCLASSES:
                _SUBCLASSES[cls] = type(f"Mome{cls.__name__}", (cls,), targets[cls])
            if hasattr(module, "fused_attn"):
                module.fused_attn = True  # timm's sdpa path, the one mome takes over
            module.__class__ = _SUBCLASSES[cls]
    return model
