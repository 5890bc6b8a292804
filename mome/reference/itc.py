"""Image-text contrastive loss with queue, momentum distillation and hard negatives: the specification.

open_clip's ClipLoss (``scale = logit_scale.exp()``, no queue, no momentum) and
ALBEF's ITA loss (``scale = 1 / temp``, momentum features, queue, ``alpha``) are
both special cases. Materialises the ``B × (B + Q)`` logits and targets in both
directions: ``O(B·(B + Q))`` memory, which the fused kernel avoids.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class ITCOutput(NamedTuple):
    loss: Tensor  # (loss_i2t + loss_t2i) / 2
    loss_i2t: Tensor
    loss_t2i: Tensor
    neg_text_idx: Tensor | None  # [B] in-batch text index per image, -1 when none exists
    neg_image_idx: Tensor | None  # [B] in-batch image index per text


def positive_mask(positive_ids: Tensor | None, queue_ids: Tensor | None, batch: int, queue: int, device) -> Tensor:
    """``(B, B + Q)`` bool: batch column j is positive for row i iff their ids agree (default j == i);
    queue column q iff ``queue_ids[q] == positive_ids[i]`` (never, without queue ids)."""
    if positive_ids is None:
        in_batch = torch.eye(batch, dtype=torch.bool, device=device)
        ids = torch.arange(batch, device=device)
    else:
        ids = positive_ids
        in_batch = ids[:, None] == ids[None, :]
    if queue_ids is None:
        in_queue = torch.zeros(batch, queue, dtype=torch.bool, device=device)
    else:
        in_queue = ids[:, None] == queue_ids[None, :]
    return torch.cat([in_batch, in_queue], dim=1)


def _direction_loss(
    rows: Tensor, columns: Tensor, scale: Tensor, rows_m: Tensor | None, alpha: float, positives: Tensor
) -> tuple[Tensor, Tensor]:
    """One direction as ALBEF writes it: logits, targets, ``-sum(target · log_softmax)`` averaged over rows."""
    logits = scale * rows @ columns.T  # [B, B + Q]
    with torch.no_grad():
        targets = positives.to(logits.dtype)
        targets = targets / targets.sum(dim=1, keepdim=True)
        if alpha > 0:
            logits_m = scale * rows_m @ columns.T
            targets = alpha * torch.softmax(logits_m, dim=1) + (1 - alpha) * targets
    loss = -(torch.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()
    return loss, logits


def _hard_negatives(logits_batch: Tensor, positives: Tensor, mode: str, generator: torch.Generator | None) -> Tensor:
    """Per row, one in-batch column that is not a positive: ALBEF's softmax + multinomial, or the arg-max."""
    with torch.no_grad():
        if mode == "hardest":
            scores = logits_batch.masked_fill(positives, float("-inf"))
            picked = scores.argmax(dim=1)
        else:
            weights = torch.softmax(logits_batch.double(), dim=1).masked_fill(positives, 0.0)
            has_negative = ~positives.all(dim=1)
            weights[~has_negative] = 1.0  # multinomial needs a non-zero row; overwritten with -1 below
            picked = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        return picked.masked_fill(positives.all(dim=1), -1)


def itc_loss_ref(
    image_feats: Tensor,
    text_feats: Tensor,
    scale: Tensor | float,
    *,
    image_feats_m: Tensor | None = None,
    text_feats_m: Tensor | None = None,
    image_queue: Tensor | None = None,
    text_queue: Tensor | None = None,
    alpha: float = 0.0,
    positive_ids: Tensor | None = None,
    queue_ids: Tensor | None = None,
    hard_negatives: str | None = None,
    generator: torch.Generator | None = None,
) -> ITCOutput:
    """Symmetric InfoNCE over image/text features ``(B, d)``; queues are ``(Q, d)``.

    i2t columns are ``[text_feats_m or text_feats; text_queue]``, t2i columns
    ``[image_feats_m or image_feats; image_queue]``. Targets are uniform over the
    positives, mixed with ``alpha · softmax(momentum logits)`` when ``alpha > 0``.
    """
    batch = image_feats.shape[0]
    text_columns = text_feats if text_feats_m is None else text_feats_m
    image_columns = image_feats if image_feats_m is None else image_feats_m
    if text_queue is not None:
        text_columns = torch.cat([text_columns, text_queue], dim=0)  # [B + Q, d]
        image_columns = torch.cat([image_columns, image_queue], dim=0)
    queue = text_columns.shape[0] - batch
    positives = positive_mask(positive_ids, queue_ids, batch, queue, image_feats.device)  # [B, B + Q]
    scale = torch.as_tensor(scale, dtype=image_feats.dtype, device=image_feats.device)
    loss_i2t, logits_i2t = _direction_loss(image_feats, text_columns, scale, image_feats_m, alpha, positives)
    loss_t2i, logits_t2i = _direction_loss(text_feats, image_columns, scale, text_feats_m, alpha, positives)
    neg_text = neg_image = None
    if hard_negatives is not None:
        batch_positives = positives[:, :batch]
        neg_text = _hard_negatives(logits_i2t[:, :batch], batch_positives, hard_negatives, generator)
        neg_image = _hard_negatives(logits_t2i[:, :batch], batch_positives, hard_negatives, generator)
    return ITCOutput((loss_i2t + loss_t2i) / 2, loss_i2t, loss_t2i, neg_text, neg_image)


class ITCLocalOutput(NamedTuple):
    loss: Tensor  # (loss_i2t + loss_t2i) / 2, each the mean over the b local rows
    loss_i2t: Tensor
    loss_t2i: Tensor
    neg_text_idx: Tensor | None  # [b] index into the B batch texts per local image, -1 when none exists
    neg_image_idx: Tensor | None  # [b] index into the B batch images per local text


def row_seed(seed: int, global_row: int, direction: int) -> int:
    """A generator seed per (seed, global row, direction): a row's draw does not depend on who computes it."""
    return (seed + (2 * global_row + direction + 1) * 0x9E3779B97F4A7C15) % 2**64


def _keyed_samples(logits_batch: Tensor, positives: Tensor, seed: int, row_offset: int, direction: int) -> Tensor:
    """ALBEF's softmax + multinomial, one generator per global row (keyed by ``row_seed``)."""
    picked = []
    with torch.no_grad():
        weights = torch.softmax(logits_batch.double(), dim=1).masked_fill(positives, 0.0)
        for i, row_weights in enumerate(weights):
            if not positives[i].all():
                generator = torch.Generator(logits_batch.device).manual_seed(row_seed(seed, row_offset + i, direction))
                picked.append(int(torch.multinomial(row_weights, 1, generator=generator)))
            else:
                picked.append(-1)
    return torch.tensor(picked, dtype=torch.int64, device=logits_batch.device)


def itc_loss_local_ref(
    image_rows: Tensor,
    text_rows: Tensor,
    image_columns: Tensor,
    text_columns: Tensor,
    scale: Tensor | float,
    *,
    row_offset: int,
    image_rows_m: Tensor | None = None,
    text_rows_m: Tensor | None = None,
    image_queue: Tensor | None = None,
    text_queue: Tensor | None = None,
    alpha: float = 0.0,
    positive_ids: Tensor | None = None,
    queue_ids: Tensor | None = None,
    hard_negatives: str | None = None,
    seed: int = 0,
) -> ITCLocalOutput:
    """The rows ``[row_offset, row_offset + b)`` of ``itc_loss_ref`` over a batch of B pairs, for one rank of many.

    ``image_rows, text_rows`` ``(b, d)`` are this rank's online features, global rows
    ``row_offset + i`` of the batch; ``image_columns, text_columns`` ``(B, d)`` are the whole batch's
    columns (the gathered online features, or the gathered momentum features in ALBEF mode);
    ``image_rows_m, text_rows_m`` ``(b, d)`` the local momentum features (soft targets, ``alpha > 0``);
    ``positive_ids`` ``(B,)`` the ids of the whole batch. Each loss is the mean over the b rows, so
    the mean over equally sized slices is ``itc_loss_ref``'s loss. Hard negatives index the B batch
    columns; ``"hardest"`` equals ``itc_loss_ref``'s picks, ``"sample"`` draws each row with its own
    generator keyed by (``seed``, global row, direction) instead of one generator for all rows.
    """
    local, batch = image_rows.shape[0], image_columns.shape[0]
    text_all, image_all = text_columns, image_columns
    if text_queue is not None:
        text_all = torch.cat([text_columns, text_queue], dim=0)  # [B + Q, d]
        image_all = torch.cat([image_columns, image_queue], dim=0)
    queue = text_all.shape[0] - batch
    all_positives = positive_mask(positive_ids, queue_ids, batch, queue, image_rows.device)  # [B, B + Q]
    positives = all_positives[row_offset : row_offset + local]  # [b, B + Q]
    scale = torch.as_tensor(scale, dtype=image_rows.dtype, device=image_rows.device)
    loss_i2t, logits_i2t = _direction_loss(image_rows, text_all, scale, image_rows_m, alpha, positives)
    loss_t2i, logits_t2i = _direction_loss(text_rows, image_all, scale, text_rows_m, alpha, positives)
    neg_text = neg_image = None
    if hard_negatives == "hardest":
        neg_text = _hard_negatives(logits_i2t[:, :batch], positives[:, :batch], "hardest", None)
        neg_image = _hard_negatives(logits_t2i[:, :batch], positives[:, :batch], "hardest", None)
    elif hard_negatives == "sample":
        neg_text = _keyed_samples(logits_i2t[:, :batch], positives[:, :batch], seed, row_offset, 0)
        neg_image = _keyed_samples(logits_t2i[:, :batch], positives[:, :batch], seed, row_offset, 1)
    return ITCLocalOutput((loss_i2t + loss_t2i) / 2, loss_i2t, loss_t2i, neg_text, neg_image)
