"""CoCa's captioning path one chunk of new tokens at a time: the text tower and the multimodal decoder run only
the tokens not seen yet, against per-layer KV caches of their causal self-attention; the cross-attention keys and
values of the image tokens are projected once. A single new token attends through ``mome.ops.decode_attention``,
a first chunk (the prompt) through ``mome.ops.attention``.

What open_clip computes, and so what this reproduces:

- text tower: ``token_embedding(ids) + positional_embedding[position]``, causal blocks; with ``embed_cls`` the CLS
  token sits after the text, where no text token sees it, and the tokens leave the tower without ``ln_final``
  (without ``embed_cls`` they leave through it);
- its additive mask hides some keys from every query: with ``embed_cls``, key ``j`` when token ``j - 1`` is the
  tower's ``pad_id`` (open_clip's legacy layout, the CLS slot counted first) or, with ``correct_cls_mask``, when
  token ``j`` is. A hidden key is never stored: each sequence keeps its own count of cached keys;
- decoder: per layer a causal self-attention block, then a cross-attention block over ``ln_1_kv(image_embs)``;
  logits ``ln_final(x) @ text_projection``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mome import ops
from mome.integrations._tally import Tally
from mome.nn._heads import merge_heads, split_heads


def _projection(attn: nn.MultiheadAttention, which: int, x: Tensor) -> Tensor:
    """Query (0), key (1) or value (2) projection of ``attn`` applied to ``x``, split into heads."""
    if attn.in_proj_weight is not None:
        width = attn.embed_dim
        weight = attn.in_proj_weight[which * width : (which + 1) * width]
    else:
        weight = (attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight)[which]
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias.chunk(3)[which]
    return split_heads(nn.functional.linear(x, weight, bias), attn.num_heads)


class _SelfCache:
    """Keys and values ``(B, H, capacity + 1, D)`` of one causal self-attention; the last slot takes the writes of
    hidden keys, which no length ever reaches."""

    def __init__(self, attn: nn.MultiheadAttention, batch: int, capacity: int, like: Tensor):
        shape = (batch, attn.num_heads, capacity + 1, attn.embed_dim // attn.num_heads)
        self.k = like.new_empty(shape)
        self.v = like.new_empty(shape)


class CocaSteps:
    """The caption logits of a CoCa ``model`` for a growing text, computing only the new tokens each call.

    ``image_embs``: ``(B, M, W)`` image tokens from ``model._encode_image``; ``capacity``: the most text tokens the
    caches hold. Call :meth:`feed` with the whole text so far; :meth:`reset` before a text that is not the previous
    one plus new tokens at the end; :meth:`reorder` when the rows change places (beam search).
    """

    def __init__(self, model: nn.Module, image_embs: Tensor, capacity: int, tally: Tally):
        self.text, self.decoder, self.tally = model.text, model.text_decoder, tally
        batch, self.capacity = image_embs.shape[0], capacity
        self.dtype = self.text.transformer.get_cast_dtype()
        self.image_kv = []
        for block in self.decoder.cross_attn:
            image = block.ln_1_kv(image_embs)
            k, v = (_projection(block.attn, which, image).contiguous() for which in (1, 2))
            self.image_kv.append((k, v))
        self.image_lens = torch.full((batch,), image_embs.shape[1], dtype=torch.int32, device=image_embs.device)
        like = image_embs.new_empty(0, dtype=self.dtype)
        self.text_caches = [_SelfCache(b.attn, batch, capacity, like) for b in self.text.transformer.resblocks]
        self.decoder_caches = [_SelfCache(b.attn, batch, capacity, like) for b in self.decoder.resblocks]
        self.reset()

    def reset(self) -> None:
        self.seen = 0  # text positions fed so far
        self.text_lens = self.image_lens.new_zeros(self.image_lens.shape)  # keys cached per sequence

    def reorder(self, rows: Tensor) -> None:
        """Row ``r`` of the text caches becomes row ``rows[r]``, as beam search reorders its beams: the text so far
        of sequence ``r`` is then that of ``rows[r]``. The image keys and values stay: each row keeps its image."""
        for cache in (*self.text_caches, *self.decoder_caches):
            cache.k = cache.k.index_select(0, rows)
            cache.v = cache.v.index_select(0, rows)
        self.text_lens = self.text_lens.index_select(0, rows)

    def feed(self, ids: Tensor) -> Tensor:
        """``ids`` ``(B, L)``: the text so far, ``L > seen``. Returns the logits ``(B, V)`` of its last position."""
        new = ids.shape[1] - self.seen
        if new <= 0 or (new > 1 and self.seen > 0):
            raise ValueError(f"ids must add one token to the {self.seen} fed so far, or start afresh; got {ids.shape}")
        if ids.shape[1] > self.capacity:
            raise ValueError(f"ids hold {ids.shape[1]} tokens; the caches hold {self.capacity}")
        positions = slice(self.seen, ids.shape[1])
        x = self.text.token_embedding(ids[:, positions]).to(self.dtype)
        x = x + self.text.positional_embedding[positions].to(self.dtype)
        keep = self._visible_keys(ids)[:, positions]  # [B, T]
        slots = self.text_lens[:, None] + keep.cumsum(1, dtype=torch.int32) - 1
        slots = torch.where(keep, slots, self.capacity)
        self.text_lens = self.text_lens + keep.sum(1, dtype=torch.int32)
        for block, cache in zip(self.text.transformer.resblocks, self.text_caches, strict=True):
            x = self._self_block(block, x, cache, slots, self.text_lens, ~keep)
        if self.text.cls_emb is None:
            x = self.text.ln_final(x)
        slots = torch.arange(self.seen, ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        decoder_lens = torch.full_like(self.text_lens, ids.shape[1])
        for block, cross, cache, (k, v) in zip(
            self.decoder.resblocks, self.decoder.cross_attn, self.decoder_caches, self.image_kv, strict=True
        ):
            x = self._self_block(block, x, cache, slots, decoder_lens, None)
            x = self._cross_block(cross, x, k, v)
        self.seen = ids.shape[1]
        out = self.decoder.ln_final(x[:, -1])
        return out if self.decoder.text_projection is None else out @ self.decoder.text_projection

    def _visible_keys(self, ids: Tensor) -> Tensor:
        """``(B, L)`` bool: the text tower's keys its additive mask leaves visible (to every query)."""
        if self.text.cls_emb is None:
            return torch.ones_like(ids, dtype=torch.bool)
        valid = ids != self.text.pad_id
        if self.text.correct_cls_mask:
            return valid
        return torch.cat([valid.new_ones(ids.shape[0], 1), valid[:, :-1]], 1)  # the CLS slot first, as open_clip

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, lens: Tensor, causal: bool, hidden: Tensor | None) -> Tensor:
        """One new query: ``decode_attention`` over the first ``lens`` cached keys; a chunk: ``attention`` over
        its own keys (``k``, ``v`` are then the chunk's, the caches being empty)."""
        self.tally.ran()
        if q.shape[2] == 1:
            return ops.decode_attention(q[:, :, 0], k, v, lens)[:, :, None]
        return ops.attention(q, k, v, causal=causal, key_padding_mask=hidden)

    def _self_block(self, block, x, cache: _SelfCache, slots, lens, hidden) -> Tensor:
        attn = block.attn
        h = block.ln_1(x)
        q, k, v = (_projection(attn, which, h) for which in (0, 1, 2))
        rows = torch.arange(x.shape[0], device=x.device)[:, None]
        cache.k[rows, :, slots] = k.transpose(1, 2)  # [B, T, H, D] into the (sequence, slot) pairs
        cache.v[rows, :, slots] = v.transpose(1, 2)
        if q.shape[2] == 1:
            k, v = cache.k, cache.v
        x = x + block.ls_1(attn.out_proj(merge_heads(self._attend(q, k, v, lens, True, hidden))))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def _cross_block(self, block, x, image_k: Tensor, image_v: Tensor) -> Tensor:
        q = _projection(block.attn, 0, block.ln_1(x))
        attended = self._attend(q, image_k, image_v, self.image_lens, False, None)
        x = x + block.ls_1(block.attn.out_proj(merge_heads(attended)))
        return x + block.ls_2(block.mlp(block.ln_2(x)))
