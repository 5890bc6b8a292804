"""``mome.ops.itc_loss``: image-text contrastive loss with queue, momentum distillation and hard negatives."""

from __future__ import annotations

import torch
from torch import Tensor

from mome.ops._dispatch import BACKENDS as BACKEND_NAMES
from mome.ops._dispatch import OpBackends
from mome.ops._validate import INT_DTYPES, check_choice, check_device, check_float, check_same, check_shape, check_tensor
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


def _check_features(name: str, value: Tensor, image_feats: Tensor, rows: int | None) -> None:
    check_float(name, value, ndim=2)
    check_same(name, value, "image_feats", image_feats)
    check_shape(name, value, (rows, image_feats.shape[1]), f"(rows, d) with d = {image_feats.shape[1]}")


def _check_id_vector(name: str, ids: Tensor, length: int, what: str, device: torch.device) -> Tensor:
    check_tensor(name, ids, ndim=1, dtypes=INT_DTYPES)
    check_shape(name, ids, (length,), what)
    check_device(name, ids, device, "image_feats")
    return ids.to(torch.int64).contiguous()


def _scale_tensor(scale, image_feats: Tensor) -> Tensor:
    dtype = torch.float64 if image_feats.dtype == torch.float64 else torch.float32
    if isinstance(scale, Tensor):
        if scale.numel() != 1 or not scale.is_floating_point():
            raise ValueError(f"scale must be a float or a one-element float tensor, got {tuple(scale.shape)} {scale.dtype}")
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
        raise ValueError(f"image_feats must have at least one row and one feature, got shape {tuple(image_feats.shape)}")
    _check_features("text_feats", text_feats, image_feats, batch)
    for name, value in (("image_feats_m", image_feats_m), ("text_feats_m", text_feats_m)):
        if value is not None:
            _check_features(name, value, image_feats, batch)
    if (image_queue is None) != (text_queue is None):
        raise ValueError("image_queue and text_queue go together: pass both or neither")
    queue = 0
    if image_queue is not None:
        _check_features("image_queue", image_queue, image_feats, None)
        queue = image_queue.shape[0]
        _check_features("text_queue", text_queue, image_feats, queue)
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if alpha > 0 and (image_feats_m is None or text_feats_m is None):
        raise ValueError("alpha > 0 needs image_feats_m and text_feats_m: the soft targets come from momentum features")
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
