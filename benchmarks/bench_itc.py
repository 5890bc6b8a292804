"""Image-text contrastive loss: mome vs open_clip's ClipLoss and ALBEF's ITA loss with hard negatives.

Effective TFLOP/s = ``2·B·(B+Q)·d`` per similarity pass (2 passes forward, 4 with momentum
distillation; 4 more backward). Peak memory (``peak_mem_mb``) is the allocator's peak above what was
allocated before the call. open_clip is not a dependency: when it is not installed, ``clip-formula``
runs its ClipLoss formula (materialised logits, cross-entropy both ways), written here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mome import ops, perf

from .harness import Family, Provider, Unavailable, Work, generator, mome_providers

ALBEF_ALPHA = 0.4
ALBEF_TEMPERATURE = 0.07


@dataclass(frozen=True)
class ITCShape:
    batch: int
    dim: int
    queue: int = 0
    albef: bool = False  # momentum features, queue, alpha, hard negatives drawn per row
    subsets: frozenset = frozenset({"full"})


def _shapes() -> dict[str, ITCShape]:
    tiny, quick = frozenset({"tiny"}), frozenset({"quick", "full"})
    shapes = {
        "tiny-clip": ITCShape(24, 16, subsets=tiny),
        "tiny-albef": ITCShape(12, 16, queue=40, albef=True, subsets=tiny),
        "albef-b512-q65k-d256": ITCShape(512, 256, queue=65536, albef=True, subsets=quick),
        # the issue-15 target: the whole batch of 65 536 pairs against ALBEF's 57 600-entry queue on one GPU
        "albef-b64k-q57600-d256": ITCShape(65536, 256, queue=57600, albef=True),
    }
    for batch in (4096, 16384, 65536):
        for dim in (256, 512, 768):
            name = f"clip-b{batch // 1024}k-d{dim}"
            shapes[name] = ITCShape(batch, dim, subsets=quick if name == "clip-b16k-d512" else frozenset({"full"}))
    return shapes


def _features(rows: int, shape: ITCShape, dtype, device, g, requires_grad=False) -> torch.Tensor:
    values = F.normalize(torch.randn(rows, shape.dim, generator=g, device=device), dim=-1)
    return values.to(dtype).requires_grad_(requires_grad)


def make_inputs(shape: ITCShape, dtype, device, seed: int, requires_grad: bool) -> dict:
    g = generator(device, seed)
    inputs = {
        "image_feats": _features(shape.batch, shape, dtype, device, g, requires_grad),
        "text_feats": _features(shape.batch, shape, dtype, device, g, requires_grad),
        "scale": torch.tensor(1 / ALBEF_TEMPERATURE, device=device, requires_grad=requires_grad),
    }
    if shape.albef:
        inputs["image_feats_m"] = _features(shape.batch, shape, dtype, device, g)
        inputs["text_feats_m"] = _features(shape.batch, shape, dtype, device, g)
        inputs["image_queue"] = _features(shape.queue, shape, dtype, device, g)
        inputs["text_queue"] = _features(shape.queue, shape, dtype, device, g)
    return inputs


def work(shape: ITCShape, mode: str, dtype) -> Work:
    return Work(
        perf.itc_flops(shape.batch, shape.queue, shape.dim, distill=shape.albef, mode=mode),
        perf.itc_bytes(shape.batch, shape.queue, shape.dim, dtype, distill=shape.albef, mode=mode),
        "TFLOP/s",
        "2·B·(B+Q)·d per similarity pass: fwd 2 (4 with distillation), bwd 4",
    )


def _mome_call(inputs, backend, context):
    extra = {}
    if "image_queue" in inputs:
        extra = dict(
            image_feats_m=inputs["image_feats_m"],
            text_feats_m=inputs["text_feats_m"],
            image_queue=inputs["image_queue"],
            text_queue=inputs["text_queue"],
            alpha=ALBEF_ALPHA,
            hard_negatives="sample",
        )
    return ops.itc_loss(inputs["image_feats"], inputs["text_feats"], inputs["scale"], backend=backend, **extra).loss


def _clip_formula(batch):
    """open_clip's ClipLoss (one process): logits both ways, cross-entropy against the diagonal."""
    logits_per_image = batch["scale"] * batch["image_feats"] @ batch["text_feats"].T  # [B, B]
    logits_per_text = batch["scale"] * batch["text_feats"] @ batch["image_feats"].T
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _open_clip_setup(shape, inputs, device, mode, notes):
    try:
        from open_clip.loss import ClipLoss
    except ImportError as error:
        raise Unavailable(f"open_clip is not installed ({error}); see clip-formula") from error
    loss = ClipLoss()
    return lambda batch: loss(batch["image_feats"], batch["text_feats"], batch["scale"])


# B x (B + Q) matrices the formula's forward holds for its backward, per direction: the similarity, the momentum
# similarity, its softmax, the targets and the log-softmax (a lower bound: the transient products come on top)
ALBEF_FORMULA_MATRICES = 10


def _albef_formula_setup(shape, inputs, device, mode, notes):
    """The formula, unless its logits alone would not fit the device (it would run out of memory after minutes)."""
    if device.type == "cuda":
        need = ALBEF_FORMULA_MATRICES * shape.batch * (shape.batch + shape.queue) * inputs["image_feats"].element_size()
        have = torch.cuda.get_device_properties(device).total_memory
        if need > have:
            raise Unavailable(f"materialises {ALBEF_FORMULA_MATRICES} B x (B + Q) matrices: {need / 1e9:.0f} GB, "
                              f"more than the device's {have / 1e9:.0f} GB")  # fmt: skip
    return _albef_formula


def _albef_formula(batch):
    """ALBEF's ITA loss as its model code computes it, then its per-row multinomial loop for ITM negatives."""
    image, text, scale = batch["image_feats"], batch["text_feats"], batch["scale"]
    text_all = torch.cat([batch["text_feats_m"], batch["text_queue"]]).T  # [d, B + Q]
    image_all = torch.cat([batch["image_feats_m"], batch["image_queue"]]).T
    sim_i2t, sim_t2i = scale * image @ text_all, scale * text @ image_all  # [B, B + Q]
    with torch.no_grad():
        targets = torch.zeros_like(sim_i2t)
        targets.fill_diagonal_(1)
        sim_i2t_m = scale * batch["image_feats_m"] @ text_all
        sim_t2i_m = scale * batch["text_feats_m"] @ image_all
        targets_i2t = ALBEF_ALPHA * F.softmax(sim_i2t_m, dim=1) + (1 - ALBEF_ALPHA) * targets
        targets_t2i = ALBEF_ALPHA * F.softmax(sim_t2i_m, dim=1) + (1 - ALBEF_ALPHA) * targets
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * targets_i2t, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * targets_t2i, dim=1).mean()
    with torch.no_grad():
        rows = image.shape[0]
        weights_i2t = F.softmax(sim_i2t[:, :rows].float(), dim=1) + 1e-4
        weights_i2t.fill_diagonal_(0)
        weights_t2i = F.softmax(sim_t2i[:, :rows].float(), dim=1) + 1e-4
        weights_t2i.fill_diagonal_(0)
        _negative_texts = [torch.multinomial(weights_i2t[b], 1).item() for b in range(rows)]
        _negative_images = [torch.multinomial(weights_t2i[b], 1).item() for b in range(rows)]
    return (loss_i2t + loss_t2i) / 2


FAMILIES = [
    Family(
        op="itc_loss",
        shapes=_shapes(),
        providers={
            **mome_providers(_mome_call),
            "open_clip": Provider("open_clip", "baseline", _open_clip_setup, applies=lambda s: not s.albef),
            "clip-formula": Provider(
                "clip-formula", "baseline", lambda *_: _clip_formula, applies=lambda s: not s.albef
            ),
            "albef-formula": Provider("albef-formula", "baseline", _albef_formula_setup, applies=lambda s: s.albef),
        },
        make_inputs=make_inputs,
        work=work,
        grad_names=("image_feats", "text_feats", "scale"),
        modes=("fwd", "fwd+bwd"),
    )
]


def bench_itc(case, measure):
    measure(case)
