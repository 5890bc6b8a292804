"""What the reference launchers of every family share: the compute dtype and the backward as a VJP.

Each ``mome/reference/<family>.py`` holds the specification and, below it, the launchers of its family's
backend contract: forward launchers run the specification (half precision computed in float32 and rounded
back: CPU matmuls have no fast fp16 path); backward launchers recompute the forward under autograd and take
its vector-Jacobian product, so the gradients are those of the specification itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The reference runs every float dtype on every device.
ALL_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def widen(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def vjp(fn, inputs: list[Tensor | None], grads: list[Tensor | None]) -> list[Tensor | None]:
    """Gradients of ``fn(*inputs)`` (a tensor or tuple of tensors) w.r.t. every input that is not None.

    Uses ``torch.func.vjp``: custom-op implementations run below the autograd dispatch key, where
    ``torch.autograd.grad`` records nothing. Inputs are widened to the compute dtype; gradients come back
    in each input's own dtype.
    """
    dtype = compute_dtype(next(t for t in inputs if t is not None))
    present = [i for i, t in enumerate(inputs) if t is not None]

    def on_present(*values):
        full = list(inputs)
        for index, value in zip(present, values, strict=True):
            full[index] = value
        outputs = fn(*[None if t is None else t.to(dtype) for t in full])
        return outputs if isinstance(outputs, tuple) else (outputs,)

    outputs, pullback = torch.func.vjp(on_present, *[inputs[i] for i in present])
    cotangents = tuple(torch.zeros_like(o) if g is None else g.to(o.dtype) for o, g in zip(outputs, grads, strict=True))
    computed = pullback(cotangents)
    result: list[Tensor | None] = [None] * len(inputs)
    for index, grad in zip(present, computed, strict=True):
        # the custom ops' fake implementations promise empty_like(input) (contiguous inputs): a VJP may come back
        # with other strides (a transposed matmul's), which inductor's compiled code would then misread
        result[index] = grad.to(inputs[index].dtype).contiguous(memory_format=torch.contiguous_format)
    return result
