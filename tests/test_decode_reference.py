"""decode_attention (reference backend) vs full attention over each sequence's valid prefix."""

import pytest
import torch

from mome.ops import attention, decode_attention
from tests.helpers import assert_close


@pytest.mark.parametrize("batch, heads, kv_heads, nmax, dim", [(1, 1, 1, 1, 8), (4, 4, 2, 37, 16), (3, 6, 1, 64, 32)])
def test_matches_attention_over_the_valid_prefix(batch, heads, kv_heads, nmax, dim):
    gen = torch.Generator().manual_seed(nmax)
    q = torch.randn(batch, heads, dim, generator=gen, dtype=torch.float64)
    k_cache = torch.randn(batch, kv_heads, nmax, dim, generator=gen, dtype=torch.float64)
    v_cache = torch.randn(batch, kv_heads, nmax, dim, generator=gen, dtype=torch.float64)
    seqlens = torch.randint(1, nmax + 1, (batch,), generator=gen)
    seqlens[0] = nmax
    seqlens[-1] = 1
    out = decode_attention(q, k_cache, v_cache, seqlens, backend="reference")
    for b in range(batch):
        n = int(seqlens[b])
        expected = attention(q[b : b + 1, :, None], k_cache[b : b + 1, :, :n], v_cache[b : b + 1, :, :n],
                             backend="reference")[0, :, 0]  # fmt: skip
        assert_close(out[b], expected, 1e-12, f"sequence {b}")


def test_empty_cache_gives_zeros_and_int32_lengths_work():
    q = torch.randn(2, 2, 8)
    cache = torch.randn(2, 2, 5, 8)
    out = decode_attention(q, cache, cache, torch.tensor([0, 5], dtype=torch.int32), backend="reference")
    assert (out[0] == 0).all() and torch.isfinite(out).all()
    assert_close(out[1], attention(q[1:, :, None], cache[1:], cache[1:])[0, :, 0], 1e-6)
