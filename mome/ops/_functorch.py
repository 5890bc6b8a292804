"""``torch.func`` transforms (grad, vjp, jacrev, jvp, jacfwd, vmap) run each op's specification.

mome's custom ops carry reverse-mode formulas for autograd, but functorch cannot see through them: it would
raise for reverse mode and silently return zero tangents for forward mode. While a transform is active, every
op therefore runs its plain-PyTorch specification (``mome.reference``) instead, which every transform
differentiates natively, forward and reverse, at the reference's speed. Half precision is computed in fp32 and
rounded back, as the reference backend does.
"""

from __future__ import annotations

import torch


def transforms_active() -> bool:
    """True inside ``torch.func.grad`` / ``vjp`` / ``jvp`` / ``vmap`` / ... (never while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None
