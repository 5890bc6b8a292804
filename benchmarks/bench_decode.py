"""Decoding attention (one new token per sequence over a KV cache): mome vs SDPA, eager and flash-attn.

GB/s = bytes / time with bytes = the valid K/V prefix read once (plus q and out); the run's measured
device-copy bandwidth is the ceiling (``pct_roofline_measured``). Forward only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mome import ops, perf

from .harness import Family, Provider, Unavailable, Work, generator, mome_providers, randn


@dataclass(frozen=True)
class DecodeShape:
    batch: int
    heads: int
    kv_heads: int
    context: int  # Nmax: cache capacity
    head_dim: int
    lengths: str  # full (every sequence holds Nmax entries) | ragged (between Nmax/2 and Nmax)
    subsets: frozenset = frozenset({"full"})


def _shapes() -> dict[str, DecodeShape]:
    tiny = frozenset({"tiny"})
    quick = frozenset({"quick", "full"})
    return {
        "tiny-ragged": DecodeShape(3, 4, 2, 50, 16, "ragged", tiny),
        "tiny-full": DecodeShape(2, 4, 4, 33, 16, "full", tiny),
        "ctx1k-b64-h32-d128": DecodeShape(64, 32, 32, 1024, 128, "full"),
        "ctx4k-b32-h32-d128": DecodeShape(32, 32, 32, 4096, 128, "full", quick),
        "ctx4k-b32-h32-d128-ragged": DecodeShape(32, 32, 32, 4096, 128, "ragged", quick),
        "ctx4k-b32-h32kv8-d128": DecodeShape(32, 32, 8, 4096, 128, "full"),
        "ctx16k-b8-h32-d128": DecodeShape(8, 32, 32, 16384, 128, "full"),
        "caption-ctx256-b128-h12-d64": DecodeShape(128, 12, 12, 256, 64, "ragged"),
    }


def seqlens(shape: DecodeShape, device) -> torch.Tensor:
    """Deterministic cache lengths (the same for every seed)."""
    if shape.lengths == "full":
        return torch.full((shape.batch,), shape.context, dtype=torch.int32, device=device)
    half = shape.context // 2
    return (half + (torch.arange(shape.batch, device=device) * 97) % (shape.context - half + 1)).to(torch.int32)


def make_inputs(shape: DecodeShape, dtype, device, seed: int, requires_grad: bool) -> dict:
    g = generator(device, seed)
    cache = (shape.batch, shape.kv_heads, shape.context, shape.head_dim)
    return {
        "q": randn((shape.batch, shape.heads, shape.head_dim), dtype, device, g),
        "k_cache": randn(cache, dtype, device, g),
        "v_cache": randn(cache, dtype, device, g),
        "cache_seqlens": seqlens(shape, device),
    }


def work(shape: DecodeShape, mode: str, dtype) -> Work:
    total = int(seqlens(shape, "cpu").sum())
    return Work(
        perf.decode_flops(total, shape.heads, shape.head_dim),
        perf.decode_bytes(total, shape.batch, shape.heads, shape.kv_heads, shape.head_dim, dtype),
        "GB/s",
        "bytes = 2·sum(seqlens)·Hkv·D·size (K and V once) + q and out",
    )


def _mome_call(inputs, backend, context):
    return ops.decode_attention(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["cache_seqlens"],
                                backend=backend)  # fmt: skip


def _valid_keys(shape: DecodeShape, device) -> torch.Tensor:
    positions = torch.arange(shape.context, device=device)
    return positions[None, :] < seqlens(shape, device)[:, None]  # [B, Nmax]


def _sdpa_setup(shape, inputs, device, mode, notes):
    mask = None if shape.lengths == "full" else _valid_keys(shape, device)[:, None, None, :]  # [B, 1, 1, Nmax]
    gqa = shape.heads != shape.kv_heads

    def forward(batch):
        q = batch["q"][:, :, None, :]  # [B, H, 1, D]
        extra = {"enable_gqa": True} if gqa else {}
        return F.scaled_dot_product_attention(q, batch["k_cache"], batch["v_cache"], attn_mask=mask, **extra)[:, :, 0]

    return forward


def _eager_setup(shape, inputs, device, mode, notes):
    valid = _valid_keys(shape, device)[:, None, :]  # [B, 1, Nmax]
    group = shape.heads // shape.kv_heads
    scale = shape.head_dim**-0.5

    def forward(batch):
        k = batch["k_cache"].repeat_interleave(group, dim=1)
        v = batch["v_cache"].repeat_interleave(group, dim=1)
        scores = torch.einsum("bhd,bhnd->bhn", batch["q"], k) * scale
        probs = torch.softmax(scores.float().masked_fill(~valid, float("-inf")), dim=-1).to(v.dtype)
        return torch.einsum("bhn,bhnd->bhd", probs, v)

    return forward


def _flash_attn_setup(shape, inputs, device, mode, notes):
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError as error:
        raise Unavailable(f"flash-attn is not installed ({error})") from error

    def to_bnhd(batch):  # flash-attn's cache layout (B, Nmax, Hkv, D), converted once outside the timing
        converted = dict(batch)
        for name in ("k_cache", "v_cache"):
            converted[name] = batch[name].transpose(1, 2).contiguous()
        converted["q"] = batch["q"][:, None]  # [B, 1, H, D]
        return converted

    def forward(batch):
        return flash_attn_with_kvcache(batch["q"], batch["k_cache"], batch["v_cache"],
                                       cache_seqlens=batch["cache_seqlens"])[:, 0]  # fmt: skip

    return to_bnhd, forward


FAMILIES = [
    Family(
        op="decode_attention",
        shapes=_shapes(),
        providers={
            **mome_providers(_mome_call),
            "sdpa": Provider("sdpa", "baseline", _sdpa_setup, modes=("fwd",)),
            "eager": Provider("eager", "baseline", _eager_setup, modes=("fwd",)),
            "flash-attn": Provider(
                "flash-attn", "baseline", _flash_attn_setup, modes=("fwd",), cuda_only="flash-attn runs on CUDA only"
            ),  # fmt: skip
        },
        make_inputs=make_inputs,
        work=work,
        modes=("fwd",),
    )
]


def bench_decode(case, measure):
    measure(case)
