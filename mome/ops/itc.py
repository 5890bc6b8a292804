"""``mome.ops.itc_loss``: image-text contrastive loss with queue, momentum distillation and hard negatives."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mome.ops._dispatch import BACKENDS as BACKEND_NAMES
from mome.ops._dispatch import OpBackends
from mome.ops._validate import (
    INT_DTYPES,
    check_choice,
    check_device,
    check_float,
    check_same,
    check_shape,
    check_tensor,
)
from mome.reference.itc import ITCOutput

BACKENDS = OpBackends(
    "itc_loss",
    {"reference": "mome.ops._reference_backend", "triton": "mome.kernels.itc"},
)
HARD_NEGATIVES = (None, "sample", "hardest")
_NO_MINING = "none"


def _backend_inputs(image_feats, text_feats, image_feats_m, text_feats_m, image_queue, text_queue, alpha, mining):
    """What the backends' ``unsupported_reason`` sees (the backward repeats the forward's choice from it)."""
    return dict(image_feats=image_feats, text_feats=text_feats, image_feats_m=image_feats_m, text_feats_m=text_feats_m,
                image_queue=image_queue, text_queue=text_queue, alpha=alpha, hard_negatives=mining)  # fmt: skip


@torch.library.custom_op("mome::itc_loss_fwd", mutates_args=())
def _itc_fwd(
    image_feats: Tensor,
    text_feats: Tensor,
    scale: Tensor,
    image_feats_m: Tensor | None,
    text_feats_m: Tensor | None,
    image_queue: Tensor | None,
    text_queue: Tensor | None,
    positive_ids: Tensor | None,
    queue_ids: Tensor | None,
    alpha: float,
    hard_negatives: str,
    seed: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    mining = None if hard_negatives == _NO_MINING else hard_negatives
    features = (image_feats, text_feats, image_feats_m, text_feats_m, image_queue, text_queue)
    module = BACKENDS.module(backend, image_feats.device, _backend_inputs(*features, alpha, mining))
    return module.itc_loss_fwd(
        image_feats,
        text_feats,
        scale,
        image_feats_m,
        text_feats_m,
        image_queue,
        text_queue,
        positive_ids,
        queue_ids,
        alpha=alpha,
        hard_negatives=mining,
        seed=int(seed),
    )


@_itc_fwd.register_fake
def _(image_feats, text_feats, scale, image_feats_m, text_feats_m, image_queue, text_queue, positive_ids, queue_ids,
      alpha, hard_negatives, seed, backend):  # fmt: skip
    batch = image_feats.shape[0]
    loss = image_feats.new_empty((), dtype=torch.float64 if image_feats.dtype == torch.float64 else torch.float32)
    picked = image_feats.new_empty(batch if hard_negatives != _NO_MINING else 0, dtype=torch.int64)
    lse = image_feats.new_empty(batch, dtype=torch.float32)
    return loss, torch.empty_like(loss), picked, torch.empty_like(picked), lse, torch.empty_like(lse)


@torch.library.custom_op("mome::itc_loss_bwd", mutates_args=())
def _itc_bwd(
    d_loss_i2t: Tensor,
    d_loss_t2i: Tensor,
    image_feats: Tensor,
    text_feats: Tensor,
    scale: Tensor,
    image_feats_m: Tensor | None,
    text_feats_m: Tensor | None,
    image_queue: Tensor | None,
    text_queue: Tensor | None,
    positive_ids: Tensor | None,
    queue_ids: Tensor | None,
    lse_i2t: Tensor,
    lse_t2i: Tensor,
    alpha: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    features = (image_feats, text_feats, image_feats_m, text_feats_m, image_queue, text_queue)
    module = BACKENDS.module(backend, image_feats.device, _backend_inputs(*features, alpha, None))
    return module.itc_loss_bwd(
        d_loss_i2t,
        d_loss_t2i,
        image_feats,
        text_feats,
        scale,
        image_feats_m,
        text_feats_m,
        image_queue,
        text_queue,
        positive_ids,
        queue_ids,
        lse_i2t,
        lse_t2i,
        alpha=alpha,
    )


@_itc_bwd.register_fake
def _(d_loss_i2t, d_loss_t2i, image_feats, text_feats, scale, image_feats_m, text_feats_m, image_queue, text_queue,
      positive_ids, queue_ids, lse_i2t, lse_t2i, alpha, backend):  # fmt: skip
    return torch.empty_like(image_feats), torch.empty_like(text_feats), torch.empty_like(scale)


def _itc_setup(ctx, inputs, output):
    (image_feats, text_feats, scale, image_feats_m, text_feats_m, image_queue, text_queue, positive_ids, queue_ids,
     alpha, _hard_negatives, _seed, backend) = inputs  # fmt: skip
    ctx.save_for_backward(
        image_feats, text_feats, scale, image_feats_m, text_feats_m, image_queue, text_queue, positive_ids, queue_ids,
        output[4], output[5],
    )  # fmt: skip
    ctx.alpha, ctx.backend = alpha, backend


def _itc_backward(ctx, d_loss_i2t, d_loss_t2i, _dneg_text, _dneg_image, _dlse_i2t, _dlse_t2i):
    saved = ctx.saved_tensors
    zero = saved[2].new_zeros(())
    d_loss_i2t = zero if d_loss_i2t is None else d_loss_i2t
    d_loss_t2i = zero if d_loss_t2i is None else d_loss_t2i
    d_image, d_text, d_scale = _itc_bwd(d_loss_i2t, d_loss_t2i, *saved, ctx.alpha, ctx.backend)
    return d_image, d_text, d_scale, None, None, None, None, None, None, None, None, None, None


_itc_fwd.register_autograd(_itc_backward, setup_context=_itc_setup)


def _check_features(name: str, value: Tensor, like: Tensor, rows: int | None, like_name: str = "image_feats") -> None:
    check_float(name, value, ndim=2)
    check_same(name, value, like_name, like)
    check_shape(name, value, (rows, like.shape[1]), f"(rows, d) with d = {like.shape[1]}")


def _check_momentum_and_queues(like: Tensor, like_name: str, rows: int, momentum: dict, image_queue, text_queue,
                               alpha: float) -> int:  # fmt: skip
    """Momentum features, queues and alpha, as itc_loss and itc_loss_local take them; returns the queue length."""
    for name, value in momentum.items():
        if value is not None:
            _check_features(name, value, like, rows, like_name)
    if (image_queue is None) != (text_queue is None):
        raise ValueError("image_queue and text_queue go together: pass both or neither")
    queue = 0
    if image_queue is not None:
        _check_features("image_queue", image_queue, like, None, like_name)
        queue = image_queue.shape[0]
        _check_features("text_queue", text_queue, like, queue, like_name)
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if alpha > 0 and any(value is None for value in momentum.values()):
        names = " and ".join(momentum)
        raise ValueError(f"alpha > 0 needs {names}: the soft targets come from momentum features")
    return queue


def _check_id_vector(name: str, ids: Tensor, length: int, what: str, device: torch.device) -> Tensor:
    check_tensor(name, ids, ndim=1, dtypes=INT_DTYPES)
    check_shape(name, ids, (length,), what)
    check_device(name, ids, device, "image_feats")
    return ids.to(torch.int64).contiguous()


def _scale_tensor(scale, image_feats: Tensor) -> Tensor:
    dtype = torch.float64 if image_feats.dtype == torch.float64 else torch.float32
    if isinstance(scale, Tensor):
        if scale.numel() != 1 or not scale.is_floating_point():
            got = f"{tuple(scale.shape)} {scale.dtype}"
            raise ValueError(f"scale must be a float or a one-element float tensor, got {got}")
        check_device("scale", scale, image_feats.device, "image_feats")
        return scale.reshape(()).to(dtype)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or a 0-d tensor, got {type(scale).__name__}")
    return torch.tensor(float(scale), dtype=dtype, device=image_feats.device)


def itc_loss(
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
    backend: str = "auto",
) -> ITCOutput:
    """Symmetric image-text contrastive loss (InfoNCE), open_clip's ClipLoss and ALBEF's ITA as special cases.

    Args:
        image_feats, text_feats: ``(B, d)`` (normalise them first, as both models do).
        scale: float or 0-d tensor multiplying the similarities (open_clip: ``logit_scale.exp()``,
            ALBEF: ``1 / temp``); differentiable when a tensor.
        image_feats_m, text_feats_m: ``(B, d)`` momentum features: they replace the online
            features as columns, and with ``alpha > 0`` give soft targets
            ``alpha · softmax(scale · rows_m @ columns.T) + (1 - alpha) · hard``.
        image_queue, text_queue: ``(Q, d)`` extra negatives appended to the columns.
        positive_ids: ``(B,)`` ints; rows with equal ids are each other's positives
            (default: only the diagonal). queue_ids: ``(Q,)`` ints, the queue entries' ids.
        hard_negatives: ``None | "sample" | "hardest"``: per image one in-batch text that is
            not a positive, drawn ∝ ``exp(logits)`` (ALBEF) or the arg-max; likewise per text.
            -1 when a row's whole batch is positive.
        generator: seeds ``"sample"`` (reproducible).

    Returns ``ITCOutput(loss, loss_i2t, loss_t2i, neg_text_idx, neg_image_idx)``; losses are
    fp32 0-d tensors (fp64 for fp64 features), indices int64 ``(B,)`` or None.

    Equivalent PyTorch (CLIP mode)::

        logits = scale * image_feats @ text_feats.T
        labels = torch.arange(B)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    """
    check_float("image_feats", image_feats, ndim=2)
    batch, dim = image_feats.shape
    if batch == 0 or dim == 0:
        got = tuple(image_feats.shape)
        raise ValueError(f"image_feats must have at least one row and one feature, got shape {got}")
    _check_features("text_feats", text_feats, image_feats, batch)
    momentum = dict(image_feats_m=image_feats_m, text_feats_m=text_feats_m)
    queue = _check_momentum_and_queues(image_feats, "image_feats", batch, momentum, image_queue, text_queue, alpha)
    if positive_ids is not None:
        positive_ids = _check_id_vector("positive_ids", positive_ids, batch, "(one id per pair)", image_feats.device)
    if queue_ids is not None:
        if image_queue is None:
            raise ValueError("queue_ids needs image_queue and text_queue")
        queue_ids = _check_id_vector("queue_ids", queue_ids, queue, "(one id per queue entry)", image_feats.device)
    check_choice("hard_negatives", hard_negatives, HARD_NEGATIVES)
    scale = _scale_tensor(scale, image_feats)
    if hard_negatives == "sample":
        seed = torch.randint(2**62, (), generator=generator, device="cpu" if generator is None else generator.device)
    else:
        seed = torch.zeros((), dtype=torch.int64)
    features = dict(
        image_feats=image_feats,
        text_feats=text_feats,
        image_feats_m=image_feats_m,
        text_feats_m=text_feats_m,
        image_queue=image_queue,
        text_queue=text_queue,
    )
    check_choice("backend", backend, ("auto", *BACKEND_NAMES))
    contiguous = {name: None if t is None else t.contiguous() for name, t in features.items()}
    loss_i2t, loss_t2i, neg_text, neg_image, _lse_i2t, _lse_t2i = _itc_fwd(
        contiguous["image_feats"],
        contiguous["text_feats"],
        scale,
        contiguous["image_feats_m"],
        contiguous["text_feats_m"],
        contiguous["image_queue"],
        contiguous["text_queue"],
        positive_ids,
        queue_ids,
        float(alpha),
        _NO_MINING if hard_negatives is None else hard_negatives,
        seed.cpu(),
        backend,
    )
    mined = hard_negatives is not None
    return ITCOutput(
        (loss_i2t + loss_t2i) / 2,
        loss_i2t,
        loss_t2i,
        neg_text if mined else None,
        neg_image if mined else None,
    )


# --- itc_loss_local: this rank's rows against the global batch (ITCLoss(gather=True)); private to mome ---

LOCAL_BACKENDS = OpBackends(
    "itc_loss_local",
    {"reference": "mome.ops._reference_backend", "triton": "mome.kernels.itc"},
)


class ITCLocalResult(NamedTuple):
    loss: Tensor  # (loss_i2t + loss_t2i) / 2, means over the b local rows
    loss_i2t: Tensor
    loss_t2i: Tensor
    neg_text_idx: Tensor | None  # [b] indices into the B batch texts
    neg_image_idx: Tensor | None  # [b] indices into the B batch images
    lse_i2t: Tensor  # [b] fp32 log-sum-exp of each local image row over [texts; text queue]
    lse_t2i: Tensor  # [b]


def _local_inputs(image_rows, image_rows_m, image_queue, alpha, mining):
    return dict(image_feats=image_rows, image_feats_m=image_rows_m, image_queue=image_queue, alpha=alpha,
                hard_negatives=mining)  # fmt: skip


@torch.library.custom_op("mome::itc_loss_local_fwd", mutates_args=())
def _itc_local_fwd(
    image_rows: Tensor,
    text_rows: Tensor,
    image_columns: Tensor,
    text_columns: Tensor,
    scale: Tensor,
    image_rows_m: Tensor | None,
    text_rows_m: Tensor | None,
    image_queue: Tensor | None,
    text_queue: Tensor | None,
    positive_ids: Tensor | None,
    queue_ids: Tensor | None,
    row_offset: int,
    alpha: float,
    hard_negatives: str,
    seed: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    mining = None if hard_negatives == _NO_MINING else hard_negatives
    inputs = _local_inputs(image_rows, image_rows_m, image_queue, alpha, mining)
    module = LOCAL_BACKENDS.module(backend, image_rows.device, inputs)
    return module.itc_loss_local_fwd(
        image_rows, text_rows, image_columns, text_columns, scale, image_rows_m, text_rows_m, image_queue, text_queue,
        positive_ids, queue_ids, row_offset=row_offset, alpha=alpha, hard_negatives=mining, seed=int(seed),
    )  # fmt: skip


@_itc_local_fwd.register_fake
def _(image_rows, text_rows, image_columns, text_columns, scale, image_rows_m, text_rows_m, image_queue, text_queue,
      positive_ids, queue_ids, row_offset, alpha, hard_negatives, seed, backend):  # fmt: skip
    local = image_rows.shape[0]
    loss = image_rows.new_empty((), dtype=torch.float64 if image_rows.dtype == torch.float64 else torch.float32)
    picked = image_rows.new_empty(local if hard_negatives != _NO_MINING else 0, dtype=torch.int64)
    lse = image_rows.new_empty(local, dtype=torch.float32)
    return loss, torch.empty_like(loss), picked, torch.empty_like(picked), lse, torch.empty_like(lse)


@torch.library.custom_op("mome::itc_loss_local_bwd", mutates_args=())
def _itc_local_bwd(
    d_loss_i2t: Tensor,
    d_loss_t2i: Tensor,
    image_rows: Tensor,
    text_rows: Tensor,
    image_columns: Tensor,
    text_columns: Tensor,
    scale: Tensor,
    image_rows_m: Tensor | None,
    text_rows_m: Tensor | None,
    image_queue: Tensor | None,
    text_queue: Tensor | None,
    positive_ids: Tensor | None,
    queue_ids: Tensor | None,
    lse_i2t: Tensor,
    lse_t2i: Tensor,
    row_offset: int,
    alpha: float,
    column_grads: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    module = LOCAL_BACKENDS.module(backend, image_rows.device, _local_inputs(image_rows, image_rows_m, image_queue,
                                                                             alpha, None))  # fmt: skip
    return module.itc_loss_local_bwd(
        d_loss_i2t, d_loss_t2i, image_rows, text_rows, image_columns, text_columns, scale, image_rows_m, text_rows_m,
        image_queue, text_queue, positive_ids, queue_ids, lse_i2t, lse_t2i, row_offset=row_offset, alpha=alpha,
        column_grads=column_grads,
    )  # fmt: skip


@_itc_local_bwd.register_fake
def _(d_loss_i2t, d_loss_t2i, image_rows, text_rows, image_columns, text_columns, scale, image_rows_m, text_rows_m,
      image_queue, text_queue, positive_ids, queue_ids, lse_i2t, lse_t2i, row_offset, alpha, column_grads,
      backend):  # fmt: skip
    rows = image_columns.shape[0] if column_grads else 0
    d_columns = image_columns.new_empty((rows, image_columns.shape[1]))
    return torch.empty_like(image_rows), torch.empty_like(text_rows), d_columns, torch.empty_like(d_columns), \
        torch.empty_like(scale)  # fmt: skip


def _itc_local_setup(ctx, inputs, output):
    *tensors, row_offset, alpha, _hard_negatives, _seed, backend = inputs
    ctx.save_for_backward(*tensors, output[4], output[5])
    ctx.row_offset, ctx.alpha, ctx.backend = row_offset, alpha, backend


def _itc_local_backward(ctx, d_loss_i2t, d_loss_t2i, _dneg_text, _dneg_image, _dlse_i2t, _dlse_t2i):
    saved = ctx.saved_tensors
    zero = saved[4].new_zeros(())
    d_loss_i2t = zero if d_loss_i2t is None else d_loss_i2t
    d_loss_t2i = zero if d_loss_t2i is None else d_loss_t2i
    column_grads = ctx.alpha == 0 and (ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
    d_image, d_text, d_image_columns, d_text_columns, d_scale = _itc_local_bwd(
        d_loss_i2t, d_loss_t2i, *saved, ctx.row_offset, ctx.alpha, column_grads, ctx.backend
    )
    if not column_grads:
        d_image_columns = d_text_columns = None
    return d_image, d_text, d_image_columns, d_text_columns, d_scale, *([None] * 11)


_itc_local_fwd.register_autograd(_itc_local_backward, setup_context=_itc_local_setup)


def itc_loss_local(
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
    backend: str = "auto",
) -> ITCLocalResult:
    """``itc_loss`` for the rows ``[row_offset, row_offset + b)`` of a batch of B pairs: one rank's share.

    ``image_rows, text_rows`` ``(b, d)``: this rank's online features; ``image_columns, text_columns``
    ``(B, d)``: every rank's features (gathered online ones, differentiable, or momentum ones);
    ``image_rows_m, text_rows_m`` ``(b, d)``: local momentum features for ``alpha > 0`` (the columns
    are then constants); ``positive_ids`` ``(B,)``; queues and ``queue_ids`` as in ``itc_loss``.
    ``seed`` keys the ``"sample"`` draws together with the GLOBAL row, so every rank must pass the
    same seed. Memory and work are O(b·(B + Q)) per rank: no rank computes another's rows.

    Returns ``ITCLocalResult``: losses are means over the b rows (equal b on every rank: the ranks'
    mean is the global loss, and DDP's averaging of their gradients gives the global gradient),
    hard negatives ``(b,)`` index the B batch columns, and the per-row lse ``(b,)``. Specification:
    :func:`mome.reference.itc.itc_loss_local_ref`.
    """
    check_float("image_rows", image_rows, ndim=2)
    local, dim = image_rows.shape
    if local == 0 or dim == 0:
        raise ValueError(f"image_rows must have at least one row and one feature, got shape {tuple(image_rows.shape)}")
    _check_features("text_rows", text_rows, image_rows, local, "image_rows")
    check_float("image_columns", image_columns, ndim=2)
    batch = image_columns.shape[0]
    _check_features("image_columns", image_columns, image_rows, None, "image_rows")
    _check_features("text_columns", text_columns, image_rows, batch, "image_rows")
    if isinstance(row_offset, bool) or not isinstance(row_offset, int):
        raise TypeError(f"row_offset must be an int, got {type(row_offset).__name__}")
    if not 0 <= row_offset <= batch - local:
        raise ValueError(f"row_offset must lie in [0, B - b] = [0, {batch - local}] (B = {batch} columns, "
                         f"b = {local} rows), got {row_offset}")  # fmt: skip
    momentum = dict(image_rows_m=image_rows_m, text_rows_m=text_rows_m)
    queue = _check_momentum_and_queues(image_rows, "image_rows", local, momentum, image_queue, text_queue, alpha)
    if alpha > 0 and (image_columns.requires_grad or text_columns.requires_grad):
        raise ValueError("alpha > 0 takes momentum columns, constants: pass image_columns/text_columns detached")
    if positive_ids is not None:
        positive_ids = _check_id_vector("positive_ids", positive_ids, batch, "(one id per column)", image_rows.device)
    if queue_ids is not None:
        if image_queue is None:
            raise ValueError("queue_ids needs image_queue and text_queue")
        queue_ids = _check_id_vector("queue_ids", queue_ids, queue, "(one id per queue entry)", image_rows.device)
    check_choice("hard_negatives", hard_negatives, HARD_NEGATIVES)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    check_choice("backend", backend, ("auto", *BACKEND_NAMES))

    def contiguous(t):
        return None if t is None else t.contiguous()

    loss_i2t, loss_t2i, neg_text, neg_image, lse_i2t, lse_t2i = _itc_local_fwd(
        *(contiguous(t) for t in (image_rows, text_rows, image_columns, text_columns)),
        _scale_tensor(scale, image_rows),
        *(contiguous(t) for t in (image_rows_m, text_rows_m, image_queue, text_queue)),
        positive_ids,
        queue_ids,
        row_offset,
        float(alpha),
        _NO_MINING if hard_negatives is None else hard_negatives,
        torch.tensor(seed, dtype=torch.int64),
        backend,
    )
    mined = hard_negatives is not None
    return ITCLocalResult(
        (loss_i2t + loss_t2i) / 2,
        loss_i2t,
        loss_t2i,
        neg_text if mined else None,
        neg_image if mined else None,
        lse_i2t,
        lse_t2i,
    )


# Reference launchers of itc_loss_local (the launcher contract of mome.ops._reference_backend): the spec in the
# compute dtype, and its vector-Jacobian product for the backward.
