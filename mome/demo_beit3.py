"""The demo's BEiT-3 run: masked data modelling of a tiny BEiT-3 from scratch on generated shapes and captions (masked
patches and masked words of image-only, text-only and image-text input, one loss), then BEiT-3's retrieval
fine-tuning (ITC on each modality encoded alone); reports masked-prediction accuracy next to its majority-class
baseline and retrieval R@1 / R@5 on held-out pairs.

``train_beit3(BEiT3DemoOptions())`` returns the metrics as a dict; ``python -m mome demo --model beit3`` prints them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from mome.demo_metrics import print_retrieval, retrieval_scores
from mome.demo_training import check_counts, finish_recipe_demo, on_device, start_recipe_demo, warmup_cosine
from mome.models.beit3 import BEiT3, beit3_tiny_recipe
from mome.models.config import beit3_tiny
from mome.shapes_data import CaptionBatch, ShapesCaptions


@dataclass
class BEiT3DemoOptions:
    mdm_steps: int = 300  # pre-training: masked data modelling
    retrieval_steps: int = 250  # fine-tuning: image-text contrastive
    seed: int = 0
    device: str = "auto"  # auto: cuda when there is a GPU, else cpu
    batch_size: int = 48
    eval_size: int = 256
    lr: float = 2e-3
    retrieval_lr: float = 5e-4  # 1e-3 collapses the embeddings to one point (loss stuck at ln B) in some seeds
    image_size: int = 48  # 4 x 4 patches of 12 pixels, as the default demo
    patch_size: int = 12
    dim: int = 64
    depth: int = 2
    # BEiT-3 retrieves from the [CLS]; masked data modelling never trains it, and in this tiny model it comes out
    # nearly the same for every image (std across a batch ~0.002), which ITC cannot lift off within the run
    retrieval_pool: str = "mean"
    jitter: float | None = 0.03
    out: str | None = None  # a folder to write metrics.json into
    quiet: bool = False


@dataclass
class BEiT3History:
    mdm: list[float] = field(default_factory=list)
    retrieval: list[float] = field(default_factory=list)


def _model(options: BEiT3DemoOptions, data: ShapesCaptions) -> BEiT3:
    encoder = beit3_tiny(dim=options.dim, depth=options.depth, image_size=options.image_size,
                         patch_size=options.patch_size, vocab_size=data.tokenizer.vocab_size,
                         max_text_len=data.max_len)  # fmt: skip
    tokenizer = data.tokenizer
    config = beit3_tiny_recipe(encoder=encoder, mask_id=tokenizer.mask_id, special_ids=tokenizer.special_ids,
                               retrieval_pool=options.retrieval_pool)  # fmt: skip
    return BEiT3(config)


def _train(model: BEiT3, steps: int, lr: float, step_loss, label: str, quiet: bool) -> list[float]:
    """``steps`` AdamW steps of ``step_loss()`` (a fresh batch each) under warm-up and cosine decay."""
    if steps == 0:
        return []
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    model.train()
    history, start = [], time.perf_counter()
    for step in range(steps):
        loss = step_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        history.append(loss.detach().item())
        if not quiet and ((step + 1) % max(steps // 5, 1) == 0 or step + 1 == steps):
            rate = (step + 1) / (time.perf_counter() - start)
            print(f"beit3 {label} [{step + 1}/{steps}] loss {history[-1]:.3f} {rate:.1f} it/s", file=sys.stderr,
                  flush=True)  # fmt: skip
    return history


def masked_scores(logits: Tensor, targets: Tensor) -> dict:
    """Accuracy of the arg-max; that of always answering the most frequent target (the baseline to beat); the
    accuracy on the other targets alone (for patches: those a shape covers, where the background answer is wrong);
    the cross-entropy, and that of predicting the targets' own frequencies (the best without looking at the input)."""
    if targets.numel() == 0:
        nan = float("nan")
        return {"accuracy": nan, "majority": nan, "others_accuracy": nan, "loss": nan, "prior_loss": nan, "count": 0}
    right = logits.argmax(-1) == targets
    counts = targets.bincount()
    others = targets != counts.argmax()
    frequencies = counts[counts > 0].double() / targets.numel()
    return {
        "accuracy": float(right.float().mean()),
        "majority": float(counts.max()) / targets.numel(),
        "others_accuracy": float(right[others].float().mean()) if bool(others.any()) else float("nan"),
        "loss": float(F.cross_entropy(logits.float(), targets)),
        "prior_loss": float(-(frequencies * frequencies.log()).sum()),
        "count": int(targets.numel()),
    }


@torch.no_grad()
def masked_accuracy(model: BEiT3, batch: CaptionBatch, seed: int) -> dict:
    """Accuracy of the masked predictions on ``batch`` for each kind of input, masks drawn from ``seed``."""
    model.eval()
    c, generator = model.config, torch.Generator().manual_seed(seed)
    images, text_ids, padding = batch.images, batch.text_ids, batch.padding_mask
    size, device = images.shape[0], images.device
    image_mask = model.mask_patches(size, generator)
    text_ids_cpu, padding_cpu = text_ids.cpu(), padding.cpu()
    text_masked = [t.to(device) for t in model.mask_text(text_ids_cpu, padding_cpu, c.text_mask_prob, generator)]
    pair_mask = model.mask_patches(size, generator)
    pair_masked = [t.to(device) for t in model.mask_text(text_ids_cpu, padding_cpu, c.pair_text_mask_prob, generator)]
    patch_logits, codes, token_logits, labels = model.pair_logits(images, pair_mask, *pair_masked, padding)
    return {
        "image": masked_scores(*model.image_logits(images, image_mask)),
        "text": masked_scores(*model.text_logits(*text_masked, padding)),
        "pair_image": masked_scores(patch_logits, codes),
        "pair_text": masked_scores(token_logits, labels),
    }


@torch.no_grad()
def retrieval(model: BEiT3, batch: CaptionBatch) -> dict:
    model.eval()
    image_embed, text_embed = model.embed(batch.images, batch.text_ids, batch.padding_mask)
    return retrieval_scores(image_embed @ text_embed.T)


def train_beit3(options: BEiT3DemoOptions | None = None) -> dict:
    """Pre-train a tiny BEiT-3 by masked data modelling, fine-tune it for retrieval, evaluate on held-out pairs."""
    options = BEiT3DemoOptions() if options is None else options
    check_counts(options, 0, "mdm_steps", "retrieval_steps")
    check_counts(options, 1, "eval_size")
    start, device, data = start_recipe_demo(options)
    model = _model(options, data).to(device)
    generator = torch.Generator().manual_seed(options.seed)

    def batch() -> CaptionBatch:
        return on_device(data.train_batch(options.batch_size), device)

    def mdm_loss() -> Tensor:
        b = batch()
        return model.loss(b.images, b.text_ids, b.padding_mask, generator=generator).loss

    def retrieval_loss() -> Tensor:
        b = batch()
        return model.retrieval_loss(b.images, b.text_ids, b.padding_mask, positive_ids=b.caption_ids).loss

    history = BEiT3History()
    history.mdm = _train(model, options.mdm_steps, options.lr, mdm_loss, "masked data", options.quiet)
    held = on_device(data.held_out(options.eval_size), device)
    masked = masked_accuracy(model, held, options.seed)
    history.retrieval = _train(model, options.retrieval_steps, options.retrieval_lr, retrieval_loss, "retrieval  ",
                               options.quiet)  # fmt: skip
    metrics = {"held_out_pairs": held.images.shape[0], "masked_prediction": masked, "retrieval": retrieval(model, held)}
    return finish_recipe_demo(metrics, start, device, options, history)


def print_report(metrics: dict) -> None:
    print(f"\nBEiT-3 masked data modelling on {metrics['held_out_pairs']} held-out pairs (after pre-training):")
    print(f"  {'input':<28}{'accuracy':>10}{'majority':>10}{'on the rest':>13}{'loss':>7}{'prior':>7}{'masked':>8}")
    labels = {"image": "image only: patch colour", "text": "text only: word", "pair_image": "image-text: patch colour",
              "pair_text": "image-text: word"}  # fmt: skip
    for kind, label in labels.items():
        score = metrics["masked_prediction"][kind]
        print(f"  {label:<28}{score['accuracy']:>10.1%}{score['majority']:>10.1%}{score['others_accuracy']:>13.1%}"
              f"{score['loss']:>7.3f}{score['prior_loss']:>7.3f}{score['count']:>8}")  # fmt: skip
    pool = "[CLS]" if metrics["options"]["retrieval_pool"] == "cls" else "mean of the tokens"
    print_retrieval(f"retrieval after ITC fine-tuning ({pool} of each modality encoded alone):", metrics["retrieval"])
    print(f"took {metrics['seconds']:.0f} s on {metrics['device']}")
