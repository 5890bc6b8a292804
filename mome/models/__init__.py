"""MoME transformers (VLMo, BEiT-3) and their configs."""

from mome.models.config import MoMEConfig, beit3_base, beit3_large, beit3_tiny, vlmo_base, vlmo_large, vlmo_tiny
from mome.models.transformer import MoMEOutput, MoMETransformer, PatchEmbedding

__all__ = [
    "MoMEConfig",
    "MoMEOutput",
    "MoMETransformer",
    "PatchEmbedding",
    "beit3_base",
    "beit3_large",
    "beit3_tiny",
    "vlmo_base",
    "vlmo_large",
    "vlmo_tiny",
]
