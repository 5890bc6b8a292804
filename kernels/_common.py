"""Helpers every Triton kernel module shares; kernel modules import this (and ``aot``) and nothing else of mome.

bf16 under the interpreter, one policy for every kernel: the interpreter keeps bf16 as raw 16-bit words and runs
numpy on them, so bf16 arithmetic is wrong there (loads and stores are right; fp32 -> bf16 casts truncate instead of
rounding). Kernels pass every loaded tile through :func:`widen_bf16_in_interpreter`, which widens bf16 to fp32 when
interpreting, and round fp32 results back through :func:`narrow` where rounding matters (a chain of GEMMs); both
are the identity (a plain cast) in compiled code, where bf16 operands go to the tensor cores as they are.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: kernels run on CPU tensors through triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_INTERPRETING = tl.constexpr(interpreting())


@triton.jit
def widen_bf16_in_interpreter(x):
    if _INTERPRETING:
        if x.dtype == tl.bfloat16:
            x = x.to(tl.float32)
    return x


@triton.jit
def narrow(x, dtype: tl.constexpr):
    """``x.to(dtype)`` for fp32 ``x``, rounded to nearest even as compiled code rounds. Triton's interpreter
    truncates fp32 -> bf16 (even when asked for "rtne"): a bias of half a bf16 ulp on every value, which triples
    the error of a bf16 GEMM chain. There the rounding is done on the bits first (NaN and inf stay)."""
    if _INTERPRETING:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# torch dtype -> the element type triton's signatures and AOT specs name
TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def pointer_type(dtype: torch.dtype) -> str:
    """``"*fp16"`` etc.: the signature entry of a tensor argument of ``dtype``."""
    return "*" + TRITON_TYPE[dtype]


def dot_precision(dtype: torch.dtype, *, fp32_accurate: bool = False) -> str:
    """``input_precision`` of ``tl.dot`` for inputs of ``dtype``.

    fp32 follows torch's own switch: plain TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set (as
    ``torch.matmul`` would), else three TF32 passes, which hold fp32's accuracy on the tensor cores.
    ``fp32_accurate`` always takes the three passes (attention's softmax statistics miss the fp32 tolerance with
    plain TF32). fp64 is IEEE. 16-bit inputs ignore the setting.
    """
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32 and (fp32_accurate or not torch.backends.cuda.matmul.allow_tf32):
        return "tf32x3"
    return "tf32"


def accumulator_type(dtype: torch.dtype):
    """fp32 accumulation for 16-bit and fp32 inputs, fp64 for fp64 (the interpreter's tests)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def padded_dim(size: int, minimum: int = 16) -> int:
    """The power-of-two tile width (at least ``minimum``, what ``tl.dot`` needs) that covers ``size``."""
    return max(minimum, triton.next_power_of_2(size))


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 8 under the interpreter (a few programs exercise the grid)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8
