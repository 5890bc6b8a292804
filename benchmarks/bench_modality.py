"""Per-modality experts: expert FFN, multiway LayerNorm and the routing metadata.

- FFN: mome vs torchscale's split → per-expert ``F.linear`` chain → cat, a per-expert index /
  ``index_add`` loop (mPLUG-Owl2 style), ``torch._grouped_mm`` on sorted tokens, and one dense FFN
  over all tokens (the lower bound). TFLOP/s = ``(2·T·D·F + 2·T·F·D) / time``, backward 2×.
- LayerNorm: GB/s of x read and y written, vs split/cat, the index loop and one dense LayerNorm.
- Routing: permutation + per-expert offsets (the family's private op ``mome::modality_routing``); GB/s of ids
  read and permutation written, vs ``torch.sort`` + bincount/cumsum.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mome import ops, perf

from .harness import Family, Provider, Unavailable, Work, generator, mome_providers, randn


@dataclass(frozen=True)
class TokenShape:
    batch: int
    image: int  # image tokens per sequence (first), then text tokens
    text: int
    dim: int
    hidden: int
    experts: int
    layout: str  # split (image then text in each sequence) | interleaved (random ids) | per-sequence
    subsets: frozenset = frozenset({"full"})

    @property
    def tokens(self) -> int:
        return self.batch * (self.image + self.text)


def _shapes() -> dict[str, TokenShape]:
    tiny, quick = frozenset({"tiny"}), frozenset({"quick", "full"})
    return {
        "tiny-split": TokenShape(2, 9, 5, 32, 64, 2, "split", tiny),
        "tiny-interleaved": TokenShape(2, 9, 5, 32, 64, 2, "interleaved", tiny),
        "beit3-base": TokenShape(32, 197, 64, 768, 3072, 2, "split", quick),
        "beit3-large": TokenShape(32, 197, 64, 1024, 4096, 2, "split"),
        "beit3-base-interleaved": TokenShape(32, 197, 64, 768, 3072, 2, "interleaved"),
        "vlmo-base-3experts": TokenShape(33, 197, 40, 768, 3072, 3, "per-sequence"),
    }


def modality_ids(shape: TokenShape, device) -> torch.Tensor:
    """``(T,)`` expert id per token, the same for every seed."""
    per_sequence = shape.image + shape.text
    if shape.layout == "split":
        one = torch.cat([torch.zeros(shape.image), torch.ones(shape.text)])
        return one.repeat(shape.batch).to(device=device, dtype=torch.int64)
    if shape.layout == "interleaved":
        g = torch.Generator().manual_seed(7)
        return torch.randint(shape.experts, (shape.tokens,), generator=g).to(device)
    sequence_expert = torch.arange(shape.batch) % shape.experts
    return sequence_expert.repeat_interleave(per_sequence).to(device)


def _used_experts(shape: TokenShape) -> int:
    return int(modality_ids(shape, "cpu").unique().numel())


# ---- expert FFN ---------------------------------------------------------------------------------------


def make_ffn_inputs(shape: TokenShape, dtype, device, seed: int, requires_grad: bool) -> dict:
    g = generator(device, seed)
    e, d, f = shape.experts, shape.dim, shape.hidden
    return {
        "x": randn((shape.tokens, d), dtype, device, g, requires_grad),
        "modality": modality_ids(shape, device),
        "w1": randn((e, f, d), dtype, device, g, requires_grad, scale=d**-0.5),
        "b1": randn((e, f), dtype, device, g, requires_grad, scale=0.1),
        "w2": randn((e, d, f), dtype, device, g, requires_grad, scale=f**-0.5),
        "b2": randn((e, d), dtype, device, g, requires_grad, scale=0.1),
    }


def ffn_work(shape: TokenShape, mode: str, dtype) -> Work:
    return Work(
        perf.ffn_flops(shape.tokens, shape.dim, shape.hidden, mode=mode),
        perf.ffn_bytes(shape.tokens, shape.dim, shape.hidden, _used_experts(shape), dtype, mode=mode),
        "TFLOP/s",
        "2·T·D·F + 2·T·F·D per forward; bwd ×2",
    )


def _expert_ffn(x, inputs, e):
    hidden = F.gelu(F.linear(x, inputs["w1"][e], inputs["b1"][e]))
    return F.linear(hidden, inputs["w2"][e], inputs["b2"][e])


def _mome_ffn(inputs, backend, context):
    tensors = (inputs[name] for name in ("x", "modality", "w1", "b1", "w2", "b2"))
    return ops.modality_ffn(*tensors, activation="gelu", backend=backend)


def _split_cat_setup(shape, inputs, device, mode, notes):
    """torchscale's MultiwayNetwork: split each sequence at the image/text boundary, one module each, cat."""
    if shape.layout != "split" or shape.experts != 2:
        raise Unavailable("split/cat needs one split position per sequence and 2 experts (torchscale's layout)")

    def forward(batch):
        x = batch["x"].view(shape.batch, shape.image + shape.text, shape.dim)  # [B, N, D]
        parts = [_expert_ffn(x[:, : shape.image], batch, 0), _expert_ffn(x[:, shape.image :], batch, 1)]
        return torch.cat(parts, dim=1).view(shape.tokens, shape.dim)

    return forward


def _index_loop(expert_fn):
    def setup(shape, inputs, device, mode, notes):
        rows = [(inputs["modality"] == e).nonzero().squeeze(1) for e in range(shape.experts)]

        def forward(batch):
            x = batch["x"]
            out = None
            for e, index in enumerate(rows):  # gather this expert's rows, run it, add them back in place
                part = expert_fn(x[index], batch, e)
                out = (part.new_zeros(x.shape[0], part.shape[1]) if out is None else out).index_add(0, index, part)
            return out

        return forward

    return setup


def _grouped_mm_setup(shape, inputs, device, mode, notes):
    grouped_mm = getattr(torch, "_grouped_mm", None)
    if grouped_mm is None:
        raise Unavailable("this torch has no torch._grouped_mm")
    modality = inputs["modality"]
    order = torch.argsort(modality, stable=True)
    offsets = torch.cumsum(torch.bincount(modality, minlength=shape.experts), 0).to(torch.int32)
    sorted_ids = modality[order]

    def forward(batch):
        x = batch["x"][order]  # tokens grouped by expert
        hidden = grouped_mm(x, batch["w1"].transpose(-2, -1), offs=offsets) + batch["b1"][sorted_ids]
        out = grouped_mm(F.gelu(hidden), batch["w2"].transpose(-2, -1), offs=offsets) + batch["b2"][sorted_ids]
        return torch.empty_like(out).index_copy(0, order, out)

    return forward


def _dense_ffn_setup(shape, inputs, device, mode, notes):
    return lambda batch: _expert_ffn(batch["x"], batch, 0)


FFN = Family(
    op="modality_ffn",
    shapes=_shapes(),
    providers={
        **mome_providers(_mome_ffn),
        "torchscale-split-cat": Provider("torchscale-split-cat", "baseline", _split_cat_setup),
        "index-loop": Provider("index-loop", "baseline", _index_loop(_expert_ffn)),
        "grouped-mm": Provider(
            "grouped-mm", "baseline", _grouped_mm_setup, cuda_only="torch._grouped_mm runs on CUDA only"
        ),
        "dense-ffn": Provider("dense-ffn", "bound", _dense_ffn_setup),
    },
    make_inputs=make_ffn_inputs,
    work=ffn_work,
    grad_names=("x", "w1", "b1", "w2", "b2"),
)


# ---- multiway LayerNorm -------------------------------------------------------------------------------


def make_norm_inputs(shape: TokenShape, dtype, device, seed: int, requires_grad: bool) -> dict:
    g = generator(device, seed)
    return {
        "x": randn((shape.tokens, shape.dim), dtype, device, g, requires_grad),
        "modality": modality_ids(shape, device),
        "weight": (1 + randn((shape.experts, shape.dim), dtype, device, g, scale=0.1)).requires_grad_(requires_grad),
        "bias": randn((shape.experts, shape.dim), dtype, device, g, requires_grad, scale=0.1),
    }


def norm_work(shape: TokenShape, mode: str, dtype) -> Work:
    return Work(
        8.0 * shape.tokens * shape.dim,
        perf.layer_norm_bytes(shape.tokens, shape.dim, shape.experts, dtype, mode),
        "GB/s",
        "bytes: fwd x + y, bwd x + dy + dx (+ per-expert gamma/beta)",
    )


def _expert_norm(x, inputs, e):
    return F.layer_norm(x, x.shape[-1:], inputs["weight"][e], inputs["bias"][e])


def _mome_norm(inputs, backend, context):
    return ops.modality_layer_norm(inputs["x"], inputs["modality"], inputs["weight"], inputs["bias"], backend=backend)


def _split_cat_norm_setup(shape, inputs, device, mode, notes):
    if shape.layout != "split" or shape.experts != 2:
        raise Unavailable("split/cat needs one split position per sequence and 2 experts (torchscale's layout)")

    def forward(batch):
        x = batch["x"].view(shape.batch, shape.image + shape.text, shape.dim)
        parts = [_expert_norm(x[:, : shape.image], batch, 0), _expert_norm(x[:, shape.image :], batch, 1)]
        return torch.cat(parts, dim=1).view(shape.tokens, shape.dim)

    return forward


NORM = Family(
    op="modality_layer_norm",
    shapes=_shapes(),
    providers={
        **mome_providers(_mome_norm),
        "torchscale-split-cat": Provider("torchscale-split-cat", "baseline", _split_cat_norm_setup),
        "index-loop": Provider("index-loop", "baseline", _index_loop(_expert_norm)),
        "dense-layer-norm": Provider(
            "dense-layer-norm", "bound", lambda shape, inputs, device, mode, notes: lambda b: _expert_norm(b["x"], b, 0)
        ),
    },
    make_inputs=make_norm_inputs,
    work=norm_work,
    grad_names=("x", "weight", "bias"),
)


# ---- routing metadata ---------------------------------------------------------------------------------


def make_routing_inputs(shape: TokenShape, dtype, device, seed: int, requires_grad: bool) -> dict:
    return {"modality": modality_ids(shape, device)}


def routing_work(shape: TokenShape, mode: str, dtype) -> Work:
    return Work(
        0.0,
        shape.tokens * (8 + 2 * 4) + shape.experts * 4,
        "GB/s",
        "bytes: int64 ids read, int32 permutation and inverse written, E offsets",
    )


def _torch_sort_setup(shape, inputs, device, mode, notes):
    def forward(batch):
        order = torch.sort(batch["modality"], stable=True).indices
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        counts = torch.bincount(batch["modality"], minlength=shape.experts)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # [E + 1], like the op's
        return order.to(torch.int32), inverse.to(torch.int32), offsets.to(torch.int32)

    return forward


def _mome_routing(inputs, backend, num_experts):
    """The private routing op of the modality family (``mome::modality_routing``) with a forced backend."""
    return torch.ops.mome.modality_routing(inputs["modality"], num_experts, backend)


_ROUTING_PROVIDERS = mome_providers(_mome_routing, setup=lambda shape, inputs, device: shape.experts)
ROUTING = Family(
    op="routing",
    shapes={name: shape for name, shape in _shapes().items() if "interleaved" in name or name == "beit3-base"},
    providers={
        **{name: dataclasses.replace(provider, modes=("fwd",)) for name, provider in _ROUTING_PROVIDERS.items()},
        "torch-sort": Provider("torch-sort", "baseline", _torch_sort_setup, modes=("fwd",)),
    },
    make_inputs=make_routing_inputs,
    work=routing_work,
    modes=("fwd",),
)

FAMILIES = [FFN, NORM, ROUTING]


def bench_modality(case, measure):
    measure(case)
