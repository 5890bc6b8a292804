"""The demo's CoCa run: train ``coca_tiny`` from scratch on generated shapes and captions, one forward per step for
both losses (contrastive + captioning), then report retrieval and greedy KV-cached captions on held-out pairs.

``train_coca(CoCaDemoOptions())`` returns the metrics as a dict; ``python -m mome demo --model coca`` prints them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from mome.demo_metrics import caption_scores, print_retrieval, retrieval_scores
from mome.demo_training import check_counts, finish_recipe_demo, start_recipe_demo, warmup_cosine
from mome.models.coca import CoCa, coca_tiny
from mome.shapes_data import CaptionBatch, ShapesCaptions


@dataclass
class CoCaDemoOptions:
    steps: int = 800  # ~45-65 s on 2 CPU cores
    seed: int = 0
    device: str = "auto"  # auto: cuda when there is a GPU, else cpu
    batch_size: int = 48
    eval_size: int = 256
    lr: float = 1e-3  # 2e-3 (the VLMo demo's) collapses the contrastive embeddings to one point within 10 steps
    image_size: int = 48  # 4 x 4 patches of 12 pixels, as the VLMo demo
    patch_size: int = 12
    dim: int = 64
    vision_depth: int = 2
    text_depth: int = 1
    multimodal_depth: int = 1
    label_smoothing: float = 0.0
    jitter: float | None = 0.03  # shape centres on a 3 x 3 grid moved by up to this much (see ShapesCaptions)
    out: str | None = None  # a folder to write metrics.json into, as the VLMo demo does
    quiet: bool = False


@dataclass
class CoCaHistory:
    contrastive: list[float] = field(default_factory=list)
    caption: list[float] = field(default_factory=list)


def _model(options: CoCaDemoOptions, data: ShapesCaptions) -> CoCa:
    tokenizer = data.tokenizer
    config = coca_tiny(
        image_size=options.image_size,
        patch_size=options.patch_size,
        vision_dim=options.dim,
        text_dim=options.dim,
        embed_dim=options.dim,
        vision_depth=options.vision_depth,
        text_depth=options.text_depth,
        multimodal_depth=options.multimodal_depth,
        label_smoothing=options.label_smoothing,
        vocab_size=tokenizer.vocab_size,
        max_text_len=data.max_len,
        pad_id=tokenizer.pad_id,
    )
    return CoCa(config)


def train(model: CoCa, data: ShapesCaptions, options: CoCaDemoOptions, device: torch.device) -> CoCaHistory:
    """``options.steps`` AdamW steps of CoCa's weighted loss on fresh batches."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(options.steps))
    history = CoCaHistory()
    model.train()
    start = time.perf_counter()
    for step in range(options.steps):
        batch = data.train_batch(options.batch_size)
        # one caption per picture (the scene told left to right / top to bottom): with a caption and its mirror as
        # targets, greedy decoding mixes the two; caption ids still mark a repeated scene as a positive
        text_ids = batch.canonical_text_ids.to(device)
        padding = text_ids == data.tokenizer.pad_id
        losses = model.loss(batch.images.to(device), text_ids, padding, positive_ids=batch.caption_ids.to(device))
        optimizer.zero_grad(set_to_none=True)
        losses.loss.backward()
        optimizer.step()
        scheduler.step()
        history.contrastive.append(losses.contrastive.detach().item())
        history.caption.append(losses.caption.detach().item())
        if not options.quiet and ((step + 1) % max(options.steps // 10, 1) == 0 or step + 1 == options.steps):
            rate = (step + 1) / (time.perf_counter() - start)
            print(f"coca [{step + 1}/{options.steps}] contrastive {history.contrastive[-1]:.3f} caption "
                  f"{history.caption[-1]:.3f} {rate:.1f} it/s", file=sys.stderr, flush=True)  # fmt: skip
    return history


@torch.no_grad()
def evaluate(model: CoCa, held_out: CaptionBatch, data: ShapesCaptions, device: torch.device) -> dict:
    """Retrieval R@1 / R@5 both ways (held-out captions in their canonical wording: one per scene, as trained) and
    greedy KV-cached captions scored by exact match and words in place (a caption or its mirror counts)."""
    model.eval()
    images = held_out.images.to(device)
    text_ids = held_out.canonical_text_ids.to(device)
    similarity = model.encode_image(images) @ model.encode_text(text_ids, text_ids == data.tokenizer.pad_id).T
    size = similarity.shape[0]
    tokenizer = data.tokenizer
    ids = model.generate(images, data.max_len - 1, tokenizer.bos_id, tokenizer.eos_id)
    generated = tokenizer.decode(ids.cpu())
    exact, word_accuracy = caption_scores(generated, held_out.equivalent_captions)
    return {
        "held_out_pairs": size,
        "retrieval": retrieval_scores(similarity),
        "caption_exact_match": exact,
        "caption_word_accuracy": word_accuracy,
        "examples": [
            {"truth": truth, "generated": caption, "right": caption in truths}
            for truth, caption, truths in zip(held_out.captions, generated, held_out.equivalent_captions, strict=True)
        ][:6],
    }


def train_coca(options: CoCaDemoOptions | None = None) -> dict:
    """Train ``coca_tiny`` on ShapesCaptions for ``options.steps`` steps; evaluate on ``eval_size`` held-out pairs."""
    options = CoCaDemoOptions() if options is None else options
    check_counts(options, 1, "steps", "eval_size")
    start, device, data = start_recipe_demo(options)
    model = _model(options, data).to(device)
    history = train(model, data, options, device)
    metrics = evaluate(model, data.held_out(options.eval_size), data, device)
    return finish_recipe_demo(metrics, start, device, options, history)


def print_report(metrics: dict) -> None:
    print_retrieval(
        f"CoCa retrieval on {metrics['held_out_pairs']} held-out pairs (contrastive embeddings):", metrics["retrieval"]
    )
    print(f"\ncaptions (greedy, KV cache): {metrics['caption_exact_match']:.1%} exactly right, "
          f"{metrics['caption_word_accuracy']:.1%} of the words right in place")  # fmt: skip
    for example in metrics["examples"]:
        mark = "=" if example["right"] else "≠"
        print(f"  truth: {example['truth']:<48} {mark} generated: {example['generated']}")
    print(f"took {metrics['seconds']:.0f} s on {metrics['device']}")
