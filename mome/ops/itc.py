"""``mome.ops.itc_loss``: image-text contrastive loss with queue, momentum distillation and hard negatives.

One custom op (``mome::itc_loss_fwd`` / ``mome::itc_loss_bwd``) in the local form: b rows, the global rows
``[row_offset, row_offset + b)`` of a batch of B pairs, against the B batch columns (plus a queue). The whole
batch (:func:`itc_loss`) is the case b = B, ``row_offset = 0``; one rank's share of a gathered batch
(``ITCLoss(gather=True)``, :func:`itc_loss_rows`) is the general case. The op's ``clip`` flag says that the
rows are also the columns (whole batch, online features both sides): the backward's row kernel of each
direction then serves the other direction's column gradient too, and two kernels make the whole backward.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from mome.ops._backend import Family, OpBackends, check_backend
from mome.ops._functorch import transforms_active
from mome.ops._validate import (
    INT_DTYPES,
    check_choice,
    check_device,
    check_float,
    check_same,
    check_shape,
    check_tensor,
    describe,
)
from mome.reference.itc import ITCOutput, sample_seed
from mome.reference.itc import itc_loss_fwd as _specification

HARD_NEGATIVES = (None, "sample", "hardest")
_NO_MINING = "none"  # custom-op schemas take str, not Optional[str]


class ITCOptions(NamedTuple):
    """The optional inputs of one ITC call, as the launchers take them (validated, contiguous, ids int64)."""

    image_feats_m: Tensor | None = None  # [b, d] momentum features of the rows: soft targets when alpha > 0
    text_feats_m: Tensor | None = None  # [b, d]
    image_queue: Tensor | None = None  # [Q, d] extra t2i columns
    text_queue: Tensor | None = None  # [Q, d] extra i2t columns
    positive_ids: Tensor | None = None  # [B] ids of the batch pairs; negative = no id (only its own pair)
    queue_ids: Tensor | None = None  # [Q] ids of the queue entries; negative = matches no row
    alpha: float = 0.0  # distillation weight


class ITCRowsOutput(NamedTuple):
    loss: Tensor  # (loss_i2t + loss_t2i) / 2, each the mean over the b rows
    loss_i2t: Tensor
    loss_t2i: Tensor
    neg_text_idx: Tensor | None  # [b] indices into the B batch texts, -1 when none is defined
    neg_image_idx: Tensor | None  # [b] indices into the B batch images
    lse_i2t: Tensor  # [b] fp32 log-sum-exp of each image row over [texts; text queue]
    lse_t2i: Tensor  # [b]


class ITCBackend(Protocol):
    """Launchers of the ITC family. Forward: ``(loss_i2t, loss_t2i, neg_text, neg_image, lse_i2t, lse_t2i)``, the
    losses 0-d fp32 (fp64 for fp64 rows) means over the b rows, the picks ``(b,)`` int64 (``(0,)`` without mining),
    the fp32 lse ``(b,)``. Backward: ``(d image_rows, d text_rows, d image_columns, d text_columns, d scale)``; a
    column gradient is ``(0, d)`` unless ``column_grads`` asks for it, and with ``clip`` the rows' gradient holds
    their part as columns."""

    def itc_loss_fwd(
        self,
        image_rows: Tensor,
        text_rows: Tensor,
        image_columns: Tensor,
        text_columns: Tensor,
        scale: Tensor,
        options: ITCOptions,
        row_offset: int,
        hard_negatives: str | None,
        seed: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]: ...

    def itc_loss_bwd(
        self,
        d_loss_i2t: Tensor,
        d_loss_t2i: Tensor,
        image_rows: Tensor,
        text_rows: Tensor,
        image_columns: Tensor,
        text_columns: Tensor,
        scale: Tensor,
        options: ITCOptions,
        lse_i2t: Tensor,
        lse_t2i: Tensor,
        row_offset: int,
        clip: bool,
        column_grads: tuple[bool, bool],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]: ...


FAMILY = Family(
    "itc",
    ITCBackend,
    sizes={
        "feature_dim": "d, the width of every feature",
        "rows": "b, the rows of one call",
        "columns": "B + Q, the batch columns and the queue",
    },
)


def _measure(inputs: dict):
    image_rows, image_columns, options = inputs["image_rows"], inputs["image_columns"], inputs["options"]
    queue = 0 if options.image_queue is None else options.image_queue.shape[0]
    sizes = {"feature_dim": image_rows.shape[1], "rows": image_rows.shape[0], "columns": image_columns.shape[0] + queue}
    return image_rows.dtype, image_rows.device, sizes


BACKENDS = OpBackends("itc_loss", FAMILY, {"reference": "mome.reference.itc", "triton": "mome.kernels.itc"}, _measure)


def _module(backend: str, image_rows: Tensor, image_columns: Tensor, options: ITCOptions):
    return BACKENDS.module(backend, dict(image_rows=image_rows, image_columns=image_columns, options=options))


# The custom ops take the options flattened (their schema has no structs); everything else takes ITCOptions.
_FEATURES = 5  # image_rows, text_rows, image_columns, text_columns, scale
_OPTIONS = len(ITCOptions._fields)


@torch.library.custom_op("mome::itc_loss_fwd", mutates_args=())
def _itc_fwd(
    image_rows: Tensor,
    text_rows: Tensor,
    image_columns: Tensor,
    text_columns: Tensor,
    scale: Tensor,
    image_feats_m: Tensor | None,
    text_feats_m: Tensor | None,
    image_queue: Tensor | None,
    text_queue: Tensor | None,
    positive_ids: Tensor | None,
    queue_ids: Tensor | None,
    alpha: float,
    row_offset: int,
    hard_negatives: str,
    seed: Tensor,
    clip: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    options = ITCOptions(image_feats_m, text_feats_m, image_queue, text_queue, positive_ids, queue_ids, alpha)
    mining = None if hard_negatives == _NO_MINING else hard_negatives
    module = _module(backend, image_rows, image_columns, options)
    features = (image_rows, text_rows, image_columns, text_columns, scale)
    return module.itc_loss_fwd(*features, options, row_offset, mining, int(seed))


@_itc_fwd.register_fake
def _(image_rows, *rest):
    *_, hard_negatives, _seed, _clip, _backend = rest
    rows = image_rows.shape[0]
    loss = image_rows.new_empty((), dtype=torch.float64 if image_rows.dtype == torch.float64 else torch.float32)
    picks = [image_rows.new_empty(rows if hard_negatives != _NO_MINING else 0, dtype=torch.int64) for _ in range(2)]
    return loss, torch.empty_like(loss), *picks, *[image_rows.new_empty(rows, dtype=torch.float32) for _ in range(2)]


@torch.library.custom_op("mome::itc_loss_bwd", mutates_args=())
def _itc_bwd(
    d_loss_i2t: Tensor,
    d_loss_t2i: Tensor,
    image_rows: Tensor,
    text_rows: Tensor,
    image_columns: Tensor,
    text_columns: Tensor,
    scale: Tensor,
    image_feats_m: Tensor | None,
    text_feats_m: Tensor | None,
    image_queue: Tensor | None,
    text_queue: Tensor | None,
    positive_ids: Tensor | None,
    queue_ids: Tensor | None,
    alpha: float,
    lse_i2t: Tensor,
    lse_t2i: Tensor,
    row_offset: int,
    clip: bool,
    grad_image_columns: bool,
    grad_text_columns: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    options = ITCOptions(image_feats_m, text_feats_m, image_queue, text_queue, positive_ids, queue_ids, alpha)
    module = _module(backend, image_rows, image_columns, options)
    features = (image_rows, text_rows, image_columns, text_columns, scale)
    column_grads = (grad_image_columns, grad_text_columns)
    return module.itc_loss_bwd(
        d_loss_i2t, d_loss_t2i, *features, options, lse_i2t, lse_t2i, row_offset, clip, column_grads
    )


@_itc_bwd.register_fake
def _(d_loss_i2t, d_loss_t2i, image_rows, text_rows, image_columns, text_columns, scale, *rest):
    grad_image_columns, grad_text_columns = rest[-3], rest[-2]
    dim = image_columns.shape[1]
    d_image_columns = image_columns.new_empty((image_columns.shape[0] if grad_image_columns else 0, dim))
    d_text_columns = text_columns.new_empty((text_columns.shape[0] if grad_text_columns else 0, dim))
    d_rows = torch.empty_like(image_rows), torch.empty_like(text_rows)
    return *d_rows, d_image_columns, d_text_columns, torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    tensors = inputs[: _FEATURES + _OPTIONS - 1]  # the features and the options' tensors
    alpha, row_offset, _hard_negatives, _seed, clip, backend = inputs[_FEATURES + _OPTIONS - 1 :]
    ctx.save_for_backward(*tensors, output[4], output[5])
    ctx.alpha, ctx.row_offset, ctx.clip, ctx.backend = alpha, row_offset, clip, backend


def _backward(ctx, d_loss_i2t, d_loss_t2i, _dneg_text, _dneg_image, _dlse_i2t, _dlse_t2i):
    *tensors, lse_i2t, lse_t2i = ctx.saved_tensors
    zero = tensors[4].new_zeros(())
    d_loss_i2t = zero if d_loss_i2t is None else d_loss_i2t
    d_loss_t2i = zero if d_loss_t2i is None else d_loss_t2i
    # with clip the columns are the rows, whose gradient already holds their part as columns
    grad_image_columns = ctx.needs_input_grad[2] and not ctx.clip
    grad_text_columns = ctx.needs_input_grad[3] and not ctx.clip
    d_image, d_text, d_image_columns, d_text_columns, d_scale = _itc_bwd(
        d_loss_i2t,
        d_loss_t2i,
        *tensors,
        ctx.alpha,
        lse_i2t,
        lse_t2i,
        ctx.row_offset,
        ctx.clip,
        grad_image_columns,
        grad_text_columns,
        ctx.backend,
    )
    columns = (d_image_columns if grad_image_columns else None, d_text_columns if grad_text_columns else None)
    return d_image, d_text, *columns, d_scale, *([None] * (_OPTIONS + 5))


_itc_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- validation: every error names the argument, what it got and what was expected ---


def _check_features(name: str, value, like: Tensor, like_name: str, rows: int | None) -> Tensor:
    check_float(name, value, ndim=2)
    check_same(name, value, like_name, like)
    check_shape(name, value, (rows, like.shape[1]), f"(rows, d) with d = {like.shape[1]} like {like_name}")
    return value.contiguous()


def _check_ids(name: str, ids, length: int, what: str, device: torch.device) -> Tensor:
    check_tensor(name, ids, ndim=1, dtypes=INT_DTYPES)
    check_shape(name, ids, (length,), what)
    check_device(name, ids, device, "image_feats")
    return ids.to(torch.int64).contiguous()


def _check_real(name: str, value, what: str) -> float:
    """A Python int or float (not bool, not a tensor: an option, never differentiated)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float {what}, got {type(value).__name__} {value!r}")
    return float(value)


def _check_int(name: str, value, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int {what}, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}] {what}, got {value}")
    return value


def _check_options(options: ITCOptions, rows: Tensor, rows_name: str, batch: int) -> ITCOptions:
    """The options validated against ``rows`` ``(b, d)`` and a batch of ``batch`` columns, ids as int64."""
    if not isinstance(options, ITCOptions):
        raise TypeError(f"options must be an ITCOptions, got {type(options).__name__}")
    image_m, text_m, image_queue, text_queue, positive_ids, queue_ids, alpha = options
    local = rows.shape[0]
    if image_m is not None:
        image_m = _check_features("image_feats_m", image_m, rows, rows_name, local)
    if text_m is not None:
        text_m = _check_features("text_feats_m", text_m, rows, rows_name, local)
    if (image_queue is None) != (text_queue is None):
        raise ValueError("image_queue and text_queue go together: pass both or neither")
    queue = 0
    if image_queue is not None:
        image_queue = _check_features("image_queue", image_queue, rows, rows_name, None)
        queue = image_queue.shape[0]
        text_queue = _check_features("text_queue", text_queue, rows, rows_name, queue)
    alpha = _check_real("alpha", alpha, "in [0, 1]")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if alpha > 0 and (image_m is None or text_m is None):
        raise ValueError("alpha > 0 needs image_feats_m and text_feats_m: the soft targets come from momentum features")
    if positive_ids is not None:
        positive_ids = _check_ids("positive_ids", positive_ids, batch, "(one id per batch pair)", rows.device)
    if queue_ids is not None:
        if image_queue is None:
            raise ValueError("queue_ids needs image_queue and text_queue")
        queue_ids = _check_ids("queue_ids", queue_ids, queue, "(one id per queue entry)", rows.device)
    return ITCOptions(image_m, text_m, image_queue, text_queue, positive_ids, queue_ids, alpha)


def _scale_tensor(scale, like: Tensor) -> Tensor:
    """``scale`` as a 0-d fp32 tensor (fp64 for fp64 features) on ``like``'s device; a tensor stays differentiable."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(scale, Tensor):
        if not scale.is_floating_point():
            raise TypeError(f"scale must be a float or a one-element real floating tensor, got {describe(scale)}")
        if scale.numel() != 1:
            raise ValueError(f"scale must be a float or a one-element float tensor, got {describe(scale)}")
        check_device("scale", scale, like.device, "image_feats")
        return scale.reshape(()).to(dtype)
    value = _check_real("scale", scale, "or a one-element float tensor")
    return torch.tensor(value, dtype=dtype, device=like.device)


def _check_mining(hard_negatives) -> str:
    if not isinstance(hard_negatives, (str, type(None))):
        raise TypeError(f"hard_negatives must be one of {HARD_NEGATIVES}, got {type(hard_negatives).__name__}")
    check_choice("hard_negatives", hard_negatives, HARD_NEGATIVES)
    return _NO_MINING if hard_negatives is None else hard_negatives


def _run(rows, columns, scale, options: ITCOptions, row_offset: int, mining: str, seed: Tensor, clip: bool, backend):
    check_backend(backend)
    if transforms_active():  # torch.func: the specification, which every transform sees through (_functorch.py)
        hard_negatives = None if mining == _NO_MINING else mining
        return _specification(*rows, *columns, scale, options, row_offset, hard_negatives, int(seed))
    return _itc_fwd(*rows, *columns, scale, *options, row_offset, mining, seed, clip, backend)


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
        image_feats, text_feats: ``(B, d)`` (normalise them first, as both models do). fp16/bf16/fp32
            (fp64 too: on GPU it runs on the reference backend). Meta tensors give meta outputs.
        scale: float or one-element tensor multiplying the similarities (open_clip:
            ``logit_scale.exp()``, ALBEF: ``1 / temp``); differentiable when a tensor.
        image_feats_m, text_feats_m: ``(B, d)`` momentum features: they replace the online
            features as columns (constants: no gradient reaches them), and with ``alpha > 0`` give
            soft targets ``alpha · softmax(scale · rows_m @ columns.T) + (1 - alpha) · hard``.
        image_queue, text_queue: ``(Q, d)`` extra negatives appended to the columns.
        positive_ids: ``(B,)`` ints; pairs with equal ids are each other's positives
            (default: only the diagonal). queue_ids: ``(Q,)`` ints, the queue entries' ids. A
            negative id means "no id" and matches nothing (``FeatureQueue`` fills empty slots with
            -1): a pair with one has only itself as positive, a queue entry with one is a negative.
        hard_negatives: ``None | "sample" | "hardest"``: per image one in-batch text that is
            not a positive, drawn ∝ ``exp(logits)`` (ALBEF) or the arg-max; likewise per text.
            -1 when a row has no negative or its logits are not finite (the loss is then NaN).
        generator: seeds ``"sample"``: one seed is drawn from it (else from torch's global RNG) and
            each row's draw is keyed by (seed, row, direction) on every backend, so a result is
            reproducible and does not depend on how the rows are split among ranks.

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
    image_feats = image_feats.contiguous()
    text_feats = _check_features("text_feats", text_feats, image_feats, "image_feats", batch)
    options = ITCOptions(image_feats_m, text_feats_m, image_queue, text_queue, positive_ids, queue_ids, alpha)
    options = _check_options(options, image_feats, "image_feats", batch)
    mining = _check_mining(hard_negatives)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    seed = sample_seed(generator) if mining == "sample" else torch.zeros((), dtype=torch.int64)
    # momentum features are the columns as constants; without them the rows are the columns (the clip flag)
    image_columns = image_feats if options.image_feats_m is None else options.image_feats_m.detach()
    text_columns = text_feats if options.text_feats_m is None else options.text_feats_m.detach()
    clip = options.image_feats_m is None and options.text_feats_m is None
    rows, columns, scale = (image_feats, text_feats), (image_columns, text_columns), _scale_tensor(scale, image_feats)
    outputs = _run(rows, columns, scale, options, 0, mining, seed, clip, backend)
    loss_i2t, loss_t2i, neg_text, neg_image = outputs[:4]
    mined = mining != _NO_MINING
    return ITCOutput((loss_i2t + loss_t2i) / 2, loss_i2t, loss_t2i, *((neg_text, neg_image) if mined else (None, None)))


def itc_loss_rows(
    image_rows: Tensor,
    text_rows: Tensor,
    image_columns: Tensor,
    text_columns: Tensor,
    scale: Tensor | float,
    *,
    row_offset: int,
    options: ITCOptions | None = None,
    hard_negatives: str | None = None,
    seed: int = 0,
    backend: str = "auto",
) -> ITCRowsOutput:
    """``itc_loss`` for the rows ``[row_offset, row_offset + b)`` of a batch of B pairs: one rank's share.

    ``image_rows, text_rows`` ``(b, d)``: this rank's online features; ``image_columns, text_columns``
    ``(B, d)``: every rank's features (gathered online ones, differentiable, or momentum ones);
    ``options.image_feats_m, text_feats_m`` ``(b, d)``: the rows' momentum features for ``alpha > 0``
    (the columns are then constants); ``options.positive_ids`` ``(B,)``; queues and ``queue_ids`` as in
    ``itc_loss``. ``seed`` keys the ``"sample"`` draws together with the GLOBAL row, so every rank must
    pass the same seed. Memory and work are O(b·(B + Q)) per rank: no rank computes another's rows.

    Returns ``ITCRowsOutput``: losses are means over the b rows (equal b on every rank: the ranks'
    mean is the global loss, and DDP's averaging of their gradients gives the global gradient),
    hard negatives ``(b,)`` index the B batch columns, and the per-row lse ``(b,)``. Specification:
    :func:`mome.reference.itc.itc_loss_rows_ref`.
    """
    check_float("image_rows", image_rows, ndim=2)
    local, dim = image_rows.shape
    if local == 0 or dim == 0:
        raise ValueError(f"image_rows must have at least one row and one feature, got shape {tuple(image_rows.shape)}")
    image_rows = image_rows.contiguous()
    text_rows = _check_features("text_rows", text_rows, image_rows, "image_rows", local)
    image_columns = _check_features("image_columns", image_columns, image_rows, "image_rows", None)
    batch = image_columns.shape[0]
    text_columns = _check_features("text_columns", text_columns, image_rows, "image_rows", batch)
    row_offset = _check_int("row_offset", row_offset, 0, batch - local, f"(B = {batch} columns, b = {local} rows)")
    options = _check_options(ITCOptions() if options is None else options, image_rows, "image_rows", batch)
    if options.alpha > 0 and (image_columns.requires_grad or text_columns.requires_grad):
        raise ValueError("alpha > 0 takes momentum columns, constants: pass image_columns/text_columns detached")
    mining = _check_mining(hard_negatives)
    seed = torch.tensor(_check_int("seed", seed, 0, 2**63 - 1, "(keys the sampled negatives)"), dtype=torch.int64)
    rows, columns, scale = (image_rows, text_rows), (image_columns, text_columns), _scale_tensor(scale, image_rows)
    outputs = _run(rows, columns, scale, options, row_offset, mining, seed, False, backend)
    loss_i2t, loss_t2i, neg_text, neg_image, lse_i2t, lse_t2i = outputs
    picks = (neg_text, neg_image) if mining != _NO_MINING else (None, None)
    return ITCRowsOutput((loss_i2t + loss_t2i) / 2, loss_i2t, loss_t2i, *picks, lse_i2t, lse_t2i)
