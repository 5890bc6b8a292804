"""MoME transformers (VLMo, BEiT-3) and their configs."""

from mome.models.albef import ALBEF, ALBEFConfig, albef_base, albef_tiny
from mome.models.beit3 import BEiT3, BEiT3Config, beit3_base_recipe, beit3_tiny_recipe
from mome.models.blip import BLIP, BLIPConfig, blip_base, blip_tiny
from mome.models.coca import CoCa, CoCaConfig, coca_base, coca_tiny
from mome.models.config import MoMEConfig, beit3_base, beit3_large, beit3_tiny, vlmo_base, vlmo_large, vlmo_tiny
from mome.models.transformer import MoMEOutput, MoMETransformer, PatchEmbedding
from mome.models.vlmo import VLMo, VLMoConfig, vlmo_base_recipe, vlmo_tiny_recipe

__all__ = [
    "ALBEF",
    "ALBEFConfig",
    "BEiT3",
    "BEiT3Config",
    "BLIP",
    "BLIPConfig",
    "CoCa",
    "CoCaConfig",
    "MoMEConfig",
    "MoMEOutput",
    "MoMETransformer",
    "PatchEmbedding",
    "VLMo",
    "VLMoConfig",
    "albef_base",
    "albef_tiny",
    "beit3_base",
    "beit3_base_recipe",
    "beit3_large",
    "beit3_tiny",
    "beit3_tiny_recipe",
    "blip_base",
    "blip_tiny",
    "coca_base",
    "coca_tiny",
    "vlmo_base",
    "vlmo_base_recipe",
    "vlmo_large",
    "vlmo_tiny",
    "vlmo_tiny_recipe",
]
