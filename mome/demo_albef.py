"""The demo's ALBEF run: train ``albef_tiny`` from scratch on generated shapes and captions with ALBEF's three
losses (ITC with momentum distillation, ITM on hard negatives mixed with random ones, MLM with momentum
distillation), then report retrieval and balanced image-text matching on held-out pairs.

``train_albef(ALBEFDemoOptions())`` returns the metrics as a dict; ``python -m mome demo --model albef`` prints them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mome.demo_metrics import itm_scores, print_retrieval, retrieval_scores
from mome.demo_training import (
    check_counts,
    finish_recipe_demo,
    on_device,
    start_recipe_demo,
    warmup_cosine,
)
from mome.models.albef import ALBEF, albef_tiny
from mome.shapes_data import CaptionBatch, ShapesCaptions


@dataclass
class ALBEFDemoOptions:
    steps: int = 400
    seed: int = 0
    device: str = "auto"  # auto: cuda when there is a GPU, else cpu
    batch_size: int = 48
    eval_size: int = 256
    lr: float = 1e-3
    image_size: int = 48  # 4 x 4 patches of 12 pixels, as the other demos
    patch_size: int = 12
    dim: int = 64
    vision_depth: int = 2
    text_depth: int = 1
    fusion_depth: int = 1
    # from scratch a queue stalls ITC (200 steps: ITC loss 4.5-5.6 with 48-256 entries, held-out R@1 at chance;
    # 2.3 and 12% without), likely as the [CLS] features start out alike: ALBEF starts from pretrained encoders
    queue_size: int = 0
    momentum: float = 0.9  # ALBEF's 0.995 lags hundreds of steps behind encoders that change fast from scratch
    alpha: float = 0.4
    itm_random_negatives: float = 0.5  # from scratch, ITM on hard negatives alone stays at the majority class
    itm_balanced: bool = True
    jitter: float | None = 0.03  # shape centres on a 3 x 3 grid moved by up to this much (see ShapesCaptions)
    out: str | None = None  # a folder to write metrics.json into, as the other demos do
    quiet: bool = False


@dataclass
class ALBEFHistory:
    itc: list[float] = field(default_factory=list)
    itm: list[float] = field(default_factory=list)
    mlm: list[float] = field(default_factory=list)


def _model(options: ALBEFDemoOptions, data: ShapesCaptions) -> ALBEF:
    tokenizer = data.tokenizer
    config = albef_tiny(
        image_size=options.image_size,
        patch_size=options.patch_size,
        vision_dim=options.dim,
        text_dim=options.dim,
        embed_dim=options.dim,
        vision_depth=options.vision_depth,
        text_depth=options.text_depth,
        fusion_depth=options.fusion_depth,
        queue_size=options.queue_size,
        momentum=options.momentum,
        alpha=options.alpha,
        itm_random_negatives=options.itm_random_negatives,
        itm_balanced=options.itm_balanced,
        vocab_size=tokenizer.vocab_size,
        max_text_len=data.max_len,
        pad_id=tokenizer.pad_id,
        mask_id=tokenizer.mask_id,
        special_ids=tokenizer.special_ids,
    )
    return ALBEF(config)


def train(model: ALBEF, data: ShapesCaptions, options: ALBEFDemoOptions, device: torch.device) -> ALBEFHistory:
    """``options.steps`` AdamW steps of ALBEF's summed losses on fresh batches, an EMA step after each."""
    trained = [p for p in model.parameters() if p.requires_grad]  # the momentum copies only follow by EMA
    optimizer = torch.optim.AdamW(trained, lr=options.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(options.steps))
    generator = torch.Generator(device).manual_seed(options.seed)
    history = ALBEFHistory()
    model.train()
    start = time.perf_counter()
    for step in range(options.steps):
        batch = data.train_batch(options.batch_size)
        text_ids = batch.text_ids.to(device)
        # a caption and its mirror, or a repeated scene, share an id: positives of each other, never ITM negatives
        losses = model.loss(batch.images.to(device), text_ids, batch.padding_mask.to(device),
                            positive_ids=batch.caption_ids.to(device), generator=generator)  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        scheduler.step()
        model.update_momentum()
        for name in ("itc", "itm", "mlm"):
            getattr(history, name).append(losses[name].detach().item())
        if not options.quiet and ((step + 1) % max(options.steps // 10, 1) == 0 or step + 1 == options.steps):
            rate = (step + 1) / (time.perf_counter() - start)
            print(f"albef [{step + 1}/{options.steps}] itc {history.itc[-1]:.3f} itm {history.itm[-1]:.3f} "
                  f"mlm {history.mlm[-1]:.3f} {rate:.1f} it/s", file=sys.stderr, flush=True)  # fmt: skip
    return history


class _MatchingView:
    """What :func:`mome.demo_metrics.itm_scores` calls (``encoder.encode_pair``, ``encoder.fused_cls``, ``itm``),
    answered by :meth:`ALBEF.itm_logits`: the pair's logits pass through the last two unchanged."""

    def __init__(self, model: ALBEF) -> None:
        self.model, self.encoder = model, self

    def encode_pair(self, images: Tensor, text_ids: Tensor, text_padding_mask: Tensor) -> Tensor:
        return self.model.itm_logits(images, text_ids, text_padding_mask)

    def fused_cls(self, logits: Tensor) -> Tensor:
        return logits

    def itm(self, logits: Tensor) -> Tensor:
        return logits


@torch.no_grad()
def evaluate(model: ALBEF, held_out: CaptionBatch, seed: int, device: torch.device) -> dict:
    """Retrieval R@1 / R@5 both ways by ITC similarity, and ITM balanced accuracy on every held-out pair as a
    match and as many true non-matches (hard: the most similar other scene; random: any other scene)."""
    model.eval()
    batch = on_device(held_out, device)
    similarity = model.encode_image(batch.images) @ model.encode_text(batch.text_ids, batch.padding_mask).T
    size = similarity.shape[0]
    itm = itm_scores(_MatchingView(model), batch, similarity, torch.Generator().manual_seed(seed)) if size > 1 else None
    return {
        "held_out_pairs": size,
        "retrieval": retrieval_scores(similarity),
        "itm": itm,
    }


def train_albef(options: ALBEFDemoOptions | None = None) -> dict:
    """Train ``albef_tiny`` on ShapesCaptions for ``options.steps`` steps; evaluate on ``eval_size`` held-out pairs."""
    options = ALBEFDemoOptions() if options is None else options
    check_counts(options, 1, "steps", "eval_size")
    start, device, data = start_recipe_demo(options)
    model = _model(options, data).to(device)
    history = train(model, data, options, device)
    metrics = evaluate(model, data.held_out(options.eval_size), options.seed, device)
    return finish_recipe_demo(metrics, start, device, options, history)


def print_report(metrics: dict) -> None:
    print_retrieval(
        f"ALBEF retrieval on {metrics['held_out_pairs']} held-out pairs (ITC similarity):", metrics["retrieval"]
    )
    itm = metrics["itm"]
    if itm is not None:
        print("\nimage-text matching (fused [CLS]), as many non-matches as matches (majority class: 50%):")
        for kind in ("hard", "random"):
            s = itm[f"{kind}_negatives"]
            print(f"  {kind + ' non-matches':<22} balanced accuracy {s['balanced_accuracy']:.1%} "
                  f"(matches {s['match_accuracy']:.1%}, non-matches {s['no_match_accuracy']:.1%})")  # fmt: skip
    print(f"took {metrics['seconds']:.0f} s on {metrics['device']}")
