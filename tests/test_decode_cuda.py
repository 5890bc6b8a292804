"""GPU tests of the CUDA decode kernel in mome._C against the float64 reference and its Triton twin.

Every test is ``@pytest.mark.gpu``: without a CUDA device they are skipped (tests/conftest.py), and
they also skip, saying why, when the extension is not built (a GPU machine that installed mome
without nvcc). benchmarks/gpu_check.sh builds the extension before running them.
"""

from __future__ import annotations

import pytest
import torch

from mome.reference import decode_attention_ref
from tests.helpers import TOLERANCE, assert_close, poison, triton_module_or_none

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_extension")]


# ---- decode attention -------------------------------------------------------------------------------


def _decode_case(batch, heads, kv_heads, nmax, head_dim, dtype, lengths=None, seed=0):
    generator = torch.Generator("cuda").manual_seed(seed)
    q = torch.randn(batch, heads, head_dim, device="cuda", generator=generator).to(dtype)
    k = torch.randn(batch, kv_heads, nmax, head_dim, device="cuda", generator=generator).to(dtype)
    v = torch.randn(batch, kv_heads, nmax, head_dim, device="cuda", generator=generator).to(dtype)
    if lengths is None:
        lengths = torch.randint(0, nmax + 1, (batch,), device="cuda", generator=generator)
    seqlens = torch.as_tensor(lengths, device="cuda").to(torch.int32)
    # Rows past each length hold NaN: a kernel that reads them fails.
    invalid = torch.arange(nmax, device="cuda")[None, :] >= seqlens[:, None].long()
    k.masked_fill_(invalid[:, None, :, None], float("nan"))
    v.masked_fill_(invalid[:, None, :, None], float("nan"))
    return q, k, v, seqlens


def _decode_expected(q, k, v, seqlens, scale):
    ok = torch.arange(k.shape[2], device="cuda")[None, :] < seqlens[:, None].long()
    k64 = k.double().masked_fill(~ok[:, None, :, None], 0.0)
    v64 = v.double().masked_fill(~ok[:, None, :, None], 0.0)
    return decode_attention_ref(q.double(), k64, v64, seqlens, scale=scale)


DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 4), (6, 2), (12, 4), (16, 2), (5, 1)])
def test_decode_matches_reference(dtype, head_dim, heads, kv_heads):
    from mome.cuda.decode import decode_attention_fwd

    q, k, v, seqlens = _decode_case(3, heads, kv_heads, 301, head_dim, dtype, lengths=[0, 1, 301])
    scale = head_dim**-0.5
    out = decode_attention_fwd(q, k, v, seqlens, scale=scale)
    assert_close(out, _decode_expected(q, k, v, seqlens, scale), TOLERANCE[dtype])
    assert out[0].abs().max().item() == 0.0  # empty cache gives zeros


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("splits", [1, 2, 7, 128])
def test_decode_forced_splits_write_every_element(dtype, head_dim, splits):
    from mome.cuda import decode

    q, k, v, seqlens = _decode_case(4, 8, 2, 1000, head_dim, dtype, lengths=[0, 5, 999, 1000], seed=splits)
    out = poison(torch.empty_like(q))
    decode.launch(out, q, k, v, seqlens, 0.3, splits)
    assert_close(out, _decode_expected(q, k, v, seqlens, 0.3), TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_long_ragged_cache(dtype):
    from mome.cuda.decode import decode_attention_fwd

    q, k, v, seqlens = _decode_case(2, 16, 16, 8192, 128, dtype, lengths=[8192, 4097])
    out = decode_attention_fwd(q, k, v, seqlens, scale=0.088)
    assert_close(out, _decode_expected(q, k, v, seqlens, 0.088), TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_through_the_public_op_matches_triton(dtype):
    from mome.ops import decode_attention

    q, k, v, seqlens = _decode_case(5, 8, 2, 777, 64, dtype, seed=3)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)  # other backends may read the padding
    out = decode_attention(q, k, v, seqlens, backend="cuda")
    assert_close(out, _decode_expected(q, k, v, seqlens, 64**-0.5), TOLERANCE[dtype])
    if triton_module_or_none("mome.kernels.decode") is not None:
        twin = decode_attention(q, k, v, seqlens, backend="triton")
        assert_close(out, twin.to(out.dtype), 2 * TOLERANCE[dtype], name="cuda vs triton")


def test_decode_auto_prefers_cuda_and_compiles():
    from mome.ops import decode_attention

    q, k, v, seqlens = _decode_case(2, 4, 4, 100, 64, torch.float16, seed=5)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    expected = decode_attention(q, k, v, seqlens, backend="cuda")
    torch.testing.assert_close(decode_attention(q, k, v, seqlens), expected, rtol=0, atol=0)
    compiled = torch.compile(lambda *a: torch.ops.mome.cuda_decode_attention(*a, 0.125), fullgraph=True)
    direct = torch.ops.mome.cuda_decode_attention(q, k, v, seqlens, 0.125)
    torch.testing.assert_close(compiled(q, k, v, seqlens), direct, rtol=0, atol=0)


def test_decode_copies_misaligned_views():
    from mome.cuda.decode import decode_attention_fwd

    q, k, v, seqlens = _decode_case(2, 4, 2, 64, 64, torch.float16, lengths=[64, 17], seed=9)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    storage = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")
    shifted = storage[1:].view(q.shape).copy_(q)  # 2 bytes off a 16-byte boundary
    out = decode_attention_fwd(shifted, k, v, seqlens, scale=0.125)
    torch.testing.assert_close(out, decode_attention_fwd(q, k, v, seqlens, scale=0.125), rtol=0, atol=0)


def test_decode_declines_what_it_cannot_run():
    from mome.ops.decode import BACKENDS

    q, k, v, seqlens = _decode_case(1, 2, 2, 8, 96, torch.float16)
    assert "head_dim (D, the last dim of q) in [64, 128], got 96" in BACKENDS.reason("cuda", dict(q=q, k_cache=k))
    why = BACKENDS.reason("cuda", dict(q=q.float(), k_cache=k.float()))
    assert "runs dtypes (float16, bfloat16) on cuda tensors, got float32" in why
