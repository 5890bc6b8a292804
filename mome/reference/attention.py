"""Shared self-attention with structured masks: the specification."""

from __future__ import annotations

import torch
from torch import Tensor

from mome.reference import dropout as attention_dropout
from mome.reference._launch import ALL_FLOAT_DTYPES, compute_dtype, vjp


def attention_visibility(
    batch: int,
    nq: int,
    nk: int,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    prefix_len: Tensor | None = None,
    modality: Tensor | None = None,
    modality_mask: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Boolean ``(B, Nq, Nk)`` table: True where query i may see key j.

    Query i sits at absolute position ``i + Nk - Nq`` (bottom-right alignment),
    which is what causal and the queries' modality ids refer to.
    """
    query_pos = torch.arange(nq, device=device) + (nk - nq)  # [Nq]
    key_pos = torch.arange(nk, device=device)  # [Nk]
    visible = torch.ones(batch, nq, nk, dtype=torch.bool, device=device)
    if causal:
        causal_ok = key_pos[None, None, :] <= query_pos[None, :, None]  # [1, Nq, Nk]
        if prefix_len is not None:
            in_prefix = key_pos[None, :] < prefix_len.reshape(batch, 1)  # [B, Nk]
            causal_ok = causal_ok | in_prefix[:, None, :]
        visible = visible & causal_ok
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, :]
    if modality is not None:
        query_modality = modality[:, nk - nq :] if nq <= nk else None
        if query_modality is None:
            raise ValueError(f"modality ids need Nq <= Nk to give queries an id (got Nq={nq}, Nk={nk})")
        allowed = modality_mask[query_modality[:, :, None], modality[:, None, :]]  # [B, Nq, Nk]
        visible = visible & allowed
    return visible


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    prefix_len: Tensor | None = None,
    modality: Tensor | None = None,
    modality_mask: Tensor | None = None,
    scale: float | None = None,
    attn_bias: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: Tensor | None = None,
) -> Tensor:
    """dropout(softmax(q kᵀ · scale + attn_bias, masked)) v for q ``(B, H, Nq, D)``, k/v ``(B, Hkv, Nk, D)``.

    Materialises the ``(B, H, Nq, Nk)`` scores: reads q, k, v once, but writes and reads back ``B·H·Nq·Nk``
    scores and probabilities — the traffic a fused kernel removes. ``attn_bias`` ``(1|B, 1|H, Nq, Nk)`` in q's
    dtype; a pair it gives ``-inf`` is hidden like a structurally masked one. A query that sees no key gets an
    output of zeros. With ``dropout_p > 0`` the mask is :func:`mome.reference.dropout.attention_keep` of
    ``dropout_seed``.
    """
    masks = dict(causal=causal, key_padding_mask=key_padding_mask, prefix_len=prefix_len, modality=modality,
                 modality_mask=modality_mask)  # fmt: skip
    scores, visible = biased_scores(q, k, masks, scale, attn_bias)  # [B, H, Nq, Nk], -inf where hidden
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)  # fully-masked rows: 0, not NaN
    if dropout_p > 0:
        batch, heads, nq, nk = scores.shape
        keep = attention_dropout.attention_keep(dropout_seed, batch, heads, nq, nk, dropout_p)
        probs = torch.where(keep, probs * attention_dropout.keep_scale(dropout_p), 0.0)
    group = q.shape[1] // k.shape[1]
    return weighted_values(probs, v.repeat_interleave(group, dim=1), visible)


def biased_scores(q: Tensor, k: Tensor, masks: dict, scale: float | None, attn_bias: Tensor | None):
    """``(scores, visible)``: ``q kᵀ · scale + attn_bias`` ``(B, H, Nq, Nk)``, -inf where hidden, and the
    ``(B, 1|H, Nq, Nk)`` visibility (structure, and a bias that is not -inf)."""
    batch, heads, nq, head_dim = q.shape
    kv_heads, nk = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    visible = attention_visibility(batch, nq, nk, device=q.device, **masks)[:, None]  # [B, 1, Nq, Nk]
    if attn_bias is not None:
        visible = visible & ~torch.isneginf(attn_bias)
    scores = visible_scores(q, k.repeat_interleave(heads // kv_heads, dim=1), visible, scale)
    if attn_bias is not None:  # where, not +: an +inf bias on a hidden pair must not make it NaN
        scores = torch.where(visible, scores + attn_bias, float("-inf"))
    return scores, visible


# Hidden keys never contribute, whatever they hold: a NaN or Inf in the q, k or v of a hidden (query, key) pair
# must not reach that query's output or any gradient (0 · NaN would be NaN). The products below run on the finite
# part of the inputs; the pairs that involve a non-finite entry and are visible are then recomputed exactly, so a
# real NaN still propagates to the queries that see it. The exact path costs B·H·Nq·Nk·D memory and runs only
# when some input is not finite. Inside `torch.where`, both branches see inputs masked by the same condition, so
# the backward never multiplies a zero gradient by a NaN either.


def _finite_part(t: Tensor) -> tuple[Tensor, Tensor]:
    finite = torch.isfinite(t)
    return torch.where(finite, t, 0.0), finite


def visible_scores(q: Tensor, k: Tensor, visible: Tensor, scale) -> Tensor:
    """``q kᵀ · scale`` ``(B, H, Nq, Nk)`` where ``visible`` ``(B, 1|H, Nq, Nk)``, -inf elsewhere."""
    q_finite, q_ok = _finite_part(q)
    k_finite, k_ok = _finite_part(k)
    scores = q_finite @ k_finite.transpose(-2, -1)
    if not (q_ok.all() and k_ok.all()):
        dirty = (~q_ok.all(-1))[..., :, None] | (~k_ok.all(-1))[..., None, :]  # [B, H, Nq, Nk]
        exact = (dirty & visible)[..., None]
        pairs = torch.where(exact, q[..., :, None, :], 0.0) * torch.where(exact, k[..., None, :, :], 0.0)
        scores = torch.where(dirty & visible, pairs.sum(-1), scores)
    return (scores * scale).masked_fill(~visible, float("-inf"))


def weighted_values(probs: Tensor, v: Tensor, visible: Tensor) -> Tensor:
    """``probs @ v`` where hidden pairs (probability exactly 0) never multiply their value."""
    v_finite, v_ok = _finite_part(v)
    out = probs @ v_finite
    if not v_ok.all():
        exact = visible[..., None] & ~v_ok[..., None, :, :]  # [B, H, Nq, Nk, D]
        pairs = torch.where(exact, probs[..., None], 0.0) * torch.where(exact, v[..., None, :, :], 0.0)
        out = out + pairs.sum(-2)
    return out


# --- launchers of the attention backend contract (mome.ops.attention.AttentionBackend) ---

LIMITS = {"dtypes": ALL_FLOAT_DTYPES}


def attention_fwd(q, k, v, masks, scale, bias, dropout):
    dtype = compute_dtype(q)
    q32, k32, v32, bias32 = (None if t is None else t.to(dtype) for t in (q, k, v, bias))
    out = attention_ref(q32, k32, v32, scale=scale, **_extras(bias32, dropout), **masks._asdict())
    scores, _visible = biased_scores(q32, k32, masks._asdict(), scale, bias32)
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Nq], -inf: no key
    return out.to(q.dtype), lse.float()


def _extras(bias: Tensor | None, dropout) -> dict:
    if dropout is None:
        return dict(attn_bias=bias)
    return dict(attn_bias=bias, dropout_p=dropout.p, dropout_seed=dropout.seed)


def attention_bwd(dout, q, k, v, out, lse, masks, scale, bias, dropout, bias_grad):
    def forward(q_, k_, v_, bias_=None):
        return attention_ref(q_, k_, v_, scale=scale, **_extras(bias_ if bias_grad else fixed_bias, dropout),
                             **masks._asdict())  # fmt: skip

    fixed_bias = None if bias is None else bias.to(compute_dtype(q))
    inputs = [q, k, v, bias] if bias_grad else [q, k, v]
    grads = vjp(forward, inputs, [dout])
    return (*grads[:3], grads[3] if bias_grad else None)
