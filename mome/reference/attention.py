"""Shared self-attention with structured masks: the specification."""

from __future__ import annotations

import torch
from torch import Tensor


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
    scores = (q @ k.transpose(-2, -1)) * scale  # [B, H, Nq, Nk]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)  # fully-masked rows: 0, not NaN
    return probs @ v
