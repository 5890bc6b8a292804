"""Shared self-attention: mome vs torch SDPA (each backend), FlexAttention, eager and flash-attn.

TFLOP/s = ``4·B·H·Nq·Nk·D · density / time`` (density: the visible fraction of the scores, 1/2 for
causal), backward 2.5× forward. Shapes: FlashAttention's (16k tokens, hidden 2048, D 64/128,
S 512…8k) and vision-language ones (197 image + 40 text tokens; 577 image + 64 text).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mome import ops, perf
from mome.reference import attention_visibility

from .harness import Family, Provider, Unavailable, Work, generator, mome_providers, randn


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads: int
    seq: int
    head_dim: int
    mask: str  # none | causal | prefix (prefix-LM: bidirectional prefix, causal after) | padding | modality
    prefix: int = 0  # prefix-LM: image tokens every query sees; padding: the shortest key length; modality: images
    subsets: frozenset = frozenset({"full"})
    bias: bool = False  # a learned (1, H, N, N) score bias (VLMo/BEiT relative positions), differentiated
    dropout: float = 0.0  # attention dropout probability


QUICK_EXTRAS = {"vlm237-none-bias", "vlm237-padding-dropout"}  # against vlm237-none and vlm237-padding, same run


def _shapes() -> dict[str, AttentionShape]:
    shapes = {}
    for mask in ("none", "causal", "prefix", "padding", "modality"):
        shapes[f"tiny-{mask}"] = AttentionShape(1, 2, 37, 16, mask, prefix=20, subsets=frozenset({"tiny"}))
    quick = {"fa-s2048-d128-none", "fa-s2048-d128-causal", "vlm237-none", "vlm237-prefix", "vlm237-padding",
             "vlm237-modality", "vlm641-padding", "vlm641-modality"}  # fmt: skip
    for mask in ("none", "prefix", "padding", "modality"):
        name = f"vlm237-{mask}"
        subsets = frozenset({"full", "quick"} if name in quick else {"full"})
        shapes[name] = AttentionShape(128, 12, 197 + 40, 64, mask, prefix=197, subsets=subsets)
        name = f"vlm641-{mask}"
        subsets = frozenset({"full", "quick"} if name in quick else {"full"})
        shapes[name] = AttentionShape(64, 16, 577 + 64, 64, mask, prefix=577, subsets=subsets)
    # VLMo/BEiT's relative position bias and the BERT-style text towers' attention dropout (issue 14's rows)
    extras = {"bias": dict(bias=True), "dropout": dict(dropout=0.1), "bias-dropout": dict(bias=True, dropout=0.1)}
    for extra, options in extras.items():
        shapes[f"tiny-{extra}"] = AttentionShape(1, 2, 37, 16, "padding", prefix=20, subsets=frozenset({"tiny"}),
                                                 **options)  # fmt: skip
        for mask in ("none", "padding"):
            name = f"vlm237-{mask}-{extra}"
            subsets = frozenset({"full", "quick"} if name in QUICK_EXTRAS else {"full"})
            shapes[name] = AttentionShape(128, 12, 197 + 40, 64, mask, prefix=197, subsets=subsets, **options)
    shapes["vlm641-none-bias"] = AttentionShape(64, 16, 577 + 64, 64, "none", prefix=577, bias=True)
    for seq in (512, 1024, 2048, 4096, 8192):
        for head_dim in (64, 128):
            for mask in ("none", "causal"):
                name = f"fa-s{seq}-d{head_dim}-{mask}"
                subsets = frozenset({"full", "quick"} if name in quick else {"full"})
                shapes[name] = AttentionShape(16384 // seq, 2048 // head_dim, seq, head_dim, mask, subsets=subsets)
    return shapes


def key_lengths(shape: AttentionShape, device) -> torch.Tensor:
    """Deterministic ragged key lengths in [prefix, seq] for the padding mask (the same for every seed)."""
    span = shape.seq - shape.prefix + 1
    return shape.prefix + (torch.arange(shape.batch, device=device) * 37) % span


def mask_arguments(shape: AttentionShape, device) -> dict:
    """The structure of the mask, as ``mome.ops.attention`` takes it."""
    if shape.mask == "causal":
        return dict(causal=True)
    if shape.mask == "prefix":
        return dict(causal=True, prefix_len=shape.prefix)
    if shape.mask == "padding":
        positions = torch.arange(shape.seq, device=device)
        return dict(key_padding_mask=positions[None, :] >= key_lengths(shape, device)[:, None])
    if shape.mask == "modality":  # VLMo's packed image + text: images see images, text sees everything
        return dict(modality=modality_ids(shape, device), modality_mask=MODALITY_MASK.to(device))
    return {}


MODALITY_MASK = torch.tensor([[True, False], [True, True]])  # [query modality, key modality]; 0 image, 1 text


def modality_ids(shape: AttentionShape, device) -> torch.Tensor:
    """``(B, N)``: the first ``prefix`` tokens are image (0), the rest text (1)."""
    return (torch.arange(shape.seq, device=device) >= shape.prefix).long().expand(shape.batch, -1).contiguous()


def visibility(shape: AttentionShape, device) -> torch.Tensor:
    """``(B, 1, N, N)`` bool, True where a query sees a key (SDPA's dense-mask convention)."""
    arguments = mask_arguments(shape, device)
    if "prefix_len" in arguments:
        arguments["prefix_len"] = torch.full((shape.batch,), shape.prefix, device=device)
    return attention_visibility(shape.batch, shape.seq, shape.seq, device=device, **arguments)[:, None]


def density(shape: AttentionShape) -> float:
    """Visible fraction of the score matrix (the FLOP formula's factor)."""
    n = shape.seq
    if shape.mask == "causal":
        return 0.5
    if shape.mask == "prefix":
        p = shape.prefix
        visible = p * p + (n * (n + 1) - p * (p + 1)) / 2
        return visible / (n * n)
    if shape.mask == "padding":
        return float(key_lengths(shape, "cpu").double().mean()) / n
    if shape.mask == "modality":
        p = shape.prefix
        return (p * p + (n - p) * n) / (n * n)
    return 1.0


def make_inputs(shape: AttentionShape, dtype, device, seed: int, requires_grad: bool) -> dict:
    g = generator(device, seed)
    size = (shape.batch, shape.heads, shape.seq, shape.head_dim)
    inputs = {name: randn(size, dtype, device, g, requires_grad) for name in ("q", "k", "v")}
    if shape.bias:  # in the model's dtype, as a bias table gathered from bf16 parameters is
        inputs["bias"] = randn((1, shape.heads, shape.seq, shape.seq), dtype, device, g, requires_grad)
    return inputs


def work(shape: AttentionShape, mode: str, dtype) -> Work:
    """The same FLOPs with or without bias and dropout (their work is elementwise), so TFLOP/s compare across rows;
    the bias adds its own bytes: read once forward, read and its gradient written backward."""
    b, h, n, d = shape.batch, shape.heads, shape.seq, shape.head_dim
    fraction = density(shape)
    bias_bytes = 0
    if shape.bias:
        bias_bytes = h * n * n * dtype.itemsize * (1 if mode == "fwd" else 3 if mode == "fwd+bwd" else 2)
    extras = "".join(
        [", + (1, H, N, N) bias" if shape.bias else "", f", dropout {shape.dropout}" if shape.dropout else ""]
    )
    return Work(
        perf.attention_flops(b, h, n, n, d, density=fraction, mode=mode),
        perf.attention_bytes(b, h, h, n, n, d, dtype, mode) + bias_bytes,
        "TFLOP/s",
        f"4·B·H·N²·D·{fraction:.3f} (visible fraction); bwd ×2.5{extras}",
    )


# ---- providers ----------------------------------------------------------------------------------------


def _mome_call(inputs, backend, arguments):
    return ops.attention(inputs["q"], inputs["k"], inputs["v"], backend=backend, attn_bias=inputs.get("bias"),
                         **arguments)  # fmt: skip


def _mome_arguments(shape: AttentionShape, inputs, device) -> dict:
    return dict(mask_arguments(shape, device), dropout_p=shape.dropout)


MOME = mome_providers(_mome_call, setup=_mome_arguments)


def float_mask(batch: dict, dense: torch.Tensor | None) -> torch.Tensor | None:
    """The bias with -inf where the structure hides a key, as SDPA and eager take one float mask (built inside the
    timed call: it depends on the bias, whose gradient flows through it)."""
    bias = batch.get("bias")
    if bias is None or dense is None:
        return bias if bias is not None else dense
    return bias.masked_fill(~dense, float("-inf"))


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}  # fmt: skip


def _sdpa(kind: str) -> Provider:
    def setup(shape, inputs, device, mode, notes):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[kind], None)
        if backend is None:
            raise Unavailable(f"this torch has no SDPBackend.{SDPA_BACKENDS[kind]}")
        causal = shape.mask == "causal"
        dense = visibility(shape, device) if shape.mask in ("prefix", "padding", "modality") else None
        if dense is not None:
            notes["mask"] = "dense bool (B, 1, N, N)"
        if shape.bias:
            notes["mask"] = "float (B|1, H, N, N): the bias" + (", -inf where masked" if dense is not None else "")

        def forward(batch):
            with sdpa_kernel(backend):
                try:
                    return F.scaled_dot_product_attention(
                        batch["q"], batch["k"], batch["v"], attn_mask=float_mask(batch, dense), is_causal=causal,
                        dropout_p=shape.dropout,
                    )  # fmt: skip
                except RuntimeError as error:  # this backend declines the inputs: a reason, not a failure
                    if "No viable backend" not in str(error):
                        raise
                    raise Unavailable(f"SDPA's {kind} backend cannot run this case on {device.type}") from error

        return forward

    return Provider(f"sdpa-{kind}", "baseline", setup)


def _eager_setup(shape, inputs, device, mode, notes):
    scale = shape.head_dim**-0.5
    dense = visibility(shape, device) if shape.mask != "none" else None

    def forward(batch):
        scores = (batch["q"] @ batch["k"].transpose(-2, -1)) * scale  # [B, H, N, N]
        if "bias" in batch:
            scores = scores + batch["bias"]
        if dense is not None:
            scores = scores.masked_fill(~dense, float("-inf"))
        probs = F.dropout(torch.softmax(scores.float(), dim=-1), shape.dropout)
        return probs.to(batch["v"].dtype) @ batch["v"]

    return forward


def _flex_setup(shape, inputs, device, mode, notes):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        raise Unavailable(f"FlexAttention is not in this torch ({error})") from error
    if shape.dropout:
        raise Unavailable("FlexAttention has no attention dropout")
    lengths = key_lengths(shape, device)
    prefix = shape.prefix

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def prefix_lm(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) | (kv_idx < prefix)

    def padding(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    def modality(b, h, q_idx, kv_idx):  # the same table as MODALITY_MASK: text queries, or image keys
        return (q_idx >= prefix) | (kv_idx < prefix)

    mask_mod = {"causal": causal, "prefix": prefix_lm, "padding": padding, "modality": modality}.get(shape.mask)
    block_mask = None
    if mask_mod is not None:
        torch.cuda.synchronize()
        started = time.perf_counter()
        block_mask = create_block_mask(mask_mod, shape.batch, None, shape.seq, shape.seq, device=device)
        torch.cuda.synchronize()
        notes["mask_build_ms"] = (time.perf_counter() - started) * 1e3
    compiled = _compiled_flex(flex_attention)
    if not shape.bias:
        return lambda batch: compiled(batch["q"], batch["k"], batch["v"], block_mask=block_mask)
    notes["score_mod"] = "score + bias[0, h, q, k] (a captured tensor: its gradient flows)"

    def forward(batch):
        bias = batch["bias"]

        def add_bias(score, b, h, q_idx, kv_idx):
            return score + bias[0, h, q_idx, kv_idx]

        return compiled(batch["q"], batch["k"], batch["v"], score_mod=add_bias, block_mask=block_mask)

    return forward


@functools.cache
def _compiled_flex(flex_attention):
    """One compiled wrapper for every case: dynamo's cache then recompiles only for new shapes."""
    return torch.compile(flex_attention, dynamic=False)


def _flash_attn_setup(shape, inputs, device, mode, notes):
    try:
        from flash_attn import flash_attn_func
    except ImportError as error:
        raise Unavailable(f"flash-attn is not installed ({error})") from error
    if shape.mask not in ("none", "causal"):
        raise Unavailable(f"the {shape.mask} mask needs flash-attn's varlen API, not wired in this benchmark")
    if shape.bias:
        raise Unavailable("flash-attn takes no additive score bias (ALiBi slopes only)")

    def to_bnhd(batch):  # flash-attn's own layout, converted once outside the timing
        return {n: t.transpose(1, 2).contiguous().detach().requires_grad_(t.requires_grad) for n, t in batch.items()}

    causal = shape.mask == "causal"
    return to_bnhd, lambda batch: flash_attn_func(batch["q"], batch["k"], batch["v"], dropout_p=shape.dropout,
                                                  causal=causal)  # fmt: skip


CUDA_ONLY_COMPILE = "compiled baselines run on CUDA only (CPU compiles exceed the CPU budget)"

FAMILIES = [
    Family(
        op="attention",
        shapes=_shapes(),
        providers={
            **MOME,
            **{f"sdpa-{kind}": _sdpa(kind) for kind in SDPA_BACKENDS},
            "flex": Provider(
                "flex",
                "baseline",
                _flex_setup,
                applies=lambda s: s.mask != "none" or s.bias,
                cuda_only=CUDA_ONLY_COMPILE,
            ),  # fmt: skip
            "eager": Provider("eager", "baseline", _eager_setup),
            "flash-attn": Provider(
                "flash-attn", "baseline", _flash_attn_setup, cuda_only="flash-attn runs on CUDA only"
            ),
        },
        make_inputs=make_inputs,
        work=work,
        grad_names=("q", "k", "v", "bias"),
    )
]


def bench_attention(case, measure):
    measure(case)
