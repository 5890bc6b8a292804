"""NaN and Inf: ignored entries never matter, real NaN propagates (README, "NaN, Inf, compile and torch.func").

Padding slots often hold uninitialised memory, so a NaN or Inf stored in a key that a query does not see must not
reach its output or any gradient; a NaN in something the op really reads (q, a visible key, the scale) must come
out as NaN, never as zeros.
"""

from __future__ import annotations

import pytest
import torch

from mome.ops import attention, decode_attention
from mome.ops.attention import BACKENDS as ATTENTION_BACKENDS
from mome.ops.decode import BACKENDS as DECODE_BACKENDS
from tests.helpers import usable_backends

NAN, INF = float("nan"), float("inf")
ATTENTION = usable_backends(ATTENTION_BACKENDS)
DECODE = usable_backends(DECODE_BACKENDS)


def _qkv(nq=40, nk=40, heads=2, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, n, dim, generator=gen) for n in (nq, nk, nk)]


def _attention_step(backend, q, k, v, **masks):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, **masks, backend=backend)
    out.sum().backward()
    return out, *(t.grad for t in leaves)


def _mask_kinds(nk):
    """(masks, hidden keys): each mask kind with keys that no query sees."""
    padding = torch.zeros(2, nk, dtype=torch.bool)
    padding[:, 29:] = True
    ids = torch.zeros(2, nk, dtype=torch.long)
    ids[:, 20:] = 1
    ids[:, 33:] = 2  # queries of modality 2 see modalities 0 and 1; no modality sees modality 2
    table = torch.tensor([[True, False, False], [True, True, False], [True, True, False]])
    hidden_by_modality = torch.zeros(nk, dtype=torch.bool)
    hidden_by_modality[33:] = True
    return {
        "padding": (dict(key_padding_mask=padding), padding[0]),
        "modality": (dict(modality=ids, modality_mask=table), hidden_by_modality),
        "padding_causal_prefix": (dict(key_padding_mask=padding, causal=True, prefix_len=5), padding[0]),
    }


@pytest.mark.parametrize("backend", ATTENTION)
@pytest.mark.parametrize("kind", ["padding", "modality", "padding_causal_prefix"])
@pytest.mark.parametrize("poison", [NAN, INF, -INF])
def test_attention_ignores_whatever_hidden_keys_hold(backend, kind, poison):
    q, k, v = _qkv()
    masks, hidden = _mask_kinds(k.shape[2])[kind]
    clean = _attention_step(backend, q, k, v, **masks)
    k[:, :, hidden], v[:, :, hidden] = poison, poison
    poisoned = _attention_step(backend, q, k, v, **masks)
    for name, a, b in zip(("out", "dq", "dk", "dv"), poisoned, clean, strict=True):
        if name in ("dk", "dv"):  # a hidden key's own gradient is 0 either way
            assert torch.equal(a[:, :, hidden], torch.zeros_like(a[:, :, hidden])), name
        torch.testing.assert_close(a, b, msg=f"{name} changed when hidden keys hold {poison}")


@pytest.mark.parametrize("backend", ATTENTION)
@pytest.mark.parametrize("poison", [NAN, INF, -INF])
def test_attention_outputs_are_exact_per_query_for_causally_hidden_keys(backend, poison):
    """A key that some queries see and others do not: a NaN or Inf in its value reaches exactly the queries that
    see it, in the feature it sits in."""
    q, k, v = _qkv(nq=12, nk=12)
    v[:, :, 7, 3] = poison
    out = attention(q, k, v, causal=True, backend=backend)
    assert torch.isfinite(out[:, :, :7]).all() and torch.isfinite(out[:, :, 7:, [0, 1, 2, 4]]).all()
    reached = out[:, :, 7:, 3]
    assert torch.isnan(reached).all() if poison != poison else torch.equal(reached, torch.full_like(reached, poison))


def test_reference_attention_gradients_are_exact_per_query():
    q, k, v = _qkv(nq=12, nk=12)
    v[:, :, 7] = NAN
    _, dq, _, _ = _attention_step("reference", q, k, v, causal=True)
    assert torch.isfinite(dq[:, :, :7]).all()  # (every key is seen by a NaN query, so dk and dv are NaN)


@pytest.mark.parametrize("backend", ATTENTION)
def test_attention_propagates_real_nan(backend):
    q, k, v = _qkv(nq=9, nk=9)
    q[0, 1, 3] = NAN
    out = attention(q, k, v, backend=backend)
    assert torch.isnan(out[0, 1, 3]).all()
    assert torch.isfinite(out[0, 1, :3]).all() and torch.isfinite(out[1]).all()
    k[1, 0, 4, 0] = NAN  # a visible key: every query of that head sees it
    assert torch.isnan(attention(q, k, v, backend=backend)[1, 0]).all()
    assert torch.isnan(attention(q, k, v, scale=NAN, backend=backend)).all()


def _decode_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 4, 16, generator=gen)
    k_cache, v_cache = (torch.randn(3, 2, 20, 16, generator=gen) for _ in range(2))
    return q, k_cache, v_cache, torch.tensor([20, 6, 0])


@pytest.mark.parametrize("backend", DECODE)
@pytest.mark.parametrize("poison", [NAN, INF])
def test_decode_ignores_entries_beyond_each_length(backend, poison):
    q, k_cache, v_cache, lengths = _decode_inputs()
    clean = decode_attention(q, k_cache, v_cache, lengths, backend=backend)
    for b, length in enumerate(lengths.tolist()):
        k_cache[b, :, length:], v_cache[b, :, length:] = poison, poison
    out = decode_attention(q, k_cache, v_cache, lengths, backend=backend)
    torch.testing.assert_close(out, clean)
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # an empty cache gives zeros


@pytest.mark.parametrize("backend", DECODE)
def test_decode_propagates_real_nan(backend):
    q, k_cache, v_cache, lengths = _decode_inputs()
    q[0, 1] = NAN
    k_cache[1, 0, 2, 5] = NAN  # valid entry of sequence 1, cache head 0 (query heads 0 and 1)
    out = decode_attention(q, k_cache, v_cache, lengths, backend=backend)
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, [0, 2, 3]]).all()
    assert torch.isnan(out[1, :2]).all() and torch.isfinite(out[1, 2:]).all()
    for scale in (NAN, INF, -INF):
        assert torch.isnan(decode_attention(q, k_cache, v_cache, lengths, scale=scale, backend=backend)[:2]).all()
