"""The demo's BLIP run: train ``blip_tiny`` from scratch on generated shapes and captions with BLIP's three losses (ITC,
ITM on hard negatives, LM), then report retrieval, balanced ITM accuracy and greedy KV-cached captions on held-out
pairs, and CapFilt (``mome.models.blip.bootstrap``) on held-out pairs half of whose captions were shuffled.

``train_blip(BLIPDemoOptions())`` returns the metrics as a dict; ``python -m mome demo --model blip`` prints them.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mome.demo_metrics import (
    _binary_scores,
    caption_scores,
    itm_eval_pairs,
    other_scene,
    print_retrieval,
    retrieval_scores,
)
from mome.demo_training import check_counts, finish_recipe_demo, start_recipe_demo, warmup_cosine
from mome.models.blip import BLIP, blip_tiny, bootstrap
from mome.nn.heads import itm_inputs
from mome.shapes_data import CaptionBatch, ShapesCaptions


@dataclass
class BLIPDemoOptions:
    steps: int = 600  # ~70 s of CPU time on one core of the 2-core machine (125 s wall with the cores shared)
    seed: int = 0
    device: str = "auto"  # auto: cuda when there is a GPU, else cpu
    batch_size: int = 48
    eval_size: int = 256
    lr: float = 1e-3
    image_size: int = 48  # 4 x 4 patches of 12 pixels, as the VLMo demo
    patch_size: int = 12
    dim: int = 64
    vision_depth: int = 2
    text_depth: int = 2
    itm_pairs: int = 16  # ITM runs on this many positives, as many negative texts and as many negative images
    itm_random_negatives: float = 0.5  # share of ITM negatives drawn among other scenes, the rest ITC-hard
    label_smoothing: float = 0.0
    itc_pool: str = "mean"  # "cls" is BLIP's; see BLIPConfig.itc_pool
    jitter: float | None = 0.03  # shape centres on a 3 x 3 grid moved by up to this much (see ShapesCaptions)
    capfilt_pairs: int = 64  # held-out pairs CapFilt bootstraps, half with a shuffled caption
    out: str | None = None  # a folder to write metrics.json into, as the VLMo demo does
    quiet: bool = False


@dataclass
class BLIPHistory:
    itc: list[float] = field(default_factory=list)
    itm: list[float] = field(default_factory=list)
    lm: list[float] = field(default_factory=list)


def _model(options: BLIPDemoOptions, data: ShapesCaptions) -> BLIP:
    config = blip_tiny(
        image_size=options.image_size,
        patch_size=options.patch_size,
        vision_dim=options.dim,
        text_dim=options.dim,
        embed_dim=options.dim,
        vision_depth=options.vision_depth,
        text_depth=options.text_depth,
        label_smoothing=options.label_smoothing,
        vocab_size=data.tokenizer.vocab_size,
        max_text_len=data.max_len,
        pad_id=data.tokenizer.pad_id,
        itc_pool=options.itc_pool,
        itm_class_balance=True,  # one match per two non-matches: unweighted, the head learns odds of 1:2
    )
    return BLIP(config)


def _itm_negatives(caption_ids: Tensor, itc, random_share: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """BLIP's ITC-sampled hard negatives, each swapped with probability ``random_share`` for a pair of another
    scene: from scratch, a tiny fused encoder finds no difference to learn from in hard negatives alone (the
    VLMo demo's finding); random non-matches differ coarsely and get it started."""
    picked = []
    for hard in (itc.neg_text_idx, itc.neg_image_idx):
        drawn = other_scene(caption_ids, generator)
        swap = (torch.rand(hard.shape, generator=generator) < random_share).to(hard.device) & (drawn >= 0)
        picked.append(torch.where(swap, drawn, hard))
    return picked[0], picked[1]


def _losses(model: BLIP, batch: CaptionBatch, options: BLIPDemoOptions, generator, device) -> dict[str, Tensor]:
    """``BLIP.loss``'s three losses with what the VLMo demo found a model trained from scratch in minutes needs:
    ITM on a subset of the pairs (``itm_pairs`` of each group) with random negatives mixed in (and, in the config,
    mean-pooled ITC features and class-balanced ITM)."""
    images, caption_ids = batch.images.to(device), batch.caption_ids.to(device)
    # one caption per picture (the scene told left to right / top to bottom), as the CoCa demo
    text_ids = batch.canonical_text_ids.to(device)
    padding = text_ids == model.config.pad_id
    image_tokens = model.image_tokens(images)
    text = model.text_states(text_ids, padding)
    itc = model.itc_output(image_tokens, text, caption_ids, generator, text_padding_mask=padding)
    neg_text, neg_image = _itm_negatives(caption_ids, itc, options.itm_random_negatives, generator)
    count = options.itm_pairs
    few_text, few_image = neg_text.clone(), neg_image.clone()
    few_text[count:], few_image[count:] = -1, -1  # rows past `count` get no negative pair
    pair_tokens, pair_ids, pair_padding, labels = itm_inputs(image_tokens, text_ids, padding, few_text, few_image)
    rows = torch.arange(pair_tokens.shape[0], device=device)
    keep = (rows < count) | (rows >= images.shape[0])  # the first `count` positives and every negative left
    itm = model.itm_loss(pair_tokens[keep], pair_ids[keep], pair_padding[keep], labels[keep])
    lm = model.text_decoder.loss(text_ids, image_tokens)
    return {"itc": itc.loss, "itm": itm, "lm": lm}


def train(model: BLIP, data: ShapesCaptions, options: BLIPDemoOptions, device: torch.device) -> BLIPHistory:
    """``options.steps`` AdamW steps of ITC + ITM + LM on fresh batches."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(options.steps))
    generator = torch.Generator().manual_seed(options.seed)
    history = BLIPHistory()
    model.train()
    start = time.perf_counter()
    for step in range(options.steps):
        losses = _losses(model, data.train_batch(options.batch_size), options, generator, device)
        c = model.config
        loss = c.itc_weight * losses["itc"] + c.itm_weight * losses["itm"] + c.lm_weight * losses["lm"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        for name, value in losses.items():
            getattr(history, name).append(value.detach().item())
        if not options.quiet and ((step + 1) % max(options.steps // 10, 1) == 0 or step + 1 == options.steps):
            rate = (step + 1) / (time.perf_counter() - start)
            print(f"blip [{step + 1}/{options.steps}] itc {history.itc[-1]:.3f} itm {history.itm[-1]:.3f} "
                  f"lm {history.lm[-1]:.3f} {rate:.1f} it/s", file=sys.stderr, flush=True)  # fmt: skip
    return history


def _match_logits(model: BLIP, image_tokens: Tensor, text_ids: Tensor, image_rows: Tensor, text_rows: Tensor,
                  chunk: int = 128) -> Tensor:  # fmt: skip
    padding = text_ids == model.config.pad_id
    logits = []
    for start in range(0, image_rows.shape[0], chunk):
        images, texts = image_rows[start : start + chunk], text_rows[start : start + chunk]
        logits.append(model.match_logits(image_tokens[images], text_ids[texts], padding[texts]))
    return torch.cat(logits)  # [pairs, 2]


def _itm_scores(model: BLIP, image_tokens: Tensor, text_ids: Tensor, caption_ids: Tensor, similarity: Tensor,
                generator: torch.Generator) -> dict:  # fmt: skip
    """The VLMo demo's balanced ITM test (``mome.demo_metrics.itm_eval_pairs``) on BLIP's [ENC] head."""
    rows = torch.arange(similarity.shape[0], device=similarity.device)
    matches = _match_logits(model, image_tokens, text_ids, rows, rows)
    scores = {"majority_rate": 0.5, "chance_loss": math.log(2)}
    for kind, (image_rows, text_rows) in itm_eval_pairs(caption_ids, similarity, generator).items():
        keep = (image_rows >= 0) & (text_rows >= 0)
        no_matches = _match_logits(model, image_tokens, text_ids, image_rows[keep], text_rows[keep])
        scores[f"{kind}_negatives"] = _binary_scores(matches[keep], no_matches)
    return scores


def _capfilt(model: BLIP, held_out: CaptionBatch, data: ShapesCaptions, size: int, seed: int, device) -> dict:
    """CapFilt on ``size`` held-out pairs, every odd one with the caption of the next pair (another scene): the rate
    each kind of caption is kept at, and how many synthetic captions are exactly right."""
    images, text_ids = held_out.images[:size], held_out.canonical_text_ids[:size]
    size = images.shape[0]
    shuffled = torch.arange(size) % 2 == 1
    texts = torch.where(shuffled[:, None], text_ids.roll(-1, dims=0), text_ids)
    pairs = [(images[i].to(device), texts[i].to(device)) for i in range(size)]
    tokenizer = data.tokenizer
    generator = torch.Generator(device).manual_seed(seed)
    kept = bootstrap(model, model, pairs, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, generator=generator)
    index = {id(image): row for row, (image, _) in enumerate(pairs)}
    kept_original = torch.zeros(size, dtype=torch.bool)
    synthetic_rows, synthetic_ids = [], []
    for pair in kept:
        row = index[id(pair.image)]
        if pair.synthetic:
            synthetic_rows.append(row)
            synthetic_ids.append(pair.text_ids.cpu())
        else:
            kept_original[row] = True
    captions = tokenizer.decode(torch.nn.utils.rnn.pad_sequence(synthetic_ids, batch_first=True)) if kept else []
    right = [captions[i] in held_out.equivalent_captions[row] for i, row in enumerate(synthetic_rows)]
    return {
        "pairs": size,
        "kept_matching_originals": float(kept_original[~shuffled].float().mean()),
        "kept_shuffled_originals": float(kept_original[shuffled].float().mean()) if shuffled.any() else None,
        "kept_synthetic": len(synthetic_rows) / size,
        "kept_synthetic_exactly_right": sum(right) / max(len(right), 1),
        "kept_pairs": len(kept),
    }


@torch.no_grad()
def evaluate(model: BLIP, held_out: CaptionBatch, data: ShapesCaptions, options: BLIPDemoOptions, device) -> dict:
    """Retrieval R@1 / R@5 both ways, balanced ITM accuracy against hard and random non-matches, greedy KV-cached
    captions (exact match, words in place; a caption or its mirror counts) and CapFilt, on held-out pairs."""
    model.eval()
    tokenizer = data.tokenizer
    images = held_out.images.to(device)
    text_ids = held_out.canonical_text_ids.to(device)
    image_tokens = model.image_tokens(images)
    similarity = model.image_embedding(image_tokens) @ model.encode_text(text_ids, text_ids == tokenizer.pad_id).T
    size = similarity.shape[0]
    caption_ids = held_out.caption_ids.to(device)
    generator = torch.Generator().manual_seed(options.seed)
    itm = _itm_scores(model, image_tokens, text_ids, caption_ids, similarity, generator)
    ids = model.generate(images, data.max_len - 1, tokenizer.bos_id, tokenizer.eos_id)
    generated = tokenizer.decode(ids.cpu())
    exact, word_accuracy = caption_scores(generated, held_out.equivalent_captions)
    return {
        "held_out_pairs": size,
        "retrieval": retrieval_scores(similarity),
        "itm": itm if size > 1 else None,
        "caption_exact_match": exact,
        "caption_word_accuracy": word_accuracy,
        "capfilt": _capfilt(model, held_out, data, options.capfilt_pairs, options.seed, device),
        "examples": [
            {"truth": truth, "generated": caption, "right": caption in truths}
            for truth, caption, truths in zip(held_out.captions, generated, held_out.equivalent_captions, strict=True)
        ][:6],
    }


def train_blip(options: BLIPDemoOptions | None = None) -> dict:
    """Train ``blip_tiny`` on ShapesCaptions for ``options.steps`` steps; evaluate on ``eval_size`` held-out pairs."""
    options = BLIPDemoOptions() if options is None else options
    check_counts(options, 1, "steps", "eval_size", "itm_pairs", "capfilt_pairs")
    if not 0.0 <= options.itm_random_negatives <= 1.0:
        raise ValueError(f"itm_random_negatives must lie in [0, 1], got {options.itm_random_negatives!r}")
    start, device, data = start_recipe_demo(options)
    model = _model(options, data).to(device)
    history = train(model, data, options, device)
    metrics = evaluate(model, data.held_out(options.eval_size), data, options, device)
    return finish_recipe_demo(metrics, start, device, options, history)


def print_report(metrics: dict) -> None:
    print_retrieval(
        f"BLIP retrieval on {metrics['held_out_pairs']} held-out pairs (ITC embeddings):", metrics["retrieval"]
    )
    if metrics["itm"] is not None:
        print("\nITM ([ENC] head), balanced accuracy (majority class 50%):")
        for kind in ("random", "hard"):
            scores = metrics["itm"][f"{kind}_negatives"]
            print(f"  vs {kind + ' non-matches':<22}{scores['balanced_accuracy']:>7.1%}  (loss {scores['loss']:.3f}, "
                  f"chance {metrics['itm']['chance_loss']:.3f})")  # fmt: skip
    print(f"\ncaptions (greedy, KV cache): {metrics['caption_exact_match']:.1%} exactly right, "
          f"{metrics['caption_word_accuracy']:.1%} of the words right in place")  # fmt: skip
    for example in metrics["examples"]:
        mark = "=" if example["right"] else "≠"
        print(f"  truth: {example['truth']:<48} {mark} generated: {example['generated']}")
    capfilt = metrics["capfilt"]
    print(f"\nCapFilt on {capfilt['pairs']} held-out pairs, half with a shuffled caption (nucleus-sampled captions):")
    print(f"  kept {capfilt['kept_matching_originals']:.1%} of the matching captions, "
          f"{capfilt['kept_shuffled_originals']:.1%} of the shuffled ones; "
          f"kept a synthetic caption for {capfilt['kept_synthetic']:.1%} of the images, "
          f"{capfilt['kept_synthetic_exactly_right']:.1%} of them exactly right")  # fmt: skip
    print(f"took {metrics['seconds']:.0f} s on {metrics['device']}")
