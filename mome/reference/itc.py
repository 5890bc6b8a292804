"""Image-text contrastive loss with queue, momentum distillation and hard negatives: the specification.

open_clip's ClipLoss (``scale = logit_scale.exp()``, no queue, no momentum), ALBEF's ITA loss
(``scale = 1 / temp``, momentum features, queue, ``alpha``), BLIP's and BLIP-2's ITC (label smoothing,
image features with query tokens, negatives mined from the online similarities) and open_clip's SigLipLoss
(``loss="sigmoid"`` with ``logit_bias``) are all special cases. Materialises the ``b × (B + Q)`` logits
and targets in both directions: ``O(b·(B + Q))`` memory (``B²`` for a whole batch; ``× NQ`` with query
tokens), which the fused kernel avoids.

One form serves every call: ``b`` rows, the global rows ``[row_offset, row_offset + b)`` of a
batch of ``B`` pairs whose columns are given (one rank's share of a gathered batch); the whole
batch is the case ``b = B``, ``row_offset = 0``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mome.reference._launch import ALL_FLOAT_DTYPES, compute_dtype, vjp, widen

LOSSES = ("softmax", "sigmoid")


class ITCOutput(NamedTuple):
    loss: Tensor  # (loss_i2t + loss_t2i) / 2
    loss_i2t: Tensor
    loss_t2i: Tensor
    neg_text_idx: Tensor | None  # [b] in-batch text index per image, -1 when none exists
    neg_image_idx: Tensor | None  # [b] in-batch image index per text


def sample_seed(generator: torch.Generator | None) -> Tensor:
    """The seed of one ``"sample"`` call, a 0-d int64 CPU tensor drawn from ``generator`` (else torch's global RNG).

    ``mome.ops.itc_loss`` draws it the same way, so the spec and every backend key their draws alike.
    """
    device = "cpu" if generator is None else generator.device
    return torch.randint(2**62, (), generator=generator, device=device).cpu()


def positive_mask(positive_ids: Tensor | None, queue_ids: Tensor | None, batch: int, queue: int, device) -> Tensor:
    """``(B, B + Q)`` bool: batch column j is positive for row i iff j == i or their ids agree (default: j == i);
    queue column q iff ``queue_ids[q] == positive_ids[i]`` (never, without queue ids).

    A negative id (``FeatureQueue``'s -1 for an empty slot) is no id: it matches nothing, so a pair with a
    negative id has only itself as a positive and a queue entry with one is a negative of every row.
    """
    same_pair = torch.eye(batch, dtype=torch.bool, device=device)
    if positive_ids is None:
        in_batch = same_pair
        ids = torch.arange(batch, device=device)
    else:
        ids = positive_ids
        in_batch = same_pair | ((ids[:, None] == ids[None, :]) & (ids[:, None] >= 0))
    if queue_ids is None:
        in_queue = torch.zeros(batch, queue, dtype=torch.bool, device=device)
    else:
        in_queue = (ids[:, None] == queue_ids[None, :]) & (queue_ids[None, :] >= 0)
    return torch.cat([in_batch, in_queue], dim=1)


def similarity(rows: Tensor, columns: Tensor) -> Tensor:
    """``[b, N]`` similarities of rows ``(b, d)`` and columns ``(N, d)``: dot products.

    Image features with query tokens ``(n, NQ, d)`` (BLIP-2's Q-Former), on either side, give the max over
    their NQ dot products; its gradient flows to the arg-max query token alone, the first one on ties
    (``torch.max``'s convention).
    """
    if rows.dim() == 3:  # image rows [b, NQ, d] against text columns [N, d]
        return torch.einsum("bqd,nd->bnq", rows, columns).max(dim=-1).values
    if columns.dim() == 3:  # text rows [b, d] against image columns [N, NQ, d]
        return torch.einsum("bd,nqd->bnq", rows, columns).max(dim=-1).values
    return rows @ columns.T


class LossOptions(NamedTuple):
    """How the logits become a loss (the spec's view of ``ITCOptions``' loss fields)."""

    alpha: float = 0.0  # distillation weight (softmax only)
    label_smoothing: float = 0.0  # softmax only, as F.cross_entropy defines it
    loss: str = "softmax"  # or "sigmoid" (SigLIP)
    logit_bias: Tensor | float | None = None  # sigmoid only: added to every logit


def _direction_loss(
    rows: Tensor, columns: Tensor, scale: Tensor, rows_m: Tensor | None, positives: Tensor, how: LossOptions
) -> tuple[Tensor, Tensor]:
    """One direction's loss (the mean over its rows) and its logits ``scale · similarity`` (without the bias).

    softmax, as ALBEF writes it: ``-sum(target · log_softmax)``, targets uniform over the positives, mixed with
    ``alpha · softmax(momentum logits)``, then smoothed as ``F.cross_entropy(label_smoothing=ε)`` smooths:
    ``(1 - ε) · target + ε / N`` over the N candidate columns. sigmoid, as open_clip's SigLipLoss writes it:
    ``-logsigmoid(label · (logits + bias))`` summed over the columns, label +1 on positives and -1 elsewhere.
    """
    logits = scale * similarity(rows, columns)  # [b, B + Q]
    if how.loss == "sigmoid":
        labels = 2 * positives.to(logits.dtype) - 1
        bias = 0.0 if how.logit_bias is None else how.logit_bias
        return -F.logsigmoid(labels * (logits + bias)).sum(dim=1).mean(), logits
    with torch.no_grad():
        targets = positives.to(logits.dtype)
        targets = targets / targets.sum(dim=1, keepdim=True)
        if how.alpha > 0:
            logits_m = scale * similarity(rows_m, columns)
            targets = how.alpha * torch.softmax(logits_m, dim=1) + (1 - how.alpha) * targets
        if how.label_smoothing > 0:
            targets = (1 - how.label_smoothing) * targets + how.label_smoothing / targets.shape[1]
    loss = -(torch.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()
    return loss, logits


def row_seed(seed: int, global_row: int, direction: int) -> int:
    """A generator seed per (seed, global row, direction): a row's draw does not depend on who computes it."""
    return (seed + (2 * global_row + direction + 1) * 0x9E3779B97F4A7C15) % 2**64


def _hard_negatives(
    logits_batch: Tensor, positives: Tensor, mode: str, seed: int, row_offset: int, direction: int
) -> Tensor:
    """Per row, one in-batch column that is not a positive; -1 when the row has no negative or its logits
    are not all finite (its softmax weights are undefined: the loss is NaN, and that is what to look at).

    ``"hardest"``: the arg-max over the negatives. ``"sample"``: ALBEF's softmax + multinomial, with one
    generator per global row and direction, keyed by ``row_seed``: the draws do not depend on how the rows
    are split among ranks. (The Triton kernel keys Philox noise by the same triple and draws by Gumbel-max:
    the same distribution, another stream.)
    """
    with torch.no_grad():
        defined = ~positives.all(dim=1) & torch.isfinite(logits_batch).all(dim=1)  # [b]
        if mode == "hardest":
            picked = logits_batch.masked_fill(positives, float("-inf")).argmax(dim=1)
            return picked.masked_fill(~defined, -1)
        # softmax over the negatives only: the same distribution as ALBEF's zeroed full softmax, but the
        # largest negative weighs 1, so strong positives cannot underflow every negative to 0
        weights = torch.softmax(logits_batch.double().masked_fill(positives, float("-inf")), dim=1)  # [b, B]
        picked = torch.full((logits_batch.shape[0],), -1, dtype=torch.int64, device=logits_batch.device)
        for i in defined.nonzero().flatten().tolist():
            generator = torch.Generator(logits_batch.device).manual_seed(row_seed(seed, row_offset + i, direction))
            picked[i] = torch.multinomial(weights[i], 1, generator=generator)[0]
        return picked


def itc_loss_rows_ref(
    image_rows: Tensor,
    text_rows: Tensor,
    image_columns: Tensor,
    text_columns: Tensor,
    scale: Tensor | float,
    *,
    row_offset: int = 0,
    image_feats_m: Tensor | None = None,
    text_feats_m: Tensor | None = None,
    image_queue: Tensor | None = None,
    text_queue: Tensor | None = None,
    alpha: float = 0.0,
    positive_ids: Tensor | None = None,
    queue_ids: Tensor | None = None,
    hard_negatives: str | None = None,
    seed: int = 0,
    label_smoothing: float = 0.0,
    loss: str = "softmax",
    logit_bias: Tensor | float | None = None,
    mining_image_columns: Tensor | None = None,
    mining_text_columns: Tensor | None = None,
) -> ITCOutput:
    """The rows ``[row_offset, row_offset + b)`` of a batch of B pairs against the whole batch's columns.

    ``image_rows, text_rows`` ``(b, d)``: online features of global rows ``row_offset + i``;
    ``image_columns, text_columns`` ``(B, d)``: the batch's columns (online features, or momentum
    features in ALBEF mode); ``image_feats_m, text_feats_m`` ``(b, d)``: the rows' momentum features
    (soft targets, ``alpha > 0``); queues ``(Q, d)``; ``positive_ids`` ``(B,)`` the batch's ids,
    ``queue_ids`` ``(Q,)`` (see :func:`positive_mask`). Every image tensor may carry query tokens,
    ``(n, NQ, d)``: the similarity is then the max over them (:func:`similarity`). i2t columns are
    ``[text_columns; text_queue]``, t2i columns ``[image_columns; image_queue]``; the loss of each
    direction is :func:`_direction_loss`'s (``loss``, ``alpha``, ``label_smoothing``, ``logit_bias``),
    the mean over the b rows, so the mean over equally sized slices is the whole batch's loss. Hard
    negatives index the B batch columns; they are drawn from ``softmax(scale · similarity)`` of the rows
    against ``mining_*_columns`` ``(B, d)`` when given (BLIP: the online features, where the loss's columns
    are momentum features), else against the batch columns of the loss; ``"sample"`` draws per row keyed
    by (``seed``, global row, direction).
    """
    local, batch = image_rows.shape[0], image_columns.shape[0]
    text_all, image_all = text_columns, image_columns
    if text_queue is not None:
        text_all = torch.cat([text_columns, text_queue], dim=0)  # [B + Q, d]
        image_all = torch.cat([image_columns, image_queue], dim=0)
    queue = text_all.shape[0] - batch
    positives = positive_mask(positive_ids, queue_ids, batch, queue, image_rows.device)[row_offset : row_offset + local]
    scale = torch.as_tensor(scale, dtype=image_rows.dtype, device=image_rows.device)
    how = LossOptions(alpha, label_smoothing, loss, logit_bias)
    loss_i2t, logits_i2t = _direction_loss(image_rows, text_all, scale, image_feats_m, positives, how)
    loss_t2i, logits_t2i = _direction_loss(text_rows, image_all, scale, text_feats_m, positives, how)
    neg_text = neg_image = None
    if hard_negatives is not None:
        in_batch = positives[:, :batch]  # [b, B]
        with torch.no_grad():
            mined_i2t, mined_t2i = logits_i2t[:, :batch], logits_t2i[:, :batch]
            if mining_text_columns is not None:
                mined_i2t = scale * similarity(image_rows, mining_text_columns)
            if mining_image_columns is not None:
                mined_t2i = scale * similarity(text_rows, mining_image_columns)
        neg_text = _hard_negatives(mined_i2t, in_batch, hard_negatives, seed, row_offset, 0)
        neg_image = _hard_negatives(mined_t2i, in_batch, hard_negatives, seed, row_offset, 1)
    return ITCOutput((loss_i2t + loss_t2i) / 2, loss_i2t, loss_t2i, neg_text, neg_image)


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
    label_smoothing: float = 0.0,
    loss: str = "softmax",
    logit_bias: Tensor | float | None = None,
    hard_negative_source: str = "loss",
    detach_columns: bool = False,
    queue_layout: str = "rows",
) -> ITCOutput:
    """Symmetric contrastive loss over image features ``(B, d)`` or ``(B, NQ, d)`` and text features ``(B, d)``.

    The whole batch as its own rows (:func:`itc_loss_rows_ref` with ``b = B``): i2t columns are
    ``[text_feats_m or text_feats; text_queue]``, t2i columns ``[image_feats_m or image_feats;
    image_queue]``; ``detach_columns``: the online columns are constants. Queues are ``(Q, d)``, or
    ``(d, Q)`` with ``queue_layout="columns"`` (ALBEF's buffers). ``hard_negative_source="similarity"``
    mines against the online features even where momentum features are the loss's columns (BLIP);
    ``"loss"`` against the loss's batch columns (ALBEF). ``"sample"`` draws one seed from ``generator``
    (:func:`sample_seed`, as ``mome.ops.itc_loss`` does), then each row's negative with a generator keyed
    by (seed, row, direction).
    """
    seed = int(sample_seed(generator)) if hard_negatives == "sample" else 0
    if queue_layout == "columns" and image_queue is not None:
        image_queue, text_queue = image_queue.T, text_queue.T
    image_columns = image_feats if image_feats_m is None else image_feats_m
    text_columns = text_feats if text_feats_m is None else text_feats_m
    if detach_columns:
        image_columns, text_columns = image_columns.detach(), text_columns.detach()
    mining = {}
    if hard_negative_source == "similarity":
        mining = dict(mining_image_columns=image_feats.detach(), mining_text_columns=text_feats.detach())
    return itc_loss_rows_ref(
        image_feats,
        text_feats,
        image_columns,
        text_columns,
        scale,
        image_feats_m=image_feats_m,
        text_feats_m=text_feats_m,
        image_queue=image_queue,
        text_queue=text_queue,
        alpha=alpha,
        positive_ids=positive_ids,
        queue_ids=queue_ids,
        hard_negatives=hard_negatives,
        seed=seed,
        label_smoothing=label_smoothing,
        loss=loss,
        logit_bias=logit_bias,
        **mining,
    )


# --- launchers of the ITC backend contract (mome.ops.itc.ITCBackend) ---

# Everything: image features with any number of query tokens, both losses, label smoothing, mining columns.
LIMITS = {
    "dtypes": ALL_FLOAT_DTYPES,
    "query_tokens": (1, None),
    "sigmoid_loss": (0, 1),
    "label_smoothing": (0, 1),
    "mining_columns": (0, 1),
}
# The options' floating tensors, constants of every call (never differentiated), in the order _spec takes them.
_CONSTANTS = (
    "image_feats_m",
    "text_feats_m",
    "image_queue",
    "text_queue",
    "mining_image_columns",
    "mining_text_columns",
)


def _spec(options, row_offset: int, hard_negatives: str | None = None, seed: int = 0):
    """The spec as a function of the floating tensors (the features, ``scale``, then ``_CONSTANTS``), the rest
    bound. ``scale`` is 0-d, or ``(2,)`` = (scale, logit bias) for the sigmoid loss."""

    def forward(image_rows, text_rows, image_columns, text_columns, scale, *constants):
        scale, bias = (scale[0], scale[1]) if options.loss == "sigmoid" else (scale, None)
        return itc_loss_rows_ref(
            image_rows,
            text_rows,
            image_columns,
            text_columns,
            scale,
            row_offset=row_offset,
            **dict(zip(_CONSTANTS, constants, strict=True)),
            alpha=options.alpha,
            positive_ids=options.positive_ids,
            queue_ids=options.queue_ids,
            hard_negatives=hard_negatives,
            seed=seed,
            label_smoothing=options.label_smoothing,
            loss=options.loss,
            logit_bias=bias,
        )

    return forward


def _constants(options) -> list[Tensor | None]:
    return [getattr(options, name) for name in _CONSTANTS]


def itc_loss_fwd(image_rows, text_rows, image_columns, text_columns, scale, options, row_offset, hard_negatives, seed):
    dtype = compute_dtype(image_rows)
    wide = [widen(t, dtype) for t in (image_rows, text_rows, image_columns, text_columns, scale, *_constants(options))]
    result = _spec(options, row_offset, hard_negatives, seed)(*wide)

    def picked(indices):  # a fresh tensor per output: custom-op outputs must not alias each other
        return image_rows.new_empty(0, dtype=torch.int64) if indices is None else indices

    if options.loss == "sigmoid":  # no log-sum-exp: nothing to save
        lse_i2t, lse_t2i = (image_rows.new_empty(0, dtype=torch.float32) for _ in range(2))
    else:
        image_rows_, text_rows_, image_columns_, text_columns_, scale_, _, _, image_queue, text_queue = wide[:9]
        text_all = torch.cat([c for c in (text_columns_, text_queue) if c is not None])  # [B + Q, d]
        image_all = torch.cat([c for c in (image_columns_, image_queue) if c is not None])
        lse_i2t = torch.logsumexp(scale_ * similarity(image_rows_, text_all), dim=1).float()  # [b]
        lse_t2i = torch.logsumexp(scale_ * similarity(text_rows_, image_all), dim=1).float()
    return (
        result.loss_i2t.to(dtype),
        result.loss_t2i.to(dtype),
        picked(result.neg_text_idx),
        picked(result.neg_image_idx),
        lse_i2t,
        lse_t2i,
    )


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
    """The VJP of the spec: only what gets a gradient is differentiated, the rest are constants.

    ``clip``: the rows are the columns (whole batch, online), so the rows' gradient includes their part
    as columns; ``column_grads = (image, text)`` asks for the columns' own gradients (else ``(0, ...)``).
    """
    spec = _spec(options, row_offset)
    constants = _constants(options)
    grad_image_columns, grad_text_columns = column_grads

    def losses(image_rows_, text_rows_, scale_, image_columns_, text_columns_):
        dtype = image_rows_.dtype
        if clip:
            image_columns_, text_columns_ = image_rows_, text_rows_
        image_columns_ = image_columns.to(dtype) if image_columns_ is None else image_columns_
        text_columns_ = text_columns.to(dtype) if text_columns_ is None else text_columns_
        wide = [widen(t, dtype) for t in constants]
        result = spec(image_rows_, text_rows_, image_columns_, text_columns_, scale_, *wide)
        return result.loss_i2t, result.loss_t2i

    inputs = [
        image_rows,
        text_rows,
        scale,
        image_columns if grad_image_columns and not clip else None,
        text_columns if grad_text_columns and not clip else None,
    ]
    d_image, d_text, d_scale, d_image_columns, d_text_columns = vjp(losses, inputs, [d_loss_i2t, d_loss_t2i])
    if d_image_columns is None:
        d_image_columns = image_columns.new_empty((0, *image_columns.shape[1:]))
    if d_text_columns is None:
        d_text_columns = text_columns.new_empty((0, *text_columns.shape[1:]))
    return d_image, d_text, d_image_columns, d_text_columns, d_scale
