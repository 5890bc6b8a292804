"""``ITCLoss``: the image-text contrastive loss as a module, with its temperature, a queue and a global batch.

Wraps :func:`mome.ops.itc_loss`. ``gather=True`` all-gathers the features of every rank of a
``torch.distributed`` group (with gradient) as the columns, and each rank computes only its own
rows against them (``mome.ops.itc.itc_loss_rows``): O(local rows) work and statistics per rank.
Each rank's loss is the mean over its rows; the gather's backward sums every rank's column
gradient into the rank that owns those features, so after DDP averages the parameter gradients
(equal local batches) they equal the single-process gradients of the mean loss on the
concatenated batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mome import ops
from mome.nn.training import FeatureQueue
from mome.ops.itc import ITCOutput

# torch 2.13 renamed reduce_scatter_tensor (now deprecated, with a FutureWarning) to reduce_scatter_single
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherWithGrad(torch.autograd.Function):
    """``cat`` of every rank's equally sized ``(b, ...)`` tensor; backward: reduce-scatter (sum), this rank's rows.

    Every rank's loss depends on every rank's features through the columns: the sum collects those
    contributions to this rank's features. Only this rank's ``b`` rows of the sum are needed, so a
    reduce-scatter (each rank receives ``1/world`` of the sum) does it with half the traffic of an all-reduce.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        ctx.group, ctx.rows = group, tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        mine = grad.new_empty((ctx.rows, *grad.shape[1:]))
        _reduce_scatter(mine, grad.contiguous(), group=ctx.group)
        return mine, None


def gather_with_grad(tensor: Tensor, group=None) -> Tensor:
    """All ranks' rows in rank order; differentiable (see ``_GatherWithGrad``)."""
    return _GatherWithGrad.apply(tensor, group)


@torch.no_grad()
def gather_no_grad(tensor: Tensor, group=None) -> Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


class ITCLoss(nn.Module):
    """Image-text contrastive loss: open_clip's ClipLoss and SigLipLoss, ALBEF's ITA, BLIP's and BLIP-2's ITC.

    Args:
        init_temperature: the similarities are multiplied by ``scale = exp(logit_scale)``, starting at
            ``1 / init_temperature`` (open_clip's parametrisation), capped at ``max_scale``.
        learnable_scale: make ``logit_scale`` a parameter (else a buffer).
        queue_size, embed_dim: with ``queue_size > 0``, a :class:`~mome.nn.training.FeatureQueue` of past
            momentum (or detached online) features is used as extra negatives and refilled after each
            training-mode forward, ALBEF style.
        alpha: momentum-distillation weight (needs momentum features in ``forward``).
        hard_negatives: ``None | "sample" | "hardest"``, as in :func:`mome.ops.itc_loss`.
        gather: all-gather the batch over ``process_group`` (equal local batch sizes, else a ValueError)
            and compute this rank's rows against it. The returned losses are then this rank's means
            (their mean over ranks is the global loss; DDP's gradient averaging gives the global
            gradient), the hard negatives ``(b,)`` are this rank's rows' picks as indices into the
            gathered batch, in rank order, and ``"sample"`` draws use a seed broadcast from the
            group's first rank, keyed by global row, so they do not depend on the number of ranks.
            The queue is refilled with the gathered batch.
        loss: ``"softmax"`` (InfoNCE) or ``"sigmoid"`` (SigLIP, with a ``logit_bias`` starting at
            ``init_logit_bias``, a parameter when ``learnable_scale``), as in :func:`mome.ops.itc_loss`.
        label_smoothing, hard_negative_source: as in :func:`mome.ops.itc_loss` (BLIP-2: 0.1; BLIP: "similarity").
        detach_columns: the columns carry no gradient (BLIP-2, VLMo); with ``gather=True`` the batch is then
            gathered without gradient.
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
        loss: str = "softmax",
        init_logit_bias: float = -10.0,
        label_smoothing: float = 0.0,
        hard_negative_source: str = "loss",
        detach_columns: bool = False,
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
        if loss not in ops.itc.LOSSES:
            raise ValueError(f"loss must be one of {ops.itc.LOSSES}, got {loss!r}")
        if hard_negative_source not in ops.itc.HARD_NEGATIVE_SOURCES:
            sources = ops.itc.HARD_NEGATIVE_SOURCES
            raise ValueError(f"hard_negative_source must be one of {sources}, got {hard_negative_source!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        logit_scale = torch.tensor(math.log(1.0 / init_temperature))
        logit_bias = torch.tensor(float(init_logit_bias)) if loss == "sigmoid" else None
        if learnable_scale:
            self.logit_scale = nn.Parameter(logit_scale)
            self.logit_bias = None if logit_bias is None else nn.Parameter(logit_bias)
        else:
            self.register_buffer("logit_scale", logit_scale)
            self.register_buffer("logit_bias", logit_bias)
        self.loss, self.label_smoothing = loss, label_smoothing
        self.hard_negative_source, self.detach_columns = hard_negative_source, detach_columns
        self.max_scale = max_scale
        self.queue = FeatureQueue(embed_dim, queue_size) if queue_size > 0 else None
        self.alpha, self.hard_negatives, self.backend = alpha, hard_negatives, backend
        self.gather, self.process_group = gather, process_group

    @property
    def scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=self.max_scale)

    def _loss_kwargs(self) -> tuple[dict, dict]:
        """The op's loss options; the sigmoid loss's bias is an argument of its own (differentiable)."""
        options = dict(loss=self.loss, label_smoothing=self.label_smoothing)
        return options, ({} if self.logit_bias is None else {"logit_bias": self.logit_bias})

    def _queue_kwargs(self, dtype: torch.dtype, positive_ids: Tensor | None) -> dict:
        if self.queue is None:
            return {}
        # copies: the backward reads the queue after the enqueue has overwritten rows of it
        image_queue, text_queue, ids = self.queue.snapshot(dtype)
        return dict(image_queue=image_queue, text_queue=text_queue, queue_ids=None if positive_ids is None else ids)

    def _refill(self, image_feats: Tensor, text_feats: Tensor, positive_ids: Tensor | None) -> None:
        if self.queue is not None and self.training:
            self.queue.enqueue(image_feats, text_feats, positive_ids)

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
        if self.gather:
            return self._forward_gathered(image_feats, text_feats, image_feats_m, text_feats_m, positive_ids, generator)
        options, bias = self._loss_kwargs()
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
            hard_negative_source=self.hard_negative_source,
            detach_columns=self.detach_columns,
            backend=self.backend,
            **options,
            **bias,
            **self._queue_kwargs(image_feats.dtype, positive_ids),
        )
        self._refill(
            image_feats if image_feats_m is None else image_feats_m,
            text_feats if text_feats_m is None else text_feats_m,
            positive_ids,
        )
        return result

    def _forward_gathered(self, image_feats, text_feats, image_feats_m, text_feats_m, positive_ids, generator):
        """This rank's rows against the columns of every rank (gathered online features, or momentum ones)."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ITCLoss(gather=True) needs an initialised torch.distributed process group")
        group = self.process_group
        local = image_feats.shape[0]
        sizes = gather_no_grad(torch.tensor([local], device=image_feats.device), group)
        if (sizes != local).any():
            raise ValueError(
                f"ITCLoss(gather=True) needs the same local batch size on every rank (the ranks' mean loss is then "
                f"the global mean), got sizes {sizes.tolist()} in rank order"
            )
        online = gather_no_grad if self.detach_columns else gather_with_grad
        image_columns = online(image_feats, group) if image_feats_m is None else gather_no_grad(image_feats_m, group)
        text_columns = online(text_feats, group) if text_feats_m is None else gather_no_grad(text_feats_m, group)
        global_ids = None if positive_ids is None else gather_no_grad(positive_ids, group)
        mining = {}
        momentum = image_feats_m is not None or text_feats_m is not None
        if self.hard_negatives is not None and self.hard_negative_source == "similarity" and momentum:
            mining = dict(
                mining_image_columns=gather_no_grad(image_feats, group),
                mining_text_columns=gather_no_grad(text_feats, group),
            )
        loss_options, bias = self._loss_kwargs()
        options = ops.itc.ITCOptions(
            image_feats_m=image_feats_m,
            text_feats_m=text_feats_m,
            positive_ids=global_ids,
            alpha=self.alpha,
            **loss_options,
            **mining,
            **self._queue_kwargs(image_feats.dtype, global_ids),
        )
        result = ops.itc.itc_loss_rows(
            image_feats,
            text_feats,
            image_columns,
            text_columns,
            self.scale,
            row_offset=dist.get_rank(group) * local,
            options=options,
            hard_negatives=self.hard_negatives,
            seed=self._shared_seed(generator, image_feats.device) if self.hard_negatives == "sample" else 0,
            hard_negative_source=self.hard_negative_source,
            backend=self.backend,
            **bias,
        )
        self._refill(image_columns.detach(), text_columns.detach(), global_ids)
        return ITCOutput(*result[:5])

    def _shared_seed(self, generator: torch.Generator | None, device: torch.device) -> int:
        """Drawn like ``itc_loss`` draws it, on the group's first rank, which all ranks then use."""
        seed = ops.itc.sample_seed(generator).to(device)
        first = 0 if self.process_group is None else dist.get_global_rank(self.process_group, 0)
        dist.broadcast(seed, src=first, group=self.process_group)
        return int(seed)

    def extra_repr(self) -> str:
        parts = [f"loss={self.loss!r}", f"alpha={self.alpha}", f"hard_negatives={self.hard_negatives!r}"]
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.hard_negatives is not None:
            parts.append(f"hard_negative_source={self.hard_negative_source!r}")
        parts += [f"gather={self.gather}", f"detach_columns={self.detach_columns}"]
        return ", ".join(parts)
