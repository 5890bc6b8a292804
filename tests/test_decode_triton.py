"""mome.ops.decode_attention on the Triton backend vs the float64 reference: ragged caches, GQA, splits."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mome.ops import BackendUnavailableError, decode_attention
from mome.reference import decode_attention_ref
from tests.helpers import TOLERANCE, assert_close

triton_decode = pytest.importorskip("mome.kernels.decode")
pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),  # interpreter
    pytest.mark.usefixtures("poisoned_allocations"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(batch, heads, kv_heads, nmax, dim, dtype, seqlens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, dim, generator=gen)
    k_cache, v_cache = (torch.randn(batch, kv_heads, nmax, dim, generator=gen) for _ in range(2))
    # Entries past each sequence's length hold garbage a kernel must never read into the result.
    valid = torch.arange(nmax)[None, None, :, None] < torch.tensor(seqlens)[:, None, None, None]
    k_cache, v_cache = (c.masked_fill(~valid, 1e4) for c in (k_cache, v_cache))
    lengths = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    return [t.to(DEVICE, dtype) for t in (q, k_cache, v_cache)], lengths


CASES = {
    # name: (batch, heads, kv_heads, nmax, dim, seqlens)
    "ragged_with_0_1_and_full": (4, 2, 2, 300, 64, [0, 1, 300, 137]),
    "gqa_group4_d128": (3, 8, 2, 129, 128, [129, 64, 1]),
    "mqa_group8_d80": (2, 8, 1, 200, 80, [5, 200]),
    "one_sequence_many_splits_d32": (1, 2, 1, 513, 32, [513]),
    "tiny_cache": (2, 1, 1, 1, 32, [1, 0]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype):
    batch, heads, kv_heads, nmax, dim, seqlens = CASES[name]
    (q, k_cache, v_cache), lengths = make_case(batch, heads, kv_heads, nmax, dim, dtype, seqlens)
    out = decode_attention(q, k_cache, v_cache, lengths, backend="triton")
    expected = decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), lengths)
    assert out.dtype == dtype
    assert_close(out, expected, TOLERANCE[dtype])
    empty = lengths == 0
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "a sequence of length 0 must give zeros"


def test_cache_is_split_across_programs():
    """The shapes above must exercise the split path and the combine, not only a single split."""
    splits, chunk = triton_decode._num_splits(
        1, 1, 513, triton_decode._launch_config(torch.float32, 32)[0], torch.device("cpu")
    )
    assert splits > 1 and splits * chunk >= 513 and (splits - 1) * chunk < 513


def test_scale_is_applied():
    (q, k_cache, v_cache), lengths = make_case(2, 2, 1, 70, 64, torch.float32, [70, 33])
    out = decode_attention(q, k_cache, v_cache, lengths, scale=0.02, backend="triton")
    expected = decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), lengths, scale=0.02)
    assert_close(out, expected, TOLERANCE[torch.float32])


def test_declines_what_it_cannot_run_with_a_reason():
    (q, k_cache, v_cache), lengths = make_case(1, 1, 1, 4, 16, torch.float64, [4])
    with pytest.raises(BackendUnavailableError, match="got float64; the reference( and native)? backends? can"):
        decode_attention(q, k_cache, v_cache, lengths, backend="triton")
    (q, k_cache, v_cache), lengths = make_case(1, 1, 1, 4, 160, torch.float32, [4])
    with pytest.raises(BackendUnavailableError, match=r"head_dim \(D, the last dim of q\) in \[1, 128\], got 160"):
        decode_attention(q, k_cache, v_cache, lengths, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ragged_with_0_1_and_full", "gqa_group4_d128", "mqa_group8_d80"])
def test_bf16_matches_reference_on_gpu(name):
    batch, heads, kv_heads, nmax, dim, seqlens = CASES[name]
    (q, k_cache, v_cache), lengths = make_case(batch, heads, kv_heads, nmax, dim, torch.bfloat16, seqlens)
    out = decode_attention(q, k_cache, v_cache, lengths, backend="triton")
    expected = decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), lengths)
    assert_close(out, expected, TOLERANCE[torch.bfloat16])


@pytest.mark.gpu
def test_long_ragged_caches_on_gpu():
    seqlens = [0, 1, 4096, 8192, 3000, 8191, 17, 6000]
    (q, k_cache, v_cache), lengths = make_case(8, 32, 8, 8192, 128, torch.float16, seqlens)
    out = decode_attention(q, k_cache, v_cache, lengths, backend="triton")
    expected = decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), lengths)
    assert_close(out, expected, TOLERANCE[torch.float16])


def test_aot_compiles_for_sm80_and_sm90():
    """The grouped-query bf16 split kernel and its combine, with the interpreter off."""
    script = textwrap.dedent(
        """
        from mome.kernels import decode
        from mome.kernels.aot import compile_spec
        for spec in decode.AOT_SPECS:
            if spec.name.endswith("bf16_d128_g4"):
                for arch, shared_limit in ((80, 163 * 1024), (90, 227 * 1024)):
                    row = compile_spec(spec, arch)
                    assert row["shared_bytes"] <= shared_limit, row
                    print(row)
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("shared_bytes") == 4, result.stdout
