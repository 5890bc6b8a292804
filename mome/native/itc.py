"""The ITC loss on CPU tensors: one similarity GEMM per direction, and the backward written out.

Per direction (i2t: image rows against ``[text columns; text queue]``, t2i the other way) the forward forms the
logits once, their log-sum-exp and the loss ``-sum(target · (logits - lse))`` averaged over the rows, with the
spec's targets (uniform over the positives of ``positive_mask``, mixed with ``alpha · softmax(momentum logits)``).
The backward recomputes the logits (one GEMM) and applies ``d logits = d loss / b · (softmax · sum(target) -
target)`` to the rows, the columns and the scale: three GEMMs per direction, no autograd graph, no second
forward. The hard negatives are the spec's own draws (``mome.reference.itc``), so ``"sample"`` gives the same
picks as the reference for the same seed. Memory is the dense ``b × (B + Q)`` logits of one direction at a time,
what the reference holds too; CPU batches are small.

Options this backend does not name in LIMITS (query tokens, the sigmoid loss, label smoothing, mining columns)
are declined by ``mome.ops.itc`` before any launch, and ``auto`` runs the reference for them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mome.reference import itc as reference
from mome.reference._launch import ALL_FLOAT_DTYPES, compute_dtype, widen

LIMITS = {"dtypes": {"cpu": ALL_FLOAT_DTYPES}}


def _with_queue(columns: Tensor, queue: Tensor | None) -> Tensor:
    return columns if queue is None else torch.cat([columns, queue])  # [B + Q, d]


def _positives(options, batch: int, queue: int, row_offset: int, rows: int, device) -> Tensor:
    table = reference.positive_mask(options.positive_ids, options.queue_ids, batch, queue, device)
    return table[row_offset : row_offset + rows]  # [b, B + Q]


def _targets(positives: Tensor, scale: Tensor, rows_m: Tensor | None, columns: Tensor, alpha: float) -> Tensor:
    """The spec's soft targets ``[b, B + Q]``: uniform over the positives, mixed with the momentum softmax."""
    targets = positives.to(columns.dtype)
    targets = targets / targets.sum(dim=1, keepdim=True)
    if alpha > 0:
        targets = alpha * torch.softmax(scale * rows_m @ columns.T, dim=1) + (1 - alpha) * targets
    return targets


def _inputs(image_rows, text_rows, image_columns, text_columns, scale, options):
    """Everything in the compute dtype, as two directions ``(rows, rows_m, columns with queue)``, and the scale."""
    dtype = compute_dtype(image_rows)
    wide = [widen(t, dtype) for t in (image_rows, text_rows, image_columns, text_columns, scale)]
    image_rows, text_rows, image_columns, text_columns, scale = wide
    image_m, text_m, image_queue, text_queue = (
        widen(t, dtype) for t in (options.image_feats_m, options.text_feats_m, options.image_queue, options.text_queue)
    )
    i2t = (image_rows, image_m, _with_queue(text_columns, text_queue))
    t2i = (text_rows, text_m, _with_queue(image_columns, image_queue))
    return (i2t, t2i), scale


def itc_loss_fwd(image_rows, text_rows, image_columns, text_columns, scale, options, row_offset, hard_negatives, seed):
    directions, scale_ = _inputs(image_rows, text_rows, image_columns, text_columns, scale, options)
    rows, batch = image_rows.shape[0], image_columns.shape[0]
    queue = directions[0][2].shape[0] - batch
    positives = _positives(options, batch, queue, row_offset, rows, image_rows.device)
    losses, picks, lses = [], [], []
    for direction, (rows_, rows_m, columns) in enumerate(directions):
        logits = scale_ * rows_ @ columns.T  # [b, B + Q]
        lse = torch.logsumexp(logits, dim=1)  # [b]
        targets = _targets(positives, scale_, rows_m, columns, options.alpha)
        losses.append(-(targets * (logits - lse[:, None])).sum(dim=1).mean())
        lses.append(lse.float())
        if hard_negatives is None:
            picks.append(image_rows.new_empty(0, dtype=torch.int64))
        else:
            batch_logits, in_batch = logits[:, :batch], positives[:, :batch]
            picks.append(reference._hard_negatives(batch_logits, in_batch, hard_negatives, seed, row_offset, direction))
    return losses[0], losses[1], picks[0], picks[1], lses[0], lses[1]


def itc_loss_bwd(
    d_loss_i2t,
    d_loss_t2i,
    image_rows,
    text_rows,
    image_columns,
    text_columns,
    scale,
    options,
    lse_i2t,
    lse_t2i,
    row_offset,
    clip,
    column_grads,
):
    """``clip``: the rows are the columns, so each direction's column gradient joins the other's row gradient."""
    directions, scale_ = _inputs(image_rows, text_rows, image_columns, text_columns, scale, options)
    rows, batch = image_rows.shape[0], image_columns.shape[0]
    queue = directions[0][2].shape[0] - batch
    positives = _positives(options, batch, queue, row_offset, rows, image_rows.device)
    d_scale = torch.zeros((), dtype=scale_.dtype, device=scale_.device)
    d_rows, d_columns = [], []
    for d_loss, (rows_, rows_m, columns) in zip((d_loss_i2t, d_loss_t2i), directions, strict=True):
        similarity = rows_ @ columns.T  # [b, B + Q]
        targets = _targets(positives, scale_, rows_m, columns, options.alpha)
        # the log-sum-exp is recomputed rather than read back: the saved one is fp32
        d_logits = torch.softmax(scale_ * similarity, dim=1) * targets.sum(dim=1, keepdim=True) - targets
        d_logits *= d_loss.to(scale_.dtype) / rows
        d_scale += (d_logits * similarity).sum()
        d_logits *= scale_
        d_rows.append(d_logits @ columns)  # [b, d]
        d_columns.append(d_logits[:, :batch].T @ rows_)  # [B, d]: the queue is constant
    d_image, d_text = d_rows
    d_text_columns, d_image_columns = d_columns
    if clip:
        d_image, d_text = d_image + d_image_columns, d_text + d_text_columns
    dim = image_rows.shape[1]
    keep_image, keep_text = (wanted and not clip for wanted in column_grads)
    d_image_columns = d_image_columns.to(image_columns.dtype) if keep_image else image_columns.new_empty((0, dim))
    d_text_columns = d_text_columns.to(text_columns.dtype) if keep_text else text_columns.new_empty((0, dim))
    d_image, d_text, d_scale = d_image.to(image_rows.dtype), d_text.to(text_rows.dtype), d_scale.to(scale.dtype)
    return d_image, d_text, d_image_columns, d_text_columns, d_scale
