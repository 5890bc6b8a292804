"""``mome.ops.itc_loss``: image-text contrastive loss with queue, momentum distillation and hard negatives.

One custom op (``mome::itc_loss_fwd`` / ``mome::itc_loss_bwd``) in the local form: b rows, the global rows
``[row_offset, row_offset + b)`` of a batch of B pairs, against the B batch columns (plus a queue). The whole
batch (:func:`itc_loss`) is the case b = B, ``row_offset = 0``; one rank's share of a gathered batch
(``ITCLoss(gather=True)``, :func:`itc_loss_rows`) is the general case. The op's ``clip`` flag says that the
rows are also the columns (whole batch, online features both sides): the backward's row kernel of each
direction then serves the other direction's column gradient too, and two kernels make the whole backward.

Two losses (``ITCOptions.loss``): the softmax (InfoNCE: open_clip's ClipLoss, ALBEF, BLIP, BLIP-2, with label
smoothing) and the sigmoid loss of SigLIP (open_clip's SigLipLoss, with a logit bias). Image features may carry
query tokens ``(n, NQ, d)`` (BLIP-2's Q-Former): the similarity is then the max over them.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from mome.ops import _itc_checks as checks
from mome.ops._backend import Family, OpBackends, check_backend
from mome.ops._functorch import transforms_active
from mome.reference.itc import ITCOutput, sample_seed
from mome.reference.itc import itc_loss_fwd as _specification

HARD_NEGATIVES = checks.HARD_NEGATIVES
LOSSES = checks.LOSSES
HARD_NEGATIVE_SOURCES = checks.HARD_NEGATIVE_SOURCES
QUEUE_LAYOUTS = checks.QUEUE_LAYOUTS
_NO_MINING = "none"  # custom-op schemas take str, not Optional[str]


class ITCOptions(NamedTuple):
    """The optional inputs of one ITC call, as the launchers take them (validated, contiguous, ids int64).

    Image tensors are ``(n, d)`` or, with query tokens, ``(n, NQ, d)``; text tensors ``(n, d)``.
    """

    image_feats_m: Tensor | None = None  # [b, d] momentum features of the rows: soft targets when alpha > 0
    text_feats_m: Tensor | None = None  # [b, d]
    image_queue: Tensor | None = None  # [Q, d] extra t2i columns
    text_queue: Tensor | None = None  # [Q, d] extra i2t columns
    positive_ids: Tensor | None = None  # [B] ids of the batch pairs; negative = no id (only its own pair)
    queue_ids: Tensor | None = None  # [Q] ids of the queue entries; negative = matches no row
    alpha: float = 0.0  # distillation weight (softmax only)
    label_smoothing: float = 0.0  # in [0, 1): targets (1 - ε)·t + ε/(B + Q), as F.cross_entropy (softmax only)
    loss: str = "softmax"  # or "sigmoid": SigLIP's -logsigmoid(±(logits + bias)) summed over the columns
    mining_image_columns: Tensor | None = None  # [B, d] what t2i hard negatives are drawn against (default: columns)
    mining_text_columns: Tensor | None = None  # [B, d] what i2t hard negatives are drawn against


class ITCRowsOutput(NamedTuple):
    loss: Tensor  # (loss_i2t + loss_t2i) / 2, each the mean over the b rows
    loss_i2t: Tensor
    loss_t2i: Tensor
    neg_text_idx: Tensor | None  # [b] indices into the B batch texts, -1 when none is defined
    neg_image_idx: Tensor | None  # [b] indices into the B batch images
    lse_i2t: Tensor  # [b] fp32 log-sum-exp of each image row over [texts; text queue]; (0,) for the sigmoid loss
    lse_t2i: Tensor  # [b]


class ITCBackend(Protocol):
    """Launchers of the ITC family. Forward: ``(loss_i2t, loss_t2i, neg_text, neg_image, lse_i2t, lse_t2i)``, the
    losses 0-d fp32 (fp64 for fp64 rows) means over the b rows, the picks ``(b,)`` int64 (``(0,)`` without mining),
    the fp32 lse ``(b,)`` (``(0,)`` for the sigmoid loss, which has none). ``scale`` is 0-d, or ``(2,)`` = (scale,
    logit bias) for the sigmoid loss. Backward: ``(d image_rows, d text_rows, d image_columns, d text_columns,
    d scale)``; a column gradient is ``(0, ...)`` unless ``column_grads`` asks for it, and with ``clip`` the rows'
    gradient holds their part as columns."""

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
        "query_tokens": "NQ, vectors per image (1: one vector; more: the max over query tokens, BLIP-2)",
        "sigmoid_loss": "1 for loss='sigmoid' (SigLIP), 0 for the softmax",
        "label_smoothing": "1 when label_smoothing > 0",
        "mining_columns": "1 when hard negatives are drawn against other columns than the loss's (BLIP's online "
        "similarities beside momentum columns)",
    },
)
# Options, measured as sizes, that a backend is given only when its LIMITS name them: a backend written before an
# option existed is declined for it (with this reason) instead of silently computing without it. Value when off:
OPTION_SIZES = {"query_tokens": 1, "sigmoid_loss": 0, "label_smoothing": 0, "mining_columns": 0}


class _ITCBackends(OpBackends):
    def reason(self, backend: str, inputs: dict) -> str | None:
        why = super().reason(backend, inputs)
        if why is not None:
            return why
        sizes, declared = self.measure(inputs)[2], self.limits(backend).ranges
        for name, off in OPTION_SIZES.items():
            if sizes[name] != off and name not in declared:
                return f"it does not declare {name} ({self.family.sizes[name]}) in its LIMITS, got {sizes[name]}"
        return None


def _measure(inputs: dict):
    image_rows, image_columns, options = inputs["image_rows"], inputs["image_columns"], inputs["options"]
    queue = 0 if options.image_queue is None else options.image_queue.shape[0]
    sizes = {
        "feature_dim": image_rows.shape[-1],
        "rows": image_rows.shape[0],
        "columns": image_columns.shape[0] + queue,
        "query_tokens": image_rows.shape[1] if image_rows.dim() == 3 else 1,
        "sigmoid_loss": int(options.loss == "sigmoid"),
        "label_smoothing": int(options.label_smoothing > 0),
        "mining_columns": int(options.mining_image_columns is not None),
    }
    return image_rows.dtype, image_rows.device, sizes


BACKENDS = _ITCBackends(
    "itc_loss",
    FAMILY,
    {"reference": "mome.reference.itc", "native": "mome.native.itc", "triton": "mome.kernels.itc"},
    _measure,
)


def _module(backend: str, image_rows: Tensor, image_columns: Tensor, options: ITCOptions):
    return BACKENDS.module(backend, dict(image_rows=image_rows, image_columns=image_columns, options=options))


# The custom ops take the options flattened (their schema has no structs), tensors first; everything else takes
# ITCOptions.
_FEATURES = 5  # image_rows, text_rows, image_columns, text_columns, scale
_TENSOR_OPTIONS = (
    "image_feats_m",
    "text_feats_m",
    "image_queue",
    "text_queue",
    "positive_ids",
    "queue_ids",
    "mining_image_columns",
    "mining_text_columns",
)
_SCALAR_OPTIONS = ("alpha", "label_smoothing", "loss")
_OPTIONS = len(_TENSOR_OPTIONS) + len(_SCALAR_OPTIONS)


def _flat(options: ITCOptions) -> tuple:
    return tuple(getattr(options, name) for name in _TENSOR_OPTIONS + _SCALAR_OPTIONS)


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
    mining_image_columns: Tensor | None,
    mining_text_columns: Tensor | None,
    alpha: float,
    label_smoothing: float,
    loss: str,
    row_offset: int,
    hard_negatives: str,
    seed: Tensor,
    clip: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    options = ITCOptions(
        image_feats_m,
        text_feats_m,
        image_queue,
        text_queue,
        positive_ids,
        queue_ids,
        alpha,
        label_smoothing,
        loss,
        mining_image_columns,
        mining_text_columns,
    )
    mining = None if hard_negatives == _NO_MINING else hard_negatives
    module = _module(backend, image_rows, image_columns, options)
    features = (image_rows, text_rows, image_columns, text_columns, scale)
    return module.itc_loss_fwd(*features, options, row_offset, mining, int(seed))


@_itc_fwd.register_fake
def _(image_rows, *rest):
    loss_kind, _row_offset, hard_negatives, _seed, _clip, _backend = rest[-6:]
    rows = image_rows.shape[0]
    loss = image_rows.new_empty((), dtype=torch.float64 if image_rows.dtype == torch.float64 else torch.float32)
    picks = [image_rows.new_empty(rows if hard_negatives != _NO_MINING else 0, dtype=torch.int64) for _ in range(2)]
    saved = 0 if loss_kind == "sigmoid" else rows
    return loss, torch.empty_like(loss), *picks, *[image_rows.new_empty(saved, dtype=torch.float32) for _ in range(2)]


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
    mining_image_columns: Tensor | None,
    mining_text_columns: Tensor | None,
    alpha: float,
    label_smoothing: float,
    loss: str,
    lse_i2t: Tensor,
    lse_t2i: Tensor,
    row_offset: int,
    clip: bool,
    grad_image_columns: bool,
    grad_text_columns: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    options = ITCOptions(
        image_feats_m,
        text_feats_m,
        image_queue,
        text_queue,
        positive_ids,
        queue_ids,
        alpha,
        label_smoothing,
        loss,
        mining_image_columns,
        mining_text_columns,
    )
    module = _module(backend, image_rows, image_columns, options)
    features = (image_rows, text_rows, image_columns, text_columns, scale)
    column_grads = (grad_image_columns, grad_text_columns)
    return module.itc_loss_bwd(
        d_loss_i2t, d_loss_t2i, *features, options, lse_i2t, lse_t2i, row_offset, clip, column_grads
    )


@_itc_bwd.register_fake
def _(d_loss_i2t, d_loss_t2i, image_rows, text_rows, image_columns, text_columns, scale, *rest):
    grad_image_columns, grad_text_columns = rest[-3], rest[-2]
    d_image_columns = image_columns.new_empty((image_columns.shape[0] if grad_image_columns else 0,
                                               *image_columns.shape[1:]))  # fmt: skip
    d_text_columns = text_columns.new_empty(
        (text_columns.shape[0] if grad_text_columns else 0, *text_columns.shape[1:])
    )
    d_rows = torch.empty_like(image_rows), torch.empty_like(text_rows)
    return *d_rows, d_image_columns, d_text_columns, torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    tensors = inputs[: _FEATURES + len(_TENSOR_OPTIONS)]  # the features and the options' tensors
    scalars = inputs[_FEATURES + len(_TENSOR_OPTIONS) : _FEATURES + _OPTIONS]
    row_offset, _hard_negatives, _seed, clip, backend = inputs[_FEATURES + _OPTIONS :]
    ctx.save_for_backward(*tensors, output[4], output[5])
    ctx.scalars, ctx.row_offset, ctx.clip, ctx.backend = scalars, row_offset, clip, backend


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
        *ctx.scalars,
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


def _squeeze_queries(image_rows: Tensor, image_columns: Tensor, options: ITCOptions):
    """Image tensors with one query token ``(n, 1, d)`` as plain ``(n, d)`` features (views: gradients flow)."""
    if image_rows.dim() != 3 or image_rows.shape[1] != 1:
        return image_rows, image_columns, options

    def one(t):
        return None if t is None else t[:, 0]

    image_options = ("image_feats_m", "image_queue", "mining_image_columns")
    options = options._replace(**{name: one(getattr(options, name)) for name in image_options})
    return one(image_rows), one(image_columns), options


def _run(rows, columns, scale, options: ITCOptions, row_offset: int, mining: str, seed: Tensor, clip: bool, backend):
    check_backend(backend)
    (image_rows, text_rows), (image_columns, text_columns) = rows, columns
    image_rows, image_columns, options = _squeeze_queries(image_rows, image_columns, options)
    features = (image_rows, text_rows, image_columns, text_columns, scale)
    if transforms_active():  # torch.func: the specification, which every transform sees through (_functorch.py)
        hard_negatives = None if mining == _NO_MINING else mining
        return _specification(*features, options, row_offset, hard_negatives, int(seed))
    return _itc_fwd(*features, *_flat(options), row_offset, mining, seed, clip, backend)


def _check_mining(hard_negatives) -> str:
    checks.check_word("hard_negatives", hard_negatives, HARD_NEGATIVES)
    return _NO_MINING if hard_negatives is None else hard_negatives


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
    label_smoothing: float = 0.0,
    loss: str = "softmax",
    logit_bias: Tensor | float | None = None,
    hard_negative_source: str = "loss",
    detach_columns: bool = False,
    queue_layout: str = "rows",
    backend: str = "auto",
) -> ITCOutput:
    """Symmetric image-text contrastive loss: open_clip's ClipLoss and SigLipLoss, ALBEF's ITA, BLIP's and BLIP-2's
    ITC as special cases.

    Args:
        image_feats: ``(B, d)``, or ``(B, NQ, d)`` with query tokens (BLIP-2's Q-Former): the similarity of an
            image and a text is then the max over its NQ query tokens, in both directions, and its gradient goes
            to the arg-max token (the first on ties). text_feats: ``(B, d)``. Normalise them first, as the models
            do. fp16/bf16/fp32 (fp64 too: on GPU it runs on the reference backend). Meta tensors give meta outputs.
        scale: float or one-element tensor multiplying the similarities (open_clip:
            ``logit_scale.exp()``, ALBEF: ``1 / temp``); differentiable when a tensor.
        image_feats_m, text_feats_m: momentum features shaped like image_feats / text_feats: they replace the
            online features as columns (constants: no gradient reaches them), and with ``alpha > 0`` give
            soft targets ``alpha · softmax(scale · rows_m @ columns.T) + (1 - alpha) · hard``.
        image_queue, text_queue: extra negatives appended to the columns, ``(Q, d)`` (``(Q, NQ, d)`` for images
            with query tokens), or ``(d, Q)`` with ``queue_layout="columns"`` (ALBEF's ``image_queue`` buffers).
        positive_ids: ``(B,)`` ints; pairs with equal ids are each other's positives
            (default: only the diagonal). queue_ids: ``(Q,)`` ints, the queue entries' ids. A
            negative id means "no id" and matches nothing (``FeatureQueue`` fills empty slots with
            -1): a pair with one has only itself as positive, a queue entry with one is a negative.
        hard_negatives: ``None | "sample" | "hardest"``: per image one in-batch text that is
            not a positive, drawn ∝ ``exp(scale · similarity)`` (ALBEF, BLIP) or the arg-max; likewise per text.
            -1 when a row has no negative or its similarities are not finite (the loss is then NaN).
        generator: seeds ``"sample"``: one seed is drawn from it (else from torch's global RNG) and
            each row's draw is keyed by (seed, row, direction) on every backend, so a result is
            reproducible and does not depend on how the rows are split among ranks.
        label_smoothing: in ``[0, 1)``, as ``F.cross_entropy(label_smoothing=ε)``: each row's targets become
            ``(1 - ε) · targets + ε / (B + Q)`` over its candidate columns (BLIP-2 uses 0.1). Softmax only.
        loss: ``"softmax"`` (InfoNCE) or ``"sigmoid"``: open_clip's SigLipLoss, per row
            ``Σ_j -logsigmoid(label_ij · (scale · sim_ij + logit_bias))`` over its columns with label +1 for
            positives (the diagonal, equal ids) and -1 elsewhere, averaged over the rows: the sum over the B × B
            pairs divided by B. Both directions see that same sum (``loss_i2t == loss_t2i == loss`` for a whole
            batch without queue or momentum columns). Combines with queues (extra columns), positive/queue
            ids, momentum features as columns with ``alpha = 0``, query tokens, hard negatives and
            ``detach_columns``; not with ``alpha > 0`` or label smoothing (a ValueError names them).
        logit_bias: float or one-element tensor added to every logit, differentiable when a tensor; only with
            ``loss="sigmoid"`` (None: 0).
        hard_negative_source: what the hard negatives are drawn against: ``"loss"`` the loss's batch columns
            (ALBEF: the momentum features when given), ``"similarity"`` the online features of the batch, also
            when momentum features are the loss's columns (BLIP). Without momentum features both are the same.
            Queues never take part.
        detach_columns: the columns are constants: each feature gets its gradient only as a row (i2t for images,
            t2i for texts), as BLIP-2 and VLMo compute it against gathered features without gradient.
        queue_layout: ``"rows"`` for ``(Q, d)`` queues, ``"columns"`` for ``(d, Q)``; never guessed from shapes.

    Returns ``ITCOutput(loss, loss_i2t, loss_t2i, neg_text_idx, neg_image_idx)``; losses are
    fp32 0-d tensors (fp64 for fp64 features), indices int64 ``(B,)`` or None.

    Equivalent PyTorch (CLIP mode; SigLIP: ``-F.logsigmoid((2 * torch.eye(B) - 1) * (logits + bias)).sum() / B``)::

        logits = scale * image_feats @ text_feats.T
        labels = torch.arange(B)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    """
    image_feats = checks.check_image_rows("image_feats", image_feats)
    batch, dim = image_feats.shape[0], image_feats.shape[-1]
    text_feats = checks.check_features("text_feats", text_feats, image_feats, "image_feats", batch, (dim,),
                                       f"({batch}, {dim}) like image_feats")  # fmt: skip
    options = ITCOptions(
        image_feats_m, text_feats_m, image_queue, text_queue, positive_ids, queue_ids, alpha, label_smoothing, loss
    )
    options = checks.check_options(options, image_feats, "image_feats", batch, queue_layout)
    mining = _check_mining(hard_negatives)
    source = checks.check_word("hard_negative_source", hard_negative_source, HARD_NEGATIVE_SOURCES)
    detach = checks.check_flag("detach_columns", detach_columns)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    seed = sample_seed(generator) if mining == "sample" else torch.zeros((), dtype=torch.int64)
    momentum = options.image_feats_m is not None or options.text_feats_m is not None
    # momentum features are the columns as constants; without them the rows are the columns (the clip flag)
    image_columns = image_feats if options.image_feats_m is None else options.image_feats_m.detach()
    text_columns = text_feats if options.text_feats_m is None else options.text_feats_m.detach()
    if detach:
        image_columns, text_columns = image_columns.detach(), text_columns.detach()
    clip = not momentum and not detach
    if mining != _NO_MINING and source == "similarity" and momentum:
        options = options._replace(mining_image_columns=image_feats.detach(), mining_text_columns=text_feats.detach())
    scale = checks.affine_scale(scale, logit_bias, options.loss, image_feats)
    rows, columns = (image_feats, text_feats), (image_columns, text_columns)
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
    logit_bias: Tensor | float | None = None,
    hard_negative_source: str = "loss",
    detach_columns: bool = False,
    queue_layout: str = "rows",
    backend: str = "auto",
) -> ITCRowsOutput:
    """``itc_loss`` for the rows ``[row_offset, row_offset + b)`` of a batch of B pairs: one rank's share.

    ``image_rows, text_rows`` ``(b, d)`` (images ``(b, NQ, d)`` with query tokens): this rank's online
    features; ``image_columns, text_columns`` ``(B, d)``: every rank's features (gathered online ones,
    differentiable unless ``detach_columns``, or momentum ones); ``options.image_feats_m, text_feats_m``
    ``(b, d)``: the rows' momentum features for ``alpha > 0`` (the columns are then constants);
    ``options.positive_ids`` ``(B,)``; queues and ``queue_ids`` as in ``itc_loss`` (``queue_layout``);
    ``options.label_smoothing`` and ``options.loss`` (with ``logit_bias``) as in ``itc_loss``.
    ``hard_negative_source="similarity"`` draws against ``options.mining_image_columns`` /
    ``mining_text_columns`` ``(B, d)``, the batch's online features, which it needs when the rows have
    momentum features (the columns are then momentum features); without those, the columns are the online
    features. ``seed`` keys the ``"sample"`` draws together with the GLOBAL row, so every rank must
    pass the same seed. Memory and work are O(b·(B + Q)) per rank: no rank computes another's rows.

    Returns ``ITCRowsOutput``: losses are means over the b rows (equal b on every rank: the ranks'
    mean is the global loss, and DDP's averaging of their gradients gives the global gradient),
    hard negatives ``(b,)`` index the B batch columns, and the per-row lse ``(b,)`` (softmax).
    Specification: :func:`mome.reference.itc.itc_loss_rows_ref`.
    """
    image_rows = checks.check_image_rows("image_rows", image_rows)
    local, tail, dim = image_rows.shape[0], tuple(image_rows.shape[1:]), image_rows.shape[-1]
    text_rows = checks.check_features("text_rows", text_rows, image_rows, "image_rows", local, (dim,),
                                      f"({local}, {dim}) like image_rows")  # fmt: skip
    image_columns = checks.check_features("image_columns", image_columns, image_rows, "image_rows", None, tail,
                                          f"(B, {', '.join(map(str, tail))}) like image_rows")  # fmt: skip
    batch = image_columns.shape[0]
    text_columns = checks.check_features("text_columns", text_columns, image_rows, "image_rows", batch, (dim,),
                                         f"({batch}, {dim}) like image_columns")  # fmt: skip
    row_offset = checks.check_int(
        "row_offset", row_offset, 0, batch - local, f"(B = {batch} columns, b = {local} rows)"
    )
    options = ITCOptions() if options is None else options
    if not isinstance(options, ITCOptions):
        raise TypeError(f"options must be an ITCOptions, got {type(options).__name__}")
    options = checks.check_options(options, image_rows, "image_rows", batch, queue_layout)
    if checks.check_flag("detach_columns", detach_columns):
        image_columns, text_columns = image_columns.detach(), text_columns.detach()
    if options.alpha > 0 and (image_columns.requires_grad or text_columns.requires_grad):
        raise ValueError("alpha > 0 takes momentum columns, constants: pass image_columns/text_columns detached")
    mining = _check_mining(hard_negatives)
    source = checks.check_word("hard_negative_source", hard_negative_source, HARD_NEGATIVE_SOURCES)
    given = options.mining_image_columns is not None
    if source == "loss" and given:
        raise ValueError(
            "options.mining_image_columns / mining_text_columns are what hard_negative_source='similarity' draws "
            "against; pass that, or leave them None to draw against the loss's columns"
        )
    if source == "similarity" and not given and (options.image_feats_m is not None or options.text_feats_m is not None):
        raise ValueError(
            "hard_negative_source='similarity' with momentum rows needs options.mining_image_columns and "
            "mining_text_columns: the batch's online features (B, d) (the columns are momentum features here)"
        )
    if mining == _NO_MINING:
        options = options._replace(mining_image_columns=None, mining_text_columns=None)
    seed = torch.tensor(checks.check_int("seed", seed, 0, 2**63 - 1, "(keys the sampled negatives)"), dtype=torch.int64)
    scale = checks.affine_scale(scale, logit_bias, options.loss, image_rows)
    rows, columns = (image_rows, text_rows), (image_columns, text_columns)
    outputs = _run(rows, columns, scale, options, row_offset, mining, seed, False, backend)
    loss_i2t, loss_t2i, neg_text, neg_image, lse_i2t, lse_t2i = outputs
    picks = (neg_text, neg_image) if mining != _NO_MINING else (None, None)
    return ITCRowsOutput((loss_i2t + loss_t2i) / 2, loss_i2t, loss_t2i, *picks, lse_i2t, lse_t2i)
