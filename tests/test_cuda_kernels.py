"""GPU tests of the CUDA kernels in mome._C against the float64 reference and their Triton twins.

Every test is ``@pytest.mark.gpu``: without a CUDA device they are skipped (tests/conftest.py), and
they also skip, saying why, when the extension is not built (a GPU machine that installed mome
without nvcc). benchmarks/gpu_check.sh builds the extension before running them.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

import mome.cuda
from mome.reference import decode_attention_ref
from tests.helpers import TOLERANCE, assert_close, poison

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_extension():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    why = mome.cuda.device_reason(torch.device("cuda"))
    if why is not None:
        pytest.skip(f"mome._C cannot run here: {why}")


def _triton_or_none(module: str):
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


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
    if _triton_or_none("mome.kernels.decode") is not None:
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
    from mome.cuda.decode import unsupported_reason

    q, k, v, seqlens = _decode_case(1, 2, 2, 8, 96, torch.float16)
    assert "head dims" in unsupported_reason("decode_attention", q=q, k_cache=k, v_cache=v, cache_seqlens=seqlens)
    q32, k32 = q.float(), k.float()
    why = unsupported_reason("decode_attention", q=q32, k_cache=k32, v_cache=k32, cache_seqlens=seqlens)
    assert "float16 or bfloat16" in why


# ---- modality routing -------------------------------------------------------------------------------


def _routing_expected(modality, num_experts):
    perm = torch.sort(modality, stable=True).indices
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    counts = torch.bincount(modality, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return perm.int(), inv_perm.int(), offsets.int()


def _layout(kind, tokens, num_experts, generator):
    if kind == "random":
        return torch.randint(0, num_experts, (tokens,), device="cuda", generator=generator)
    if kind == "one_expert":  # every other expert empty
        return torch.full((tokens,), num_experts - 1, device="cuda")
    if kind == "split":  # image tokens first, then text (VLMo layout), expert 1 of 3 empty
        return torch.cat([torch.zeros(tokens // 3), torch.full((tokens - tokens // 3,), num_experts - 1)]).cuda()
    if kind == "interleaved":
        return torch.arange(tokens, device="cuda") % num_experts
    raise ValueError(kind)


@pytest.mark.parametrize("tokens", [1, 31, 1000, 16384, 16385, 100_003])  # both the one-block and tiled paths
@pytest.mark.parametrize("num_experts", [1, 3, 8, 256])
@pytest.mark.parametrize("kind", ["random", "one_expert", "split", "interleaved"])
def test_routing_matches_stable_sort(tokens, num_experts, kind):
    from mome.cuda import routing

    generator = torch.Generator("cuda").manual_seed(tokens + num_experts)
    modality = _layout(kind, tokens, num_experts, generator).long()
    perm, inv_perm, offsets = (
        poison(torch.empty(n, dtype=torch.int32, device="cuda")) for n in (tokens, tokens, num_experts + 1)
    )
    routing.launch(perm, inv_perm, offsets, modality, num_experts)
    expected = _routing_expected(modality, num_experts)
    for name, got, want in zip(("perm", "inv_perm", "offsets"), (perm, inv_perm, offsets), expected, strict=True):
        mismatch = (got != want).nonzero()
        assert mismatch.numel() == 0, f"{name}: {mismatch.numel()} wrong, first at {mismatch[0].item()}"


def test_routing_empty_and_matches_triton():
    from mome.cuda.routing import modality_routing

    perm, inv_perm, offsets = modality_routing(torch.empty(0, dtype=torch.int64, device="cuda"), 4)
    assert perm.numel() == 0 and inv_perm.numel() == 0 and offsets.tolist() == [0] * 5
    generator = torch.Generator("cuda").manual_seed(1)
    modality = torch.randint(0, 3, (50_000,), device="cuda", generator=generator)
    ours = modality_routing(modality, 3)
    twin_module = _triton_or_none("mome.kernels.routing")
    if twin_module is not None:
        for got, want in zip(ours, twin_module.modality_routing(modality, 3), strict=True):
            assert torch.equal(got, want)
    compiled = torch.compile(lambda m: torch.ops.mome.cuda_modality_routing(m, 3), fullgraph=True)
    for got, want in zip(compiled(modality), ours, strict=True):
        assert torch.equal(got, want)
