"""The demo's VLMo run: stagewise pre-training of a tiny VLMo from scratch on generated shapes and captions (image-only
masked image modelling, text-only MLM with the attention and V expert frozen, then ITC + ITM + MLM on pairs), then
retrieval, balanced ITM accuracy and masked-prediction accuracy on held-out pairs.

``train_vlmo(VLMoDemoOptions())`` returns the metrics as a dict; ``python -m mome demo --model vlmo`` prints them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from mome.demo_beit3 import masked_scores
from mome.demo_metrics import itm_scores, print_retrieval, retrieval_scores
from mome.demo_training import check_counts, finish_recipe_demo, start_recipe_demo, warmup_cosine
from mome.models.config import vlmo_tiny
from mome.models.vlmo import STAGES, VLMo, start_stage, vlmo_tiny_recipe
from mome.shapes_data import CaptionBatch, ShapesCaptions


@dataclass
class VLMoDemoOptions:
    image_steps: int = 100  # stage 1: image-only masked image modelling
    text_steps: int = 100  # stage 2: text-only MLM, attention and V expert frozen
    pair_steps: int = 550  # stage 3: ITC + ITM + MLM on image-text pairs (ITM starts to separate after ~400)
    seed: int = 0
    device: str = "auto"  # auto: cuda when there is a GPU, else cpu
    batch_size: int = 48
    eval_size: int = 256
    lr: float = 2e-3
    image_size: int = 48  # 4 x 4 patches of 12 pixels, as the default demo
    patch_size: int = 12
    dim: int = 64
    depth: int = 2
    vl_layers: int = 1
    layer_scale: float | None = 0.1  # VLMo-Base's layer scale init (vlmo_tiny's)
    itm_weight: float = 2.0  # the default demo's: 48 binary labels a step carry far less signal than ITC's 48 x 48
    itm_pairs: int = 16
    mlm_pairs: int = 16
    mlm_prob: float = 0.25
    itm_random_share: float = 0.75  # hard negatives alone leave a from-scratch ITM at chance (see the default demo)
    itc_pool: str = "mean"  # the default demo's choice: a tiny model learns retrieval far faster from the mean
    jitter: float | None = 0.03
    out: str | None = None  # a folder to write metrics.json into
    quiet: bool = False


@dataclass
class VLMoHistory:
    mim: list[float] = field(default_factory=list)  # stage 1
    text_mlm: list[float] = field(default_factory=list)  # stage 2
    itc: list[float] = field(default_factory=list)  # stage 3
    itm: list[float] = field(default_factory=list)
    mlm: list[float] = field(default_factory=list)


def _model(options: VLMoDemoOptions, data: ShapesCaptions) -> VLMo:
    encoder = vlmo_tiny(dim=options.dim, depth=options.depth, vl_layers=options.vl_layers,
                        layer_scale_init=options.layer_scale,
                        image_size=options.image_size, patch_size=options.patch_size,
                        vocab_size=data.tokenizer.vocab_size, max_text_len=data.max_len)  # fmt: skip
    tokenizer = data.tokenizer
    config = vlmo_tiny_recipe(encoder=encoder, mask_id=tokenizer.mask_id, special_ids=tokenizer.special_ids,
                              mlm_prob=options.mlm_prob, itm_pairs=options.itm_pairs, mlm_pairs=options.mlm_pairs,
                              itm_random_share=options.itm_random_share, itm_class_balance=True,
                              itc_pool=options.itc_pool, itm_weight=options.itm_weight)  # fmt: skip
    return VLMo(config)


def train_stage(model: VLMo, stage: str, steps: int, data: ShapesCaptions, options: VLMoDemoOptions,
                device: torch.device, history: VLMoHistory, generator: torch.Generator) -> None:  # fmt: skip
    """``steps`` AdamW steps of one pre-training stage on fresh batches (the stage's own optimizer and schedule)."""
    if steps == 0:
        return
    optimizer = start_stage(model, stage, lr=options.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = data.train_batch(options.batch_size)
        losses = model.loss(stage, batch.images.to(device), batch.text_ids.to(device),
                            batch.padding_mask.to(device), positive_ids=batch.caption_ids.to(device),
                            generator=generator)  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        losses.loss.backward()
        optimizer.step()
        scheduler.step()
        if stage == "image":
            history.mim.append(losses.mim.detach().item())
        elif stage == "text":
            history.text_mlm.append(losses.mlm.detach().item())
        else:
            for name in ("itc", "itm", "mlm"):
                getattr(history, name).append(getattr(losses, name).detach().item())
        if not options.quiet and ((step + 1) % max(steps // 5, 1) == 0 or step + 1 == steps):
            rate = (step + 1) / (time.perf_counter() - start)
            print(f"vlmo {stage:<10} [{step + 1}/{steps}] loss {losses.loss.detach().item():.3f} {rate:.1f} it/s",
                  file=sys.stderr, flush=True)  # fmt: skip


@torch.no_grad()
def evaluate(model: VLMo, held_out: CaptionBatch, seed: int, device: torch.device) -> dict:
    """Retrieval R@1 / R@5 both ways, balanced ITM accuracy against random and ITC-hardest non-matches, and the
    accuracy of the masked predictions (fixed masks drawn from ``seed``) on held-out pairs."""
    model.eval()
    batch = CaptionBatch(held_out.images.to(device), held_out.text_ids.to(device), held_out.padding_mask.to(device),
                         held_out.caption_ids.to(device), held_out.captions, held_out.equivalent_captions,
                         held_out.canonical_text_ids.to(device))  # fmt: skip
    image_embed, text_embed = model.embed(batch.images, batch.text_ids, batch.padding_mask)
    similarity = image_embed @ text_embed.T
    size = similarity.shape[0]
    generator = torch.Generator().manual_seed(seed)
    mask = model.mask_patches(size, generator)
    masked_ids, labels = model.mask_text(batch.text_ids.cpu(), batch.padding_mask.cpu(), generator)
    masked_ids, labels = masked_ids.to(device), labels.to(device)
    return {
        "held_out_pairs": size,
        "retrieval": retrieval_scores(similarity),
        "itm": itm_scores(model, batch, similarity, torch.Generator().manual_seed(seed)) if size > 1 else None,
        "masked_patches": masked_scores(*model.mim_logits(batch.images, mask)),
        "masked_text": masked_scores(*model.mlm_logits(masked_ids, labels, batch.padding_mask)),
        "masked_text_fused": masked_scores(
            *model.mlm_logits(masked_ids, labels, batch.padding_mask, batch.images)
        ),  # fmt: skip
    }


def train_vlmo(options: VLMoDemoOptions | None = None) -> dict:
    """Pre-train a tiny VLMo stage by stage on ShapesCaptions; evaluate on ``eval_size`` held-out pairs."""
    options = VLMoDemoOptions() if options is None else options
    check_counts(options, 0, "image_steps", "text_steps", "pair_steps")
    check_counts(options, 1, "eval_size")
    start, device, data = start_recipe_demo(options)
    model = _model(options, data).to(device)
    history, generator = VLMoHistory(), torch.Generator().manual_seed(options.seed)
    steps = (options.image_steps, options.text_steps, options.pair_steps)
    for stage, count in zip(STAGES, steps, strict=True):
        train_stage(model, stage, count, data, options, device, history, generator)
    metrics = evaluate(model, data.held_out(options.eval_size), options.seed, device)
    return finish_recipe_demo(metrics, start, device, options, history)


def print_report(metrics: dict) -> None:
    print_retrieval(
        f"VLMo retrieval on {metrics['held_out_pairs']} held-out pairs (ITC, each modality encoded alone):",
        metrics["retrieval"],
    )
    itm = metrics["itm"]
    if itm is not None:
        print("\nimage-text matching (fused [CLS]), as many non-matches as matches:")
        print(f"  {'non-matches':<24}{'balanced accuracy':>19}{'matches':>9}{'non-matches':>13}")
        for kind, label in (("random_negatives", "random other scene"), ("hard_negatives", "hardest by ITC")):
            score = itm[kind]
            print(f"  {label:<24}{score['balanced_accuracy']:>19.1%}{score['match_accuracy']:>9.1%}"
                  f"{score['no_match_accuracy']:>13.1%}")  # fmt: skip
        print(f"  {'majority class':<24}{itm['majority_rate']:>19.1%}")
    print("\nmasked prediction on held-out pairs:")
    print(f"  {'input':<34}{'accuracy':>10}{'majority':>10}{'on the rest':>13}{'loss':>7}{'prior':>7}")
    for key, label in (("masked_patches", "image only: patch colour (stage 1)"), ("masked_text", "text only: word"),
                       ("masked_text_fused", "image-text: word")):  # fmt: skip
        score = metrics[key]
        print(f"  {label:<34}{score['accuracy']:>10.1%}{score['majority']:>10.1%}{score['others_accuracy']:>13.1%}"
              f"{score['loss']:>7.3f}{score['prior_loss']:>7.3f}")  # fmt: skip
    print(f"took {metrics['seconds']:.0f} s on {metrics['device']}")
