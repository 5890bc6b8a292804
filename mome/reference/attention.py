"""Shared self-attention with structured masks: the specification."""

from __future__ import annotations

import torch
from torch import Tensor

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
) -> Tensor:
    """softmax(q kᵀ · scale, masked) v for q ``(B, H, Nq, D)``, k/v ``(B, Hkv, Nk, D)``.

    Materialises the ``(B, H, Nq, Nk)`` scores: reads q, k, v once, but writes and
    reads back ``B·H·Nq·Nk`` scores and probabilities — the traffic a fused kernel
    removes. A query that sees no key gets an output of zeros.
    """
    batch, heads, nq, head_dim = q.shape
    kv_heads, nk = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=1)  # [B, H, Nk, D]
    v = v.repeat_interleave(group, dim=1)
    visible = attention_visibility(
        batch,
        nq,
        nk,
        causal=causal,
        key_padding_mask=key_padding_mask,
        prefix_len=prefix_len,
        modality=modality,
        modality_mask=modality_mask,
        device=q.device,
    )[:, None]  # [B, 1, Nq, Nk]
    scores = visible_scores(q, k, visible, scale)  # [B, H, Nq, Nk], -inf where hidden
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)  # fully-masked rows: 0, not NaN
    return weighted_values(probs, v, visible)


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


def attention_fwd(q, k, v, masks, scale):
    dtype = compute_dtype(q)
    q32, k32, v32 = q.to(dtype), k.to(dtype), v.to(dtype)
    mask_args = masks._asdict()
    out = attention_ref(q32, k32, v32, scale=scale, **mask_args)
    group = q.shape[1] // k.shape[1]
    visible = attention_visibility(q.shape[0], q.shape[2], k.shape[2], device=q.device, **mask_args)[:, None]
    scores = visible_scores(q32, k32.repeat_interleave(group, dim=1), visible, scale)
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Nq], -inf: no key
    return out.to(q.dtype), lse.float()


def attention_bwd(dout, q, k, v, out, lse, masks, scale):
    def forward(q_, k_, v_):
        return attention_ref(q_, k_, v_, scale=scale, **masks._asdict())

    return tuple(vjp(forward, [q, k, v], [dout]))
