"""mome.ops.attention on the reference backend vs an explicit per-element mask and dense softmax."""

import math

import pytest
import torch

from mome.ops import attention
from tests.helpers import assert_close


def naive_attention(q, k, v, *, causal, key_padding_mask, prefix_len, modality, modality_mask, scale):
    """Loops over (b, h, i, j), deciding visibility from the definitions in the op's docstring."""
    batch, heads, nq, _ = q.shape
    kv_heads, nk = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            for i in range(nq):
                position = i + nk - nq
                visible = []
                for j in range(nk):
                    ok = True
                    if causal:
                        ok = j <= position or (prefix_len is not None and j < prefix_len[b])
                    if key_padding_mask is not None and key_padding_mask[b, j]:
                        ok = False
                    if modality is not None and not modality_mask[modality[b, position], modality[b, j]]:
                        ok = False
                    if ok:
                        visible.append(j)
                if not visible:
                    continue
                scores = torch.stack([q[b, h, i] @ k[b, kv, j] * scale for j in visible])
                weights = torch.softmax(scores, dim=0)
                out[b, h, i] = sum(w * v[b, kv, j] for w, j in zip(weights, visible, strict=True))
    return out


def random_case(batch, heads, kv_heads, nq, nk, dim, *, padding=False, prefix=False, modalities=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, nq, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, nk, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, nk, dim, generator=gen, dtype=torch.float64)
    masks = {}
    if padding:
        masks["key_padding_mask"] = torch.rand(batch, nk, generator=gen) < 0.3
    if prefix:
        masks["prefix_len"] = torch.randint(0, nk + 1, (batch,), generator=gen)
    if modalities:
        masks["modality"] = torch.randint(0, modalities, (batch, nk), generator=gen)
        masks["modality_mask"] = torch.rand(modalities, modalities, generator=gen) < 0.6
    return q, k, v, masks


CASES = [
    # (batch, heads, kv_heads, nq, nk, dim, causal, padding, prefix, modalities)
    (1, 1, 1, 1, 1, 8, False, False, False, 0),
    (2, 3, 3, 7, 7, 5, False, False, False, 0),
    (2, 2, 1, 7, 9, 8, True, False, False, 0),
    (1, 4, 2, 9, 7, 8, True, False, False, 0),  # Nq > Nk: early queries see nothing
    (2, 2, 2, 13, 13, 16, False, True, False, 0),
    (2, 2, 1, 11, 11, 8, True, False, True, 0),
    (2, 2, 2, 10, 10, 8, False, False, False, 3),
    (2, 4, 2, 6, 12, 8, True, True, True, 3),
]


@pytest.mark.parametrize("batch, heads, kv_heads, nq, nk, dim, causal, padding, prefix, modalities", CASES)
def test_matches_explicit_loop(batch, heads, kv_heads, nq, nk, dim, causal, padding, prefix, modalities):
    q, k, v, masks = random_case(batch, heads, kv_heads, nq, nk, dim, padding=padding, prefix=prefix,
                                 modalities=modalities)  # fmt: skip
    scale = 0.37
    full = dict(key_padding_mask=None, prefix_len=None, modality=None, modality_mask=None) | masks
    expected = naive_attention(q, k, v, causal=causal, scale=scale, **full)
    actual = attention(q, k, v, causal=causal, scale=scale, backend="reference", **masks)
    assert_close(actual, expected, 1e-12)


def test_vlm_sized_prefix_lm_against_dense_sdpa():
    """197 image tokens + 40 text tokens, prefix-LM: equal to SDPA with the dense boolean mask."""
    batch, heads, image_tokens, text_tokens, dim = 2, 2, 197, 40, 16
    n = image_tokens + text_tokens
    q, k, v, _ = random_case(batch, heads, heads, n, n, dim, seed=3)
    allowed = torch.ones(n, n).tril().bool()
    allowed[:, :image_tokens] = True
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    actual = attention(q, k, v, causal=True, prefix_len=image_tokens, backend="reference")
    assert_close(actual, expected, 1e-12)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, _ = random_case(1, 2, 2, 5, 5, 37, seed=4)
    expected = attention(q, k, v, scale=1 / math.sqrt(37), backend="reference")
    assert_close(attention(q, k, v, backend="reference"), expected, 1e-14)


def test_fully_masked_rows_give_zero_output_and_gradient():
    q, k, v, _ = random_case(2, 2, 2, 6, 6, 8, seed=5)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    padding = torch.ones(2, 6, dtype=torch.bool)
    padding[1, :2] = False  # batch 0 sees nothing; batch 1 sees keys 0, 1
    out = attention(q, k, v, key_padding_mask=padding, backend="reference")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert (out[0] == 0).all() and (q.grad[0] == 0).all() and (k.grad[0] == 0).all()
    assert (out[1] != 0).any()


@pytest.mark.parametrize("causal, padding, prefix, modalities", [(False, False, False, 0), (True, True, True, 2)])
def test_gradcheck(causal, padding, prefix, modalities):
    q, k, v, masks = random_case(2, 4, 2, 5, 7, 6, padding=padding, prefix=prefix, modalities=modalities, seed=6)
    if padding:
        masks["key_padding_mask"][:, 0] = False  # keep every row visible: no all-zero rows in the numeric check
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, causal=causal, backend="reference", **masks),
                                    inputs)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_keep_their_dtype(dtype):
    q, k, v, _ = random_case(1, 2, 2, 9, 9, 8, seed=7)
    expected = attention(q, k, v, causal=True, backend="reference")
    actual = attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=True, backend="reference")
    assert actual.dtype == dtype
    assert_close(actual, expected, {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype])
