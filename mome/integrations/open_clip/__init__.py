"""mome inside open_clip: :func:`patch` for a model's attentions (and a CoCa's ``generate``), :func:`generate` for
KV-cached CoCa captioning, :class:`ClipLoss`, :class:`CoCaLoss` and :class:`SigLipLoss` for its losses (open_clip's
signatures, computed by ``mome.ops.itc_loss`` without the B×B logits).

open_clip itself is imported by :func:`patch` and :func:`generate` only: the losses work without it.
"""

from __future__ import annotations

from mome.integrations.open_clip._common import TALLY
from mome.integrations.open_clip._generate import generate, unsupported_reason
from mome.integrations.open_clip._loss import ClipLoss, CoCaLoss, SigLipLoss
from mome.integrations.open_clip._patch import patch

__all__ = ["TALLY", "ClipLoss", "CoCaLoss", "SigLipLoss", "generate", "patch", "unsupported_reason"]
