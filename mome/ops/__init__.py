"""mome's public ops: validation, backend choice, autograd and torch.library registration."""

from mome.ops._backend import BACKENDS, BackendUnavailableError
from mome.ops.attention import attention
from mome.ops.decode import decode_attention
from mome.ops.itc import ITCOutput, itc_loss
from mome.ops.modality import modality_ffn, modality_layer_norm, modality_linear

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "ITCOutput",
    "attention",
    "decode_attention",
    "itc_loss",
    "modality_ffn",
    "modality_layer_norm",
    "modality_linear",
]
