"""``ITCLoss``: the image-text contrastive loss as a module, with its temperature, a queue and a global batch.

Wraps :func:`mome.ops.itc_loss`. ``gather=True`` all-gathers the features of every rank of a
``torch.distributed`` group (with gradient) so the loss and the hard negatives see the global
batch; the gather's backward sums the gradient over ranks, so after DDP averages the parameter
gradients they equal the single-process gradients on the concatenated batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mome import ops
from mome.nn.training import FeatureQueue
from mome.reference.itc import ITCOutput


class _GatherWithGrad(torch.autograd.Function):
    """``cat`` of every rank's equally sized ``(b, ...)`` tensor; backward: all-reduce (sum), keep this rank's rows."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)  # every rank's loss depends on these rows
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def gather_with_grad(tensor: Tensor, group=None) -> Tensor:
    """All ranks' rows in rank order; differentiable (see ``_GatherWithGrad``)."""
    return _GatherWithGrad.apply(tensor, group)


@torch.no_grad()
def gather_no_grad(tensor: Tensor, group=None) -> Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


class ITCLoss(nn.Module):
    """Symmetric InfoNCE between image and text features, open_clip's ClipLoss and ALBEF's ITA in one module.

    Args:
        init_temperature: the similarities are multiplied by ``scale = exp(logit_scale)``, starting at
            ``1 / init_temperature`` (open_clip's parametrisation), capped at ``max_scale``.
        learnable_scale: make ``logit_scale`` a parameter (else a buffer).
        queue_size, embed_dim: with ``queue_size > 0``, a :class:`~mome.nn.training.FeatureQueue` of past
            momentum (or detached online) features is used as extra negatives and refilled after each
            training-mode forward, ALBEF style.
        alpha: momentum-distillation weight (needs momentum features in ``forward``).
        hard_negatives: ``None | "sample" | "hardest"``, as in :func:`mome.ops.itc_loss`.
        gather: all-gather the batch over ``process_group`` (equal local batch sizes); indices of the
            hard negatives then refer to the gathered batch, in rank order.
    """

    def __init__(
        self,
        *,
        init_temperature: float = 0.07,
        learnable_scale: bool = True,
        max_scale: float = 100.0,
        queue_size: int = 0,
        embed_dim: int | None = None,
        alpha: float = 0.0,
        hard_negatives: str | None = None,
        gather: bool = False,
        process_group=None,
        backend: str = "auto",
    ):
        super().__init__()
        if init_temperature <= 0:
            raise ValueError(f"init_temperature must be positive, got {init_temperature}")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        if queue_size > 0 and (embed_dim is None or embed_dim < 1):
            raise ValueError(f"a queue (queue_size={queue_size}) needs embed_dim, the feature width, got {embed_dim}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if hard_negatives not in ops.itc.HARD_NEGATIVES:
            raise ValueError(f"hard_negatives must be one of {ops.itc.HARD_NEGATIVES}, got {hard_negatives!r}")
        logit_scale = torch.tensor(math.log(1.0 / init_temperature))
        if learnable_scale:
            self.logit_scale = nn.Parameter(logit_scale)
        else:
            self.register_buffer("logit_scale", logit_scale)
        self.max_scale = max_scale
        self.queue = FeatureQueue(embed_dim, queue_size) if queue_size > 0 else None
        self.alpha, self.hard_negatives, self.backend = alpha, hard_negatives, backend
        self.gather, self.process_group = gather, process_group

    @property
    def scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=self.max_scale)

    def _global(self, tensor: Tensor | None, differentiable: bool) -> Tensor | None:
        if tensor is None or not self.gather:
            return tensor
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ITCLoss(gather=True) needs an initialised torch.distributed process group")
        if differentiable:
            return gather_with_grad(tensor, self.process_group)
        return gather_no_grad(tensor, self.process_group)

    def forward(
        self,
        image_feats: Tensor,
        text_feats: Tensor,
        *,
        image_feats_m: Tensor | None = None,
        text_feats_m: Tensor | None = None,
        positive_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> ITCOutput:
        """``(B, d)`` unit-norm features (and momentum features, ``(B,)`` pair ids) -> ``ITCOutput``."""
        image_feats, text_feats = self._global(image_feats, True), self._global(text_feats, True)
        image_feats_m, text_feats_m = self._global(image_feats_m, False), self._global(text_feats_m, False)
        positive_ids = self._global(positive_ids, False)
        queue_kwargs = {}
        if self.queue is not None:
            # copies: the backward reads the queue after the enqueue below has overwritten rows of it
            queue_kwargs = dict(
                image_queue=self.queue.image_queue.to(image_feats.dtype, copy=True),
                text_queue=self.queue.text_queue.to(image_feats.dtype, copy=True),
                queue_ids=None if positive_ids is None else self.queue.ids.clone(),
            )
        result = ops.itc_loss(
            image_feats,
            text_feats,
            self.scale,
            image_feats_m=image_feats_m,
            text_feats_m=text_feats_m,
            alpha=self.alpha,
            positive_ids=positive_ids,
            hard_negatives=self.hard_negatives,
            generator=generator,
            backend=self.backend,
            **queue_kwargs,
        )
        if self.queue is not None and self.training:
            self.queue.enqueue(
                image_feats if image_feats_m is None else image_feats_m,
                text_feats if text_feats_m is None else text_feats_m,
                positive_ids,
            )
        return result

    def extra_repr(self) -> str:
        parts = [f"alpha={self.alpha}", f"hard_negatives={self.hard_negatives!r}", f"gather={self.gather}"]
        return ", ".join(parts)
