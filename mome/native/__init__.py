"""The native backend: mome's ops on CPU tensors through torch's own fused kernels.

Each ``mome/native/<family>.py`` provides its family's launchers (the contract in ``mome/ops/<family>.py``) built
from what torch already ships for the CPU: the flash-attention kernel behind ``scaled_dot_product_attention``,
``addmm`` per expert on rows sorted by expert, ``layer_norm``, one similarity GEMM per direction for the ITC loss.
They compute what the specification (``mome.reference``) computes; a case where torch's kernel would not (an
input that is not finite, a product that could overflow) runs the reference launcher instead, inside the same
call. ``backend="auto"`` picks this backend first on CPU tensors; ``backend="reference"`` still runs the spec.
"""
