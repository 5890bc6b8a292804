"""``F.scaled_dot_product_attention``'s arguments onto ``mome.ops.attention``, or the reason they do not map.

:class:`SdpaOnMome` routes the sdpa calls made inside a block to it (a ``TorchFunctionMode``: the library's own
forward runs unchanged, RoPE, norms and gates included, and only its sdpa call changes), falling back to the real
sdpa with the reason tallied. Masks map as structure: an attached one (:mod:`mome.nn.masks`), else recognised from
the values once per mask tensor.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from mome import ops
from mome.integrations._tally import Tally
from mome.nn.masks import structure_of


def _padding_for(structure_padding: Tensor | None, batch: int, nk: int) -> Tensor | None | str:
    if structure_padding is None:
        return None
    if structure_padding.shape[0] not in (1, batch):
        return f"a key padding mask for batch {structure_padding.shape[0]}, attention batch {batch}"
    return structure_padding.expand(batch, nk)


def attention_like_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor | str:
    """What ``F.scaled_dot_product_attention`` returns, computed by ``mome.ops.attention``; or why it cannot be."""
    if not all(isinstance(t, Tensor) and t.dim() == 4 for t in (query, key, value)):
        return "inputs that are not (batch, heads, seq, head_dim) tensors"
    if dropout_p > 0:
        return "attention dropout (dropout_p > 0)"
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        return "a value head dim different from the query's"
    if not (query.dtype == key.dtype == value.dtype):
        return "q, k and v of different dtypes"
    batch, heads, nq, _ = query.shape
    if key.shape[0] != batch or value.shape[0] != batch:
        return "q and k/v of different batch sizes (broadcast batch)"
    kv_heads, nk = key.shape[1], key.shape[2]
    if kv_heads != heads and not (enable_gqa and heads % kv_heads == 0):
        return "k/v heads that do not match q's heads"
    causal, padding = False, None
    if is_causal:
        if attn_mask is not None:
            return "attn_mask together with is_causal"
        if nq != nk:
            return "is_causal with query and key lengths that differ (sdpa aligns it top-left)"
        causal = True
    elif attn_mask is not None:
        structure = structure_of(attn_mask, nq, nk)
        if structure is None:
            return "an attn_mask that is neither causal nor key padding (a bias, per-head or windowed mask)"
        causal = structure.causal
        padding = _padding_for(structure.key_padding_mask, batch, nk)
        if isinstance(padding, str):
            return padding
    return ops.attention(query, key, value, causal=causal, key_padding_mask=padding, scale=scale)


class SdpaOnMome(TorchFunctionMode):
    """Inside ``with SdpaOnMome(tally):``, ``F.scaled_dot_product_attention`` runs on mome where it maps."""

    def __init__(self, tally: Tally):
        super().__init__()
        self.tally = tally

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        out = attention_like_sdpa(*args, **kwargs)
        if isinstance(out, str):
            self.tally.fell_back(out)
            return func(*args, **kwargs)
        self.tally.ran()
        return out
