"""The reference backend behind the launcher contract that every backend module follows.

Forward launchers run the specification in ``mome.reference`` (half precision is
computed in float32 and rounded back: CPU matmuls have no fast fp16 path).
Backward launchers recompute the forward under autograd and take its
vector-Jacobian product, so the gradients are those of the specification itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mome.reference import (
    apply_activation,
    attention_ref,
    attention_visibility,
    decode_attention_ref,
    itc_loss_local_ref,
    itc_loss_ref,
    modality_layer_norm_ref,
    modality_linear_ref,
)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _up(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _vjp(fn, inputs: list[Tensor | None], grads: list[Tensor | None]) -> list[Tensor | None]:
    """Gradients of ``fn(*inputs)`` (a tensor or tuple of tensors) w.r.t. every input that is not None.

    Uses ``torch.func.vjp``: custom-op implementations run below the autograd
    dispatch key, where ``torch.autograd.grad`` records nothing.
    """
    dtype = _compute_dtype(next(t for t in inputs if t is not None))
    present = [i for i, t in enumerate(inputs) if t is not None]

    def on_present(*values):
        full = list(inputs)
        for index, value in zip(present, values, strict=True):
            full[index] = value
        outputs = fn(*[None if t is None else t.to(dtype) for t in full])
        return outputs if isinstance(outputs, tuple) else (outputs,)

    outputs, pullback = torch.func.vjp(on_present, *[inputs[i] for i in present])
    cotangents = tuple(torch.zeros_like(o) if g is None else g.to(o.dtype) for o, g in zip(outputs, grads, strict=True))
    computed = pullback(cotangents)
    result: list[Tensor | None] = [None] * len(inputs)
    for index, grad in zip(present, computed, strict=True):
        result[index] = grad.to(inputs[index].dtype)
    return result


def attention_fwd(q, k, v, *, causal, key_padding_mask, prefix_len, modality, modality_mask, scale):
    masks = dict(
        causal=causal,
        key_padding_mask=key_padding_mask,
        prefix_len=prefix_len,
        modality=modality,
        modality_mask=modality_mask,
    )
    dtype = _compute_dtype(q)
    q32, k32, v32 = q.to(dtype), k.to(dtype), v.to(dtype)
    out = attention_ref(q32, k32, v32, scale=scale, **masks)
    group = q.shape[1] // k.shape[1]
    visible = attention_visibility(q.shape[0], q.shape[2], k.shape[2], device=q.device, **masks)[:, None]
    scores = (q32 @ k32.repeat_interleave(group, dim=1).transpose(-2, -1)) * scale
    lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)  # [B, H, Nq], -inf: no key
    return out.to(q.dtype), lse.float()


def attention_bwd(dout, q, k, v, out, lse, *, causal, key_padding_mask, prefix_len, modality, modality_mask, scale):
    def forward(q_, k_, v_):
        return attention_ref(
            q_,
            k_,
            v_,
            causal=causal,
            key_padding_mask=key_padding_mask,
            prefix_len=prefix_len,
            modality=modality,
            modality_mask=modality_mask,
            scale=scale,
        )

    return tuple(_vjp(forward, [q, k, v], [dout]))


def decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, *, scale):
    dtype = _compute_dtype(q)
    out = decode_attention_ref(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), cache_seqlens, scale=scale)
    return out.to(q.dtype)


def modality_linear_fwd(x, modality, weight, bias, *, activation):
    dtype = _compute_dtype(x)
    pre = modality_linear_ref(x.to(dtype), modality, weight.to(dtype), _up(bias, dtype))
    out = apply_activation(pre, activation).to(x.dtype)
    return out, (pre.to(x.dtype) if activation is not None else x.new_empty(0))


def modality_linear_bwd(dy, x, modality, weight, bias, pre, *, activation):
    def forward(x_, weight_, bias_):
        return modality_linear_ref(x_, modality, weight_, bias_, activation=activation)

    return tuple(_vjp(forward, [x, weight, bias], [dy]))


def modality_layer_norm_fwd(x, modality, weight, bias, *, eps):
    dtype = _compute_dtype(x)
    x32 = x.to(dtype)
    out = modality_layer_norm_ref(x32, modality, weight.to(dtype), _up(bias, dtype), eps)
    var, mean = torch.var_mean(x32.float(), dim=-1, correction=0)
    return out.to(x.dtype), mean, torch.rsqrt(var + eps)


def modality_layer_norm_bwd(dy, x, modality, weight, bias, mean, rstd, *, eps):
    def forward(x_, weight_, bias_):
        return modality_layer_norm_ref(x_, modality, weight_, bias_, eps)

    return tuple(_vjp(forward, [x, weight, bias], [dy]))


def _itc_forward(alpha, positive_ids, queue_ids, hard_negatives=None, generator=None):
    def forward(image_feats, text_feats, scale, image_feats_m, text_feats_m, image_queue, text_queue):
        result = itc_loss_ref(
            image_feats,
            text_feats,
            scale,
            image_feats_m=image_feats_m,
            text_feats_m=text_feats_m,
            image_queue=image_queue,
            text_queue=text_queue,
            alpha=alpha,
            positive_ids=positive_ids,
            queue_ids=queue_ids,
            hard_negatives=hard_negatives,
            generator=generator,
        )
        return result

    return forward


def itc_loss_fwd(
    image_feats,
    text_feats,
    scale,
    image_feats_m,
    text_feats_m,
    image_queue,
    text_queue,
    positive_ids,
    queue_ids,
    *,
    alpha,
    hard_negatives,
    seed,
):
    generator = torch.Generator(image_feats.device).manual_seed(seed)
    dtype = _compute_dtype(image_feats)
    features = [image_feats, text_feats, scale, image_feats_m, text_feats_m, image_queue, text_queue]
    up = [_up(t, dtype) for t in features]
    result = _itc_forward(alpha, positive_ids, queue_ids, hard_negatives, generator)(*up)
    text_columns = torch.cat([c for c in (up[4] if up[4] is not None else up[1], up[6]) if c is not None])
    image_columns = torch.cat([c for c in (up[3] if up[3] is not None else up[0], up[5]) if c is not None])
    lse_i2t = torch.logsumexp(up[2] * up[0] @ text_columns.T, dim=1)
    lse_t2i = torch.logsumexp(up[2] * up[1] @ image_columns.T, dim=1)

    def picked(indices):
        return torch.empty(0, dtype=torch.int64, device=image_feats.device) if indices is None else indices

    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return (
        result.loss_i2t.to(loss_dtype),
        result.loss_t2i.to(loss_dtype),
        picked(result.neg_text_idx),
        picked(result.neg_image_idx),
        lse_i2t.float(),
        lse_t2i.float(),
    )


def itc_loss_bwd(
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
    *,
    alpha,
):
    forward = _itc_forward(alpha, positive_ids, queue_ids)

    def losses(*features):
        result = forward(*features)
        return result.loss_i2t, result.loss_t2i

    features = [image_feats, text_feats, scale, image_feats_m, text_feats_m, image_queue, text_queue]
    grads = _vjp(losses, features, [d_loss_i2t, d_loss_t2i])
    return grads[0], grads[1], grads[2]


# itc_loss_local: this rank's rows against the global batch (mome.nn.ITCLoss(gather=True))


def _local_spec(alpha, positive_ids, queue_ids, row_offset, hard_negatives=None, seed=0):
    def forward(image_rows, text_rows, image_columns, text_columns, scale, image_rows_m, text_rows_m, image_queue,
                text_queue):  # fmt: skip
        return itc_loss_local_ref(
            image_rows, text_rows, image_columns, text_columns, scale, row_offset=row_offset,
            image_rows_m=image_rows_m, text_rows_m=text_rows_m, image_queue=image_queue, text_queue=text_queue,
            alpha=alpha, positive_ids=positive_ids, queue_ids=queue_ids, hard_negatives=hard_negatives, seed=seed,
        )  # fmt: skip

    return forward


def itc_loss_local_fwd(
    image_rows, text_rows, image_columns, text_columns, scale, image_rows_m, text_rows_m, image_queue, text_queue,
    positive_ids, queue_ids, *, row_offset, alpha, hard_negatives, seed,
):  # fmt: skip
    dtype = torch.float32 if image_rows.dtype in (torch.float16, torch.bfloat16) else image_rows.dtype
    features = [image_rows, text_rows, image_columns, text_columns, scale, image_rows_m, text_rows_m, image_queue,
                text_queue]  # fmt: skip
    up = [None if t is None else t.to(dtype) for t in features]
    result = _local_spec(alpha, positive_ids, queue_ids, row_offset, hard_negatives, seed)(*up)
    text_all = torch.cat([c for c in (up[3], up[8]) if c is not None])
    image_all = torch.cat([c for c in (up[2], up[7]) if c is not None])
    lse_i2t = torch.logsumexp(up[4] * up[0] @ text_all.T, dim=1)
    lse_t2i = torch.logsumexp(up[4] * up[1] @ image_all.T, dim=1)
    empty = torch.empty(0, dtype=torch.int64, device=image_rows.device)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return (
        result.loss_i2t.to(loss_dtype),
        result.loss_t2i.to(loss_dtype),
        empty if result.neg_text_idx is None else result.neg_text_idx,
        empty if result.neg_image_idx is None else result.neg_image_idx,
        lse_i2t.float(),
        lse_t2i.float(),
    )


def itc_loss_local_bwd(
    d_loss_i2t, d_loss_t2i, image_rows, text_rows, image_columns, text_columns, scale, image_rows_m, text_rows_m,
    image_queue, text_queue, positive_ids, queue_ids, lse_i2t, lse_t2i, *, row_offset, alpha, column_grads,
):  # fmt: skip
    forward = _local_spec(alpha, positive_ids, queue_ids, row_offset)

    def losses(*features):
        result = forward(*features)
        return result.loss_i2t, result.loss_t2i

    # only what gets a gradient is differentiated (the columns only with column_grads); the rest are constants
    def on_differentiated(image_rows_, text_rows_, scale_, *columns):
        dtype = image_rows_.dtype
        image_cols, text_cols = columns if columns else (image_columns.to(dtype), text_columns.to(dtype))
        constants = [None if t is None else t.to(dtype) for t in (image_rows_m, text_rows_m, image_queue, text_queue)]
        return losses(image_rows_, text_rows_, image_cols, text_cols, scale_, *constants)

    inputs = [image_rows, text_rows, scale, *([image_columns, text_columns] if column_grads else [])]
    grads = _vjp(on_differentiated, inputs, [d_loss_i2t, d_loss_t2i])
    d_image, d_text, d_scale = grads[:3]
    if column_grads:
        d_image_columns, d_text_columns = grads[3], grads[4]
    else:
        d_image_columns, d_text_columns = (image_columns.new_empty((0, image_columns.shape[1])) for _ in range(2))
    return d_image, d_text, d_image_columns, d_text_columns, d_scale
