"""Argument checks of ``mome.ops.itc_loss`` / ``itc_loss_rows``: each error names the argument, what it got and
what was expected. Image tensors are ``(n, d)`` or ``(n, NQ, d)`` (query tokens), text tensors ``(n, d)``."""

from __future__ import annotations

import torch
from torch import Tensor

from mome.ops._validate import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_choice,
    check_device,
    check_same,
    check_shape,
    check_tensor,
    describe,
)

HARD_NEGATIVES = (None, "sample", "hardest")
LOSSES = ("softmax", "sigmoid")
HARD_NEGATIVE_SOURCES = ("loss", "similarity")
QUEUE_LAYOUTS = ("rows", "columns")


def check_image_rows(name: str, value) -> Tensor:
    """The image rows ``(b, d)`` or ``(b, NQ, d)``, every size at least 1, contiguous."""
    check_tensor(name, value, dtypes=FLOAT_DTYPES)
    if value.dim() not in (2, 3):
        raise ValueError(f"{name} must be (rows, d), or (rows, NQ, d) with query tokens, got {describe(value)}")
    if 0 in value.shape:
        raise ValueError(f"{name} must have at least one row, query token and feature, got shape {tuple(value.shape)}")
    return value.contiguous()


def check_features(name: str, value, like: Tensor, like_name: str, rows: int | None, tail: tuple, what: str) -> Tensor:
    """A float tensor with ``like``'s dtype and device, of shape ``(rows, *tail)`` (``rows`` None: any), contiguous."""
    check_tensor(name, value, dtypes=FLOAT_DTYPES)
    check_same(name, value, like_name, like)
    check_shape(name, value, (rows, *tail), what)
    return value.contiguous()


def _dims(tail: tuple) -> str:
    """``(NQ, d)`` or ``(d,)`` in words: "NQ, d" or "d"."""
    return "NQ, d" if len(tail) == 2 else "d"


def _sizes(tail: tuple) -> str:
    return f"NQ = {tail[0]}, d = {tail[1]}" if len(tail) == 2 else f"d = {tail[0]}"


def check_ids(name: str, ids, length: int, what: str, device: torch.device) -> Tensor:
    check_tensor(name, ids, ndim=1, dtypes=INT_DTYPES)
    check_shape(name, ids, (length,), what)
    check_device(name, ids, device, "image_feats")
    return ids.to(torch.int64).contiguous()


def check_real(name: str, value, what: str) -> float:
    """A Python int or float (not bool, not a tensor: an option, never differentiated)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float {what}, got {type(value).__name__} {value!r}")
    return float(value)


def check_int(name: str, value, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int {what}, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}] {what}, got {value}")
    return value


def check_word(name: str, value, choices: tuple) -> str | None:
    """One of ``choices`` (strings, maybe None), checked by type first: ``["sample"]`` is a TypeError."""
    if not (value is None or isinstance(value, str)):
        raise TypeError(f"{name} must be one of {choices}, got {type(value).__name__} {value!r}")
    check_choice(name, value, choices)
    return value


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _queue(name: str, value, image_rows: Tensor, rows_name: str, tail: tuple, layout: str) -> Tensor:
    """A queue in the rows layout ``(Q, *tail)``; ``layout="columns"`` takes ALBEF's ``(d, Q)`` and transposes it."""
    dim = tail[-1]
    if layout == "columns":
        if len(tail) != 1:
            raise ValueError(
                f"queue_layout='columns' takes 2-D queues (d, Q); with query tokens pass {name} as (Q, NQ, d) and "
                f"queue_layout='rows'"
            )
        check_features(
            name, value, image_rows, rows_name, dim, (None,), f"(d, Q) with d = {dim} (queue_layout='columns')"
        )
        return value.T.contiguous()
    hint = f"(Q, {_dims(tail)}) with {_sizes(tail)}"
    if len(tail) == 1:
        hint += "; ALBEF's (d, Q) buffers take queue_layout='columns'"
    return check_features(name, value, image_rows, rows_name, None, tail, hint)


def check_options(options, image_rows: Tensor, rows_name: str, batch: int, queue_layout: str):
    """``options`` validated against the image rows ``(b, [NQ,] d)`` (called ``rows_name``) and a batch of ``batch``
    columns: queues in the rows layout, ids int64, everything contiguous. ``options`` is an ``ITCOptions`` (the
    caller checks the type)."""
    local, image_tail = image_rows.shape[0], tuple(image_rows.shape[1:])
    text_tail = (image_rows.shape[-1],)
    values = options._asdict()

    def features(name, rows, tail):
        if values[name] is None:
            return None
        what = f"({rows}, {_dims(tail)}) with {_sizes(tail)}"
        return check_features(name, values[name], image_rows, rows_name, rows, tail, what)

    values["image_feats_m"] = features("image_feats_m", local, image_tail)
    values["text_feats_m"] = features("text_feats_m", local, text_tail)
    if (options.image_queue is None) != (options.text_queue is None):
        raise ValueError("image_queue and text_queue go together: pass both or neither")
    check_word("queue_layout", queue_layout, QUEUE_LAYOUTS)
    queue = 0
    if options.image_queue is not None:
        values["image_queue"] = _queue(
            "image_queue", options.image_queue, image_rows, rows_name, image_tail, queue_layout
        )
        values["text_queue"] = _queue("text_queue", options.text_queue, image_rows, rows_name, text_tail, queue_layout)
        queue = values["image_queue"].shape[0]
        if values["text_queue"].shape[0] != queue:
            raise ValueError(
                f"text_queue must hold as many entries as image_queue ({queue}), got {describe(options.text_queue)}"
            )
    if (options.mining_image_columns is None) != (options.mining_text_columns is None):
        raise ValueError("mining_image_columns and mining_text_columns go together: pass both or neither")
    values["mining_image_columns"] = features("mining_image_columns", batch, image_tail)
    values["mining_text_columns"] = features("mining_text_columns", batch, text_tail)
    alpha = values["alpha"] = check_real("alpha", options.alpha, "in [0, 1]")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if alpha > 0 and (options.image_feats_m is None or options.text_feats_m is None):
        raise ValueError("alpha > 0 needs image_feats_m and text_feats_m: the soft targets come from momentum features")
    smoothing = values["label_smoothing"] = check_real("label_smoothing", options.label_smoothing, "in [0, 1)")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1) (as F.cross_entropy takes it), got {smoothing}")
    loss = check_word("loss", options.loss, LOSSES)
    if loss == "sigmoid":
        if alpha > 0:
            raise ValueError(
                f"alpha > 0 (momentum distillation, got {alpha}) needs loss='softmax': its soft targets are a "
                f"softmax over the columns, which the sigmoid loss has not; pass alpha=0 (momentum features may "
                f"still be the columns)"
            )
        if smoothing > 0:
            raise ValueError(
                f"label_smoothing (got {smoothing}) smooths the softmax's targets (F.cross_entropy); loss='sigmoid' "
                f"takes label_smoothing=0"
            )
    if options.positive_ids is not None:
        device = image_rows.device
        values["positive_ids"] = check_ids(
            "positive_ids", options.positive_ids, batch, "(one id per batch pair)", device
        )
    if options.queue_ids is not None:
        if options.image_queue is None:
            raise ValueError("queue_ids needs image_queue and text_queue")
        values["queue_ids"] = check_ids(
            "queue_ids", options.queue_ids, queue, "(one id per queue entry)", image_rows.device
        )
    return type(options)(**values)


def _scalar(name: str, value, like: Tensor, what: str) -> Tensor:
    """A float or one-element real floating tensor as a 0-d tensor (fp64 for fp64 features, else fp32) on ``like``'s
    device; a tensor stays differentiable."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a one-element real floating tensor, got {describe(value)}")
        if value.numel() != 1:
            raise ValueError(f"{name} must be a float or a one-element float tensor, got {describe(value)}")
        check_device(name, value, like.device, "image_feats")
        return value.reshape(()).to(dtype)
    return torch.tensor(check_real(name, value, what), dtype=dtype, device=like.device)


def affine_scale(scale, logit_bias, loss: str, like: Tensor) -> Tensor:
    """What the launchers take as ``scale``: 0-d for the softmax, ``(2,)`` = (scale, logit bias) for the sigmoid
    loss (``logit_bias`` None: 0); both differentiable when tensors."""
    scale = _scalar("scale", scale, like, "or a one-element float tensor")
    if loss != "sigmoid":
        if logit_bias is not None:
            raise ValueError(
                "logit_bias is for loss='sigmoid': a softmax over the columns does not change when every logit is "
                "shifted, so it would get no gradient"
            )
        return scale
    bias = _scalar("logit_bias", 0.0 if logit_bias is None else logit_bias, like, "or a one-element float tensor")
    return torch.stack([scale, bias])
