"""What ``patch`` and ``generate`` share: the integration's tally and the check of a causal mask buffer."""

from __future__ import annotations

import torch
from torch import Tensor

from mome.integrations._tally import Tally
from mome.nn.masks import MaskStructure, attach_structure, attached_structure

TALLY = Tally("open_clip")


def causal_buffer(mask: Tensor | None) -> bool:
    """Whether the additive ``(L, L)`` buffer is the causal mask: read once per tensor, then attached to it."""
    if mask is None:
        return False
    known, structure = attached_structure(mask)
    if not known:
        length = mask.shape[-1]
        future = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
        causal = mask.dim() == 2 and bool((torch.isneginf(mask) == future).all() and (mask[~future] == 0).all())
        structure = MaskStructure(causal=True) if causal else None
        attach_structure(mask, structure)
    return structure is not None
