"""Plain-PyTorch specification of every mome op.

Each ``*_ref`` function is short and written the way the model it mirrors
computes. It is the CPU backend, the oracle every kernel test compares with, and
the eager baseline of the benchmarks. Everything runs in float64 on any device.
"""

from mome.reference.attention import attention_ref, attention_visibility
from mome.reference.decode import decode_attention_ref
from mome.reference.itc import ITCOutput, itc_loss_ref, itc_loss_rows_ref
from mome.reference.modality import (
    apply_activation,
    modality_ffn_ref,
    modality_layer_norm_ref,
    modality_linear_ref,
)

__all__ = [
    "ITCOutput",
    "apply_activation",
    "attention_ref",
    "attention_visibility",
    "decode_attention_ref",
    "itc_loss_ref",
    "itc_loss_rows_ref",
    "modality_ffn_ref",
    "modality_layer_norm_ref",
    "modality_linear_ref",
]
