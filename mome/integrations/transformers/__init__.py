"""mome inside HuggingFace transformers models.

- :func:`register` adds ``"mome"`` to transformers' attention and mask interfaces: then
  ``from_pretrained(..., attn_implementation="mome")`` or ``model.set_attn_implementation("mome")`` runs every
  attention of the models that use the interface (CLIP, SigLIP, BLIP-2's vision tower and Q-Former, the decoders of
  most LLMs, ...) on ``mome.ops.attention``.
- :func:`apply_mome_to_blip` patches BLIP, whose attentions do not use the interface.

``TALLY`` counts the fused calls and the fallbacks with their reasons.
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from mome.integrations.transformers._attention import TALLY, mome_attention_forward, mome_mask
from mome.integrations.transformers._blip import apply_mome_to_blip

NAME = "mome"


def register(name: str = NAME) -> str:
    """Register mome's attention and mask functions under ``name`` (default ``"mome"``); returns the name.

    Masks that are causal and/or key padding reach ``mome.ops.attention`` as structure; other masks (sliding windows,
    packed sequences, custom float biases) and a ``position_bias`` (T5) as its ``attn_bias``; attention dropout while
    training as its ``dropout_p``. Falls back, with the reason logged once: to the modeling file's eager attention
    when attention weights are requested (or for softcap and attention sinks); to sdpa for what does not map (the
    reason says what)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    AttentionInterface.register(name, mome_attention_forward)
    AttentionMaskInterface.register(name, mome_mask)
    return name


__all__ = ["NAME", "TALLY", "apply_mome_to_blip", "mome_attention_forward", "mome_mask", "register"]
