"""Training parts of ALBEF-style pre-training: the momentum (EMA) model and the feature queue."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.library.custom_op("mome::snapshot", mutates_args=())
def snapshot(t: Tensor) -> Tensor:
    """A copy of ``t`` that a compiled graph keeps as a copy.

    A plain ``clone`` of a buffer is cheap to recompute, so inductor's partitioner saves the buffer itself for the
    backward and clones it again there, after the step's in-place update (the queue's enqueue) has overwritten it:
    the gradients then read the new rows. An opaque op is never recomputed.
    """
    return t.clone()


@snapshot.register_fake
def _(t: Tensor) -> Tensor:
    return torch.empty_like(t)


def _paired_parameters(model_m: nn.Module, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    params_m, params = list(model_m.parameters()), list(model.parameters())
    if len(params_m) != len(params):
        raise ValueError(f"model_m has {len(params_m)} parameters but model has {len(params)}: not copies")
    for index, (p_m, p) in enumerate(zip(params_m, params, strict=True)):
        if p_m.shape != p.shape:
            raise ValueError(f"parameter {index}: model_m has shape {tuple(p_m.shape)}, model {tuple(p.shape)}")
    return params_m, params


@torch.no_grad()
def copy_params(model_m: nn.Module, model: nn.Module) -> None:
    """Start the momentum model as an exact copy of ``model``, frozen (no gradients)."""
    params_m, params = _paired_parameters(model_m, model)
    for p_m, p in zip(params_m, params, strict=True):
        p_m.copy_(p)
        p_m.requires_grad_(False)


@torch.no_grad()
def momentum_update(model_m: nn.Module, model: nn.Module, momentum: float) -> None:
    """EMA step: ``p_m = momentum * p_m + (1 - momentum) * p`` for every parameter pair."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    params_m, params = _paired_parameters(model_m, model)
    if params_m:
        torch._foreach_mul_(params_m, momentum)
        torch._foreach_add_(params_m, [p.detach() for p in params], alpha=1.0 - momentum)


class FeatureQueue(nn.Module):
    """A ring buffer of past (momentum) image and text features, the extra negatives of ALBEF's ITC.

    ``image_queue`` / ``text_queue`` ``(size, dim)`` start as random unit vectors (like ALBEF), ``ids``
    ``(size,)`` as -1 (matches no pair id); ``enqueue`` after the loss overwrites the oldest rows.
    Pass ``image_queue``, ``text_queue`` (and ``ids`` as ``queue_ids``) to :func:`mome.ops.itc_loss`.
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        if dim < 1 or size < 1:
            raise ValueError(f"dim and size must be positive, got dim={dim}, size={size}")
        self.dim, self.size = dim, size
        self.register_buffer("image_queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("text_queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.int64))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def enqueue(self, image_feats: Tensor, text_feats: Tensor, ids: Tensor | None = None) -> None:
        """Write ``(B, dim)`` features (and ``(B,)`` ids) at the pointer, wrapping around; B <= size."""
        batch = image_feats.shape[0]
        if image_feats.shape != (batch, self.dim) or text_feats.shape != (batch, self.dim):
            raise ValueError(
                f"image_feats and text_feats must both have shape (B, {self.dim}), "
                f"got {tuple(image_feats.shape)} and {tuple(text_feats.shape)}"
            )
        if batch > self.size:
            raise ValueError(f"a batch of {batch} does not fit a queue of size {self.size}")
        if ids is not None and ids.shape != (batch,):
            raise ValueError(f"ids must have shape ({batch},), got {tuple(ids.shape)}")
        rows = (self.ptr + torch.arange(batch, device=self.ptr.device)) % self.size
        self.image_queue[rows] = image_feats.detach().to(self.image_queue.dtype)
        self.text_queue[rows] = text_feats.detach().to(self.text_queue.dtype)
        self.ids[rows] = -1 if ids is None else ids.to(self.ids)
        self.ptr.copy_((self.ptr + batch) % self.size)

    def snapshot(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Copies of ``(image_queue, text_queue, ids)`` (the queues in ``dtype``) for a loss whose backward runs
        after :meth:`enqueue` has overwritten rows (see :func:`snapshot`)."""
        return snapshot(self.image_queue.to(dtype)), snapshot(self.text_queue.to(dtype)), snapshot(self.ids)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}"
