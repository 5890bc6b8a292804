"""open_clip's ``ClipLoss`` and ``CoCaLoss`` on ``mome.ops.itc_loss``: same constructors and forwards, no B×B logits.

Distributed as open_clip does it, with ``torch.distributed`` (the default group; ``rank`` and ``world_size`` as
given): the features of every rank are gathered, with gradient (``gather_with_grad``) or without (then, unless
``local_loss``, this rank's own slice keeps its gradient); ``local_loss`` computes only this rank's rows against all
columns (``mome.ops.itc.itc_loss_rows``), else every rank computes the whole gathered batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mome import ops
from mome.nn.itc import gather_no_grad, gather_with_grad


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss``: ``forward(image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False)`` -> the symmetric InfoNCE loss (a dict ``{"contrastive_loss": loss}`` with ``output_dict``).

    ``cache_labels`` is accepted and has nothing to cache (no labels tensor is built); ``use_horovod=True`` is refused.
    A ``logit_bias`` shifts every logit alike, which a softmax cross-entropy does not see: the loss is unchanged and
    its gradient is 0, as in open_clip."""

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported: mome's ClipLoss gathers with torch.distributed")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size) with world_size >= 1, got rank={rank}, {world_size=}")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod, self.backend = rank, world_size, use_horovod, backend

    def _gathered(self, features: Tensor) -> Tensor:
        if self.gather_with_grad:
            return gather_with_grad(features)
        gathered = gather_no_grad(features)
        if self.local_loss:
            return gathered
        parts = list(gathered.chunk(self.world_size))
        parts[self.rank] = features  # this rank's slice keeps its gradient
        return torch.cat(parts)

    def contrastive_loss(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        if self.world_size == 1:
            return ops.itc_loss(image_features, text_features, logit_scale, backend=self.backend).loss
        all_images, all_texts = self._gathered(image_features), self._gathered(text_features)
        if not self.local_loss:
            return ops.itc_loss(all_images, all_texts, logit_scale, backend=self.backend).loss
        rows = ops.itc.itc_loss_rows(
            image_features,
            text_features,
            all_images,
            all_texts,
            logit_scale,
            row_offset=self.rank * image_features.shape[0],
            backend=self.backend,
        )
        return rows.loss

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = self.contrastive_loss(image_features, text_features, logit_scale)
        if isinstance(logit_bias, Tensor):
            loss = loss + (logit_bias * 0).sum()  # keeps the bias in the graph with its (zero) gradient
        return {"contrastive_loss": loss} if output_dict else loss


class CoCaLoss(ClipLoss):
    """open_clip's ``CoCaLoss``: ``forward(image_features, text_features, logits, labels, logit_scale,
    output_dict=False)`` -> ``(clip_loss, caption_loss)`` (or a dict), the contrastive part on mome."""

    def __init__(
        self,
        caption_loss_weight: float,
        clip_loss_weight: float,
        pad_id: int = 0,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        backend: str = "auto",
    ):
        super().__init__(local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod, backend=backend)
        self.clip_loss_weight, self.caption_loss_weight, self.pad_id = clip_loss_weight, caption_loss_weight, pad_id
        self.caption_loss = nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(self, image_features, text_features, logits, labels, logit_scale, output_dict=False):
        if self.clip_loss_weight:
            clip_loss = self.clip_loss_weight * self.contrastive_loss(image_features, text_features, logit_scale)
        else:
            clip_loss = torch.tensor(0, device=logits.device)
        caption_loss = self.caption_loss_weight * F.cross_entropy(
            logits.permute(0, 2, 1), labels, ignore_index=self.pad_id
        )
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss``: ``forward(image_features, text_features, logit_scale, logit_bias,
    output_dict=False)`` -> the sigmoid loss ``Σ -logsigmoid(±(scale·sim + bias)) / b`` of this rank's b images
    against every rank's texts, on ``mome.ops.itc_loss(loss="sigmoid")``.

    ``dist_impl`` (open_clip's ways of passing the texts around the ranks: ``bidir``, ``shift``, ``reduce``,
    ``gather``) is accepted and checked; all compute the same sum, which mome computes against the texts gathered
    with gradient. ``cache_labels`` has nothing to cache."""

    DIST_IMPLS = ("bidir", "shift", "reduce", "gather")

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in self.DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {self.DIST_IMPLS} or None, got {dist_impl!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size) with world_size >= 1, got rank={rank}, {world_size=}")
        self.cache_labels, self.rank, self.world_size, self.dist_impl = cache_labels, rank, world_size, dist_impl
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        if self.world_size == 1:
            loss = ops.itc_loss(
                image_features, text_features, logit_scale, loss="sigmoid", logit_bias=logit_bias, backend=self.backend
            ).loss
        else:
            rows = ops.itc.itc_loss_rows(
                image_features,
                text_features,
                gather_no_grad(image_features),  # the t2i columns, which this loss does not use
                gather_with_grad(text_features),
                logit_scale,
                row_offset=self.rank * image_features.shape[0],
                options=ops.itc.ITCOptions(loss="sigmoid"),
                logit_bias=logit_bias,
                backend=self.backend,
            )
            loss = rows.loss_i2t  # this rank's images against all texts, as open_clip sums it
        return {"contrastive_loss": loss} if output_dict else loss
