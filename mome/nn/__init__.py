"""Drop-in nn.Modules built on mome.ops: attention, multiway layers, MoME layers, heads."""

from mome.nn.attention import MultiheadAttention, MultiwaySelfAttention, SharedSelfAttention, replace_attention
from mome.nn.decoder import CaptionDecoder
from mome.nn.freeze import freeze_experts, unfreeze_experts
from mome.nn.heads import ITCHead, ITMHead, MLMHead, itm_inputs, mask_tokens
from mome.nn.itc import ITCLoss
from mome.nn.layer import MoMELayer
from mome.nn.masks import MaskStructure, attach_structure
from mome.nn.multiway import (
    LANGUAGE,
    VISION,
    VISION_LANGUAGE,
    ModalityFFN,
    MultiwayLayerNorm,
    MultiwayLinear,
    modality_from_split,
)
from mome.nn.pooling import AttentionalPooler
from mome.nn.relative_position import BucketedRelativePositionBias, RelativePositionBias
from mome.nn.training import FeatureQueue, copy_params, momentum_update

__all__ = [
    "LANGUAGE",
    "VISION",
    "VISION_LANGUAGE",
    "AttentionalPooler",
    "BucketedRelativePositionBias",
    "CaptionDecoder",
    "FeatureQueue",
    "ITCHead",
    "ITCLoss",
    "ITMHead",
    "MLMHead",
    "MaskStructure",
    "ModalityFFN",
    "MoMELayer",
    "MultiheadAttention",
    "MultiwayLayerNorm",
    "MultiwayLinear",
    "MultiwaySelfAttention",
    "RelativePositionBias",
    "SharedSelfAttention",
    "attach_structure",
    "copy_params",
    "freeze_experts",
    "itm_inputs",
    "mask_tokens",
    "modality_from_split",
    "momentum_update",
    "replace_attention",
    "unfreeze_experts",
]
