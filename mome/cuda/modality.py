"""CUDA backend of the modality family's routing (``mome._C``): a stable counting sort of tokens by expert, no
host sync.

``modality_routing(modality, num_experts) -> (perm, inv_perm, offsets)``, all int32 on the device, identical to
the Triton twin ``mome.kernels.modality_routing`` (the contract is ``mome.ops.modality.RoutingBackend``):

- ``perm[k]``: original index of the k-th token in stable expert-sorted order;
- ``inv_perm[t]``: sorted position of token t (``perm[inv_perm[t]] == t``);
- ``offsets``: ``(E + 1,)``, expert e owns sorted rows ``offsets[e]:offsets[e + 1]``, ``offsets[E] = T``.

Equivalent PyTorch::

    perm = torch.sort(modality, stable=True).indices
    inv_perm = torch.empty_like(perm); inv_perm[perm] = torch.arange(len(perm))
    offsets = torch.cat([zeros(1), torch.bincount(modality, minlength=E).cumsum(0)])
"""

from __future__ import annotations

import torch
from torch import Tensor

from mome.cuda import device_reason, extension, fallback_reason

MAX_EXPERTS = 256  # mome::kRoutingMaxExperts (shared-memory tables per expert)
MAX_TOKENS = 2**31 - 1  # int32 outputs

# What this backend routes (read by mome.ops.modality before any launch; see mome/ops/_backend.py).
LIMITS = {
    "dtypes": {"cuda": (torch.int64,)},
    "experts": (1, MAX_EXPERTS),
    "tokens": (0, MAX_TOKENS),
}

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def available(device: torch.device) -> str | None:
    """Why the extension cannot run on ``device`` (not built, stale, driver, kernel image), or None; warns once
    when ``auto`` falls back because of it."""
    return fallback_reason(device)


def input_problem(modality: Tensor, num_experts: int) -> str | None:
    """What the CUDA routing kernel cannot run, or None. Id values are not read (that would sync)."""
    if not isinstance(modality, Tensor) or modality.dim() != 1 or modality.dtype not in _INT_DTYPES:
        got = f"{modality.dtype} {tuple(modality.shape)}" if isinstance(modality, Tensor) else type(modality).__name__
        return f"modality must be a 1-D integer tensor, got {got}"
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts <= MAX_EXPERTS:
        return f"num_experts must be an int in [1, {MAX_EXPERTS}] for the CUDA kernel, got {num_experts!r}"
    if modality.numel() > MAX_TOKENS:
        return f"the CUDA routing kernel takes at most {MAX_TOKENS} tokens, got {modality.numel()}"
    return None


def launch(perm: Tensor, inv_perm: Tensor, offsets: Tensor, modality: Tensor, num_experts: int) -> None:
    """Runs the kernels into preallocated int32 outputs (tests poison them first); modality int64 contiguous."""
    tokens = modality.shape[0]
    module = extension()
    workspace = modality.new_empty(module.routing_workspace_elems(tokens, num_experts), dtype=torch.int32)
    with torch.cuda.device(modality.device):
        module.modality_routing(
            perm.data_ptr(),
            inv_perm.data_ptr(),
            offsets.data_ptr(),
            workspace.data_ptr(),
            modality.data_ptr(),
            tokens,
            num_experts,
            torch.cuda.current_stream(modality.device).cuda_stream,
        )


def modality_routing(modality: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Launcher of the routing contract: the stable expert-sorted order of the tokens, int32, on modality's device.

    Args:
        modality: ``(T,)`` integer expert ids in ``[0, num_experts)``, on a CUDA device. Values are not
            checked (no host sync); ids outside the range are clamped into it by the kernel.
        num_experts: ``E`` in ``[1, 256]``.
    """
    if not isinstance(modality, Tensor) or modality.dtype not in _INT_DTYPES:
        got = modality.dtype if isinstance(modality, Tensor) else type(modality).__name__
        raise TypeError(f"modality must be an integer torch.Tensor, got {got}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
    why = input_problem(modality, num_experts) or device_reason(modality.device)
    if why is not None:
        raise ValueError(f"mome.cuda.modality.modality_routing cannot run these inputs: {why}")
    modality = modality.to(torch.int64).contiguous()  # the kernel reads int64 ids
    tokens = modality.shape[0]
    perm = modality.new_empty(tokens, dtype=torch.int32)
    inv_perm = modality.new_empty(tokens, dtype=torch.int32)
    offsets = modality.new_empty(num_experts + 1, dtype=torch.int32)
    launch(perm, inv_perm, offsets, modality, num_experts)
    return perm, inv_perm, offsets
