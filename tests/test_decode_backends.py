"""mome.ops.decode_attention: the same cases on every backend that loads here, in every dtype it declares,
against a float64 formula written here (not mome.reference)."""

from __future__ import annotations

import pytest
import torch

from mome.ops import BackendUnavailableError, decode_attention
from mome.ops.decode import BACKENDS
from tests.helpers import TOLERANCE, assert_close, declared_dtypes, declared_range, usable_backends

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype_cases():
    for backend in usable_backends(BACKENDS, DEVICE):
        for dtype in declared_dtypes(BACKENDS, backend, DEVICE):
            yield pytest.param(backend, dtype, id=f"{backend}-{str(dtype).removeprefix('torch.')}")


# name -> (B, H, Hkv, Nmax, D, lengths)
CASES = {
    "one_head": (2, 1, 1, 37, 16, [37, 5]),
    "gqa_ragged": (3, 8, 2, 70, 24, [70, 1, 0]),
    "mha_head_dim_64": (2, 4, 4, 19, 64, [19, 12]),
}


def _expected(q, k_cache, v_cache, lengths, scale):
    group = q.shape[1] // k_cache.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k_cache, v_cache))
    scores = torch.einsum("bhd,bhnd->bhn", q.double(), k) * scale
    valid = torch.arange(k.shape[2])[None, :] < torch.tensor(lengths)[:, None]
    weights = torch.softmax(scores.masked_fill(~valid[:, None, :], float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhn,bhnd->bhd", weights, v)


@pytest.mark.parametrize("backend, dtype", list(_dtype_cases()))
@pytest.mark.parametrize("case", sorted(CASES))
def test_output_against_a_dense_formula(backend, dtype, case):
    batch, heads, kv_heads, nmax, dim, lengths = CASES[case]
    if declared_range(BACKENDS, backend, "head_dim") is not None and BACKENDS.reason(
        backend, dict(q=torch.empty(batch, heads, dim, dtype=dtype, device=DEVICE),
                      k_cache=torch.empty(batch, kv_heads, 1, dim, dtype=dtype, device=DEVICE))
    ):  # fmt: skip
        pytest.skip(f"{backend} declares limits that exclude {case}")  # e.g. CUDA's head dims {64, 128}
    gen = torch.Generator().manual_seed(sorted(CASES).index(case))
    q = torch.randn(batch, heads, dim, generator=gen)
    k_cache, v_cache = (torch.randn(batch, kv_heads, nmax, dim, generator=gen) for _ in range(2))
    scale = 0.8 / dim**0.5
    out = decode_attention(
        *(t.to(DEVICE, dtype) for t in (q, k_cache, v_cache)),
        torch.tensor(lengths, device=DEVICE),
        scale=scale,
        backend=backend,
    )
    assert out.dtype == dtype
    assert_close(out.cpu(), _expected(q, k_cache, v_cache, lengths, scale), TOLERANCE[dtype])


@pytest.mark.parametrize("backend", [b for b in usable_backends(BACKENDS, DEVICE) if b != "reference"])
@pytest.mark.parametrize("size", ["head_dim", "group"])
def test_inputs_beyond_a_declared_limit_are_declined_and_the_reference_takes_them(backend, size):
    bounds = declared_range(BACKENDS, backend, size)
    if not isinstance(bounds, tuple) or bounds[1] is None:
        pytest.skip(f"{backend} declares no upper {size} bound")  # nothing to exceed: not a hidden failure
    over = bounds[1] + 1
    dim, heads = (over, 1) if size == "head_dim" else (16, over)
    dtype = declared_dtypes(BACKENDS, backend, DEVICE)[0]
    q = torch.randn(1, heads, dim, device=DEVICE, dtype=dtype)
    cache = torch.randn(1, 1, 4, dim, device=DEVICE, dtype=dtype)
    lengths = torch.tensor([3], device=DEVICE)
    with pytest.raises(
        BackendUnavailableError, match=rf"{size} .* got {over}; the reference( and native)? backends? can"
    ):
        decode_attention(q, cache, cache, lengths, backend=backend)
    assert decode_attention(q, cache, cache, lengths, backend="auto").shape == q.shape
