"""One whole MoME layer, forward and backward, as model FLOP utilisation.

The layer is built here from ``mome.ops`` (not from ``mome.nn``) in two layouts:

- VLMo: shared LayerNorm, q/k/v and output projections and attention; per-modality LayerNorm + FFN.
- BEiT-3: every LayerNorm and projection multiway (one per modality), shared attention.

``torch-eager`` is the same layer as torchscale computes it: split each sequence at the image/text
boundary, one module per part, cat, and ``F.scaled_dot_product_attention``. MFU = model FLOPs
(:func:`mome.perf.mome_layer_flops`) / time / datasheet peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mome import ops, perf

from .harness import KERNELS_NEED_A_GPU, Family, Provider, Work, generator, mome_providers, randn


@dataclass(frozen=True)
class LayerShape:
    batch: int
    image: int
    text: int
    dim: int
    heads: int
    hidden: int
    layout: str  # vlmo | beit3
    subsets: frozenset = frozenset({"full"})

    @property
    def seq(self) -> int:
        return self.image + self.text


def _shapes() -> dict[str, LayerShape]:
    tiny, quick = frozenset({"tiny"}), frozenset({"quick", "full"})
    return {
        "tiny-vlmo": LayerShape(2, 9, 5, 32, 2, 64, "vlmo", tiny),
        "tiny-beit3": LayerShape(2, 9, 5, 32, 2, 64, "beit3", tiny),
        "vlmo-base": LayerShape(32, 197, 40, 768, 12, 3072, "vlmo", quick),
        "beit3-base": LayerShape(32, 197, 64, 768, 12, 3072, "beit3", quick),
        "beit3-large": LayerShape(32, 197, 64, 1024, 16, 4096, "beit3"),
    }


PARAMETERS = ("ln1_w", "ln1_b", "qkv_w", "qkv_b", "out_w", "out_b", "ln2_w", "ln2_b", "w1", "b1", "w2", "b2")


def make_inputs(shape: LayerShape, dtype, device, seed: int, requires_grad: bool) -> dict:
    g = generator(device, seed)
    d, f, e = shape.dim, shape.hidden, 2
    multi = (e,) if shape.layout == "beit3" else ()  # BEiT-3: one copy per modality of the attention part too

    def param(size, scale, offset=0.0):
        return (randn(size, dtype, device, g, scale=scale) + offset).requires_grad_(requires_grad)

    one = torch.cat([torch.zeros(shape.image), torch.ones(shape.text)])
    return {
        "x": randn((shape.batch, shape.seq, d), dtype, device, g, requires_grad),
        "modality": one.repeat(shape.batch).to(device=device, dtype=torch.int64),  # [B·N]
        "ln1_w": param((*multi, d), 0.1, 1.0),
        "ln1_b": param((*multi, d), 0.1),
        "qkv_w": param((*multi, 3 * d, d), d**-0.5),
        "qkv_b": param((*multi, 3 * d), 0.1),
        "out_w": param((*multi, d, d), d**-0.5),
        "out_b": param((*multi, d), 0.1),
        "ln2_w": param((e, d), 0.1, 1.0),
        "ln2_b": param((e, d), 0.1),
        "w1": param((e, f, d), d**-0.5),
        "b1": param((e, f), 0.1),
        "w2": param((e, d, f), f**-0.5),
        "b2": param((e, d), 0.1),
    }


def work(shape: LayerShape, mode: str, dtype) -> Work:
    flops = perf.mome_layer_flops(shape.batch, shape.seq, shape.dim, shape.heads, shape.hidden, mode=mode)
    params = 4 * shape.dim**2 + 2 * shape.dim * shape.hidden
    nbytes = perf.element_size(dtype) * (2 * params + 4 * shape.batch * shape.seq * shape.dim)
    return Work(flops, nbytes, "TFLOP/s", "2·T·4D² + 4·B·N²·D + 2·T·2·D·F per forward; bwd ×2 (attention ×2.5)")


def _heads(qkv: torch.Tensor, shape: LayerShape):
    """``(T, 3D)`` → q, k, v ``(B, H, N, D/H)``."""
    per_head = qkv.view(shape.batch, shape.seq, 3, shape.heads, shape.dim // shape.heads)
    return per_head.permute(2, 0, 3, 1, 4).unbind(0)


def _merge(out: torch.Tensor, shape: LayerShape) -> torch.Tensor:
    return out.transpose(1, 2).reshape(shape.batch * shape.seq, shape.dim)  # [T, D]


def _mome_layer(inputs, backend, shape):
    p, m = inputs, inputs["modality"]
    h = p["x"].reshape(-1, shape.dim)  # [T, D]
    if shape.layout == "beit3":
        a = ops.modality_layer_norm(h, m, p["ln1_w"], p["ln1_b"], backend=backend)
        qkv = ops.modality_linear(a, m, p["qkv_w"], p["qkv_b"], backend=backend)
    else:
        qkv = F.linear(F.layer_norm(h, (shape.dim,), p["ln1_w"], p["ln1_b"]), p["qkv_w"], p["qkv_b"])
    attended = _merge(ops.attention(*_heads(qkv, shape), backend=backend), shape)
    if shape.layout == "beit3":
        h = h + ops.modality_linear(attended, m, p["out_w"], p["out_b"], backend=backend)
    else:
        h = h + F.linear(attended, p["out_w"], p["out_b"])
    z = ops.modality_layer_norm(h, m, p["ln2_w"], p["ln2_b"], backend=backend)
    h = h + ops.modality_ffn(z, m, p["w1"], p["b1"], p["w2"], p["b2"], activation="gelu", backend=backend)
    return h.view(shape.batch, shape.seq, shape.dim)


def _multiway(x: torch.Tensor, shape: LayerShape, fn) -> torch.Tensor:
    """torchscale's MultiwayNetwork on ``(B, N, C)``: expert 0 on the image part, 1 on the text part, cat."""
    return torch.cat([fn(x[:, : shape.image], 0), fn(x[:, shape.image :], 1)], dim=1)


def _eager_layer(p, shape: LayerShape):
    x, d = p["x"], shape.dim
    beit3 = shape.layout == "beit3"

    def pick(name, e):
        return p[name][e] if beit3 else p[name]

    a = _multiway(x, shape, lambda part, e: F.linear(F.layer_norm(part, (d,), pick("ln1_w", e), pick("ln1_b", e)),
                                                     pick("qkv_w", e), pick("qkv_b", e)))  # fmt: skip
    q, k, v = _heads(a.reshape(-1, 3 * d), shape)
    attended = _merge(F.scaled_dot_product_attention(q, k, v), shape).view(shape.batch, shape.seq, d)
    h = x + _multiway(attended, shape, lambda part, e: F.linear(part, pick("out_w", e), pick("out_b", e)))

    def ffn(part, e):
        z = F.layer_norm(part, (d,), p["ln2_w"][e], p["ln2_b"][e])
        return F.linear(F.gelu(F.linear(z, p["w1"][e], p["b1"][e])), p["w2"][e], p["b2"][e])

    return h + _multiway(h, shape, ffn)


def _auto_setup(shape, inputs, device, mode, notes):
    return lambda batch: _mome_layer(batch, "auto", shape)


FAMILIES = [
    Family(
        op="mome_layer",
        shapes=_shapes(),
        providers={
            **mome_providers(_mome_layer, setup=lambda shape, inputs, device: shape),
            "mome-auto": Provider("mome-auto", "mome", _auto_setup, cuda_only=KERNELS_NEED_A_GPU),
            "torch-eager": Provider(
                "torch-eager", "baseline", lambda shape, inputs, device, mode, notes: lambda b: _eager_layer(b, shape)
            ),
        },  # fmt: skip
        make_inputs=make_inputs,
        work=work,
        grad_names=("x", *PARAMETERS),
        modes=("fwd", "fwd+bwd"),
    )
]


def bench_layer(case, measure):
    measure(case)
