"""``python -m mome demo``: train a tiny VLMo-style model from scratch on generated shapes and captions.

Stage 1 trains the MoME encoder with VLMo's objectives: image-text contrastive (ITC), image-text
matching (ITM) on negatives half of which are the hard negatives that ``mome.ops.itc_loss`` samples
and half random other scenes, and masked language modelling (MLM) on fused image-text input. Stage 2
freezes the encoder and trains a caption decoder on its image tokens. Then it reports retrieval and
balanced ITM accuracy (against random and against the hardest non-matches) on held-out pairs next to
chance, caption exact-match and word accuracy with a few generated captions, and writes a JSON of the
metrics and a PNG plot. ``--model albef|vlmo|blip|coca|beit3`` trains one of the five systems' recipes instead
(``mome.demo_models``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mome.demo_metrics import caption_scores, itm_scores, other_scene, recall_at
from mome.demo_models import RECIPES, recipe_options, run_recipe
from mome.demo_training import Progress, adamw_warmup_cosine, on_device, pick_device
from mome.distributed import Ranks
from mome.models import MoMETransformer, vlmo_tiny
from mome.nn import ITCHead, ITMHead, MLMHead, itm_inputs, mask_tokens
from mome.nn.decoder import CaptionDecoder
from mome.shapes_data import CaptionBatch, ShapesCaptions


@dataclass
class DemoOptions:
    steps: int = 1200  # training steps in all: stage 1 takes `encoder_fraction`, captioning the rest
    seed: int = 0
    out: str = "mome-demo"
    device: str = "auto"
    batch_size: int = 48
    itm_pairs: int = 16  # ITM runs on this many positives, as many negative texts and negative images
    itm_random_negatives: float = 0.5  # share of ITM negatives drawn among other scenes, the rest ITC-hard
    itm_weight: float = 2.0  # of the ITM loss: 48 binary labels a step carry far less signal than ITC's 48 x 48
    eval_size: int = 256
    encoder_fraction: float = 0.6
    lr: float = 2e-3
    dim: int = 64
    depth: int = 2
    vl_layers: int = 1
    heads: int = 4
    image_size: int = 48  # 4 x 4 patches of 12 pixels: shape kinds stay legible at the cost of 32px's
    patch_size: int = 12
    mlm_prob: float = 0.25
    layer_scale: float | None = None
    caption_encoder_lr: float = 0.0  # stage 2 learning rate of the encoder relative to lr; 0 freezes it
    mlm_pairs: int = 16  # MLM runs on this many of the batch's pairs
    jitter: float | None = 0.03  # shape centres: anywhere (None) or on a 3 x 3 grid moved by up to this much
    decoder_image_positions: bool = True  # the decoder learns its own position embedding of the image tokens
    decoder_depth: int = 2
    pool: str = "mean"  # ITC features: "cls" (VLMo) or the mean of the unpadded tokens; ITM reads the fused [CLS]
    quiet: bool = False


@dataclass
class History:
    """Loss curves of both stages (one entry per step)."""

    itc: list[float] = field(default_factory=list)
    itm: list[float] = field(default_factory=list)
    mlm: list[float] = field(default_factory=list)
    caption: list[float] = field(default_factory=list)


class Pretrainer(nn.Module):
    """The encoder and its three stage-1 heads."""

    def __init__(self, options: DemoOptions, vocab_size: int, max_len: int) -> None:
        super().__init__()
        config = vlmo_tiny(
            dim=options.dim,
            depth=options.depth,
            heads=options.heads,
            vl_layers=options.vl_layers,
            layer_scale_init=options.layer_scale,
            vocab_size=vocab_size,
            max_text_len=max_len,
            image_size=options.image_size,
            patch_size=options.patch_size,
            # absolute positions, not VLMo's relative bias: on CPU a bias that needs a gradient runs on the
            # reference backend (torch's CPU kernel gives it none), slower than the native one the demo runs on
            relative_position=None,
            absolute_position=True,
        )
        self.encoder = MoMETransformer(config)
        self.itc = ITCHead(options.dim, options.dim, init_temperature=0.1)
        self.itm = ITMHead(options.dim)
        self.mlm = MLMHead(options.dim, vocab_size)
        self.pool = options.pool

    def pooled(self, output, padding: Tensor | None, which: str) -> Tensor:
        """The ITC feature of ``which`` ("image" or "text"): its [CLS] state, or the mean of its unpadded tokens.

        The mean gives every sample a distinct feature from the first step; a tiny model trained for
        a few hundred steps learns far faster from it than from a [CLS] token that starts out equal for all.
        """
        if self.pool == "cls":
            return output.image_cls if which == "image" else output.text_cls
        if padding is None:
            return output.hidden.mean(1)
        keep = (~padding).unsqueeze(-1).to(output.hidden.dtype)  # [B, N, 1]
        return (output.hidden * keep).sum(1) / keep.sum(1)

    @staticmethod
    def _itm_subset(pairs, group_sizes: list[int], count: int):
        """The first ``count`` rows of each group of ``itm_inputs`` (positives, negative texts, negative images)."""
        rows, start = [], 0
        for size in group_sizes:
            rows.append(torch.arange(start, start + min(size, count)))
            start += size
        rows = torch.cat(rows).to(pairs[0].device)
        return [None if t is None else t[rows] for t in pairs]

    def text_states(self, hidden: Tensor, text_len: int) -> Tensor:
        """The text positions of an ``encode_pair`` output (VLMo puts the text first)."""
        return hidden[:, :text_len] if self.encoder.config.layout == "vlmo" else hidden[:, -text_len:]

    def itm_loss(self, batch: CaptionBatch, neg_text_idx: Tensor, neg_image_idx: Tensor, count: int) -> Tensor:
        """ITM cross-entropy on ``count`` positives, ``count`` negative texts and ``count`` negative images, the two
        classes weighted to count equally."""
        pairs = itm_inputs(batch.images, batch.text_ids, batch.padding_mask, neg_text_idx, neg_image_idx)
        groups = [batch.images.shape[0], int((neg_text_idx >= 0).sum()), int((neg_image_idx >= 0).sum())]
        pair_images, pair_ids, pair_padding, labels = self._itm_subset(pairs, groups, count)
        fused = self.encoder.encode_pair(pair_images, pair_ids, pair_padding)
        # one match per two non-matches: unweighted, the head learns odds of 1:2 and says "no match" to most of
        # the matches of the balanced test; weighted, it learns even odds
        matches = labels.float().mean().clamp(1e-6, 1 - 1e-6)
        weight = torch.stack([0.5 / (1 - matches), 0.5 / matches]).to(fused.hidden.dtype)
        return F.cross_entropy(self.itm(self.encoder.fused_cls(fused)), labels, weight=weight)

    @staticmethod
    def itm_negatives(batch: CaptionBatch, itc, random_share: float, generator) -> tuple[Tensor, Tensor]:
        """ITM's negative text per image and negative image per text: ALBEF's hard negatives (drawn by ITC
        similarity), each replaced with probability ``random_share`` by a pair of another scene drawn uniformly.

        On hard negatives alone a fused encoder trained from scratch stays at the majority class for the whole
        run: they share nearly every word with the positive, and an encoder that cannot yet compare image and text
        finds no difference to start learning from. Random non-matches differ coarsely; with them mixed in, it
        learns. Ids tell scenes apart, so a caption and its mirror are never each other's negatives.
        """
        if random_share == 0:  # ALBEF's negatives only, and no draw from the generator
            return itc.neg_text_idx, itc.neg_image_idx
        picked = []
        for hard in (itc.neg_text_idx, itc.neg_image_idx):
            drawn = other_scene(batch.caption_ids, generator)
            swap = (torch.rand(hard.shape, generator=generator) < random_share).to(hard.device) & (drawn >= 0)
            picked.append(torch.where(swap, drawn, hard))
        return picked[0], picked[1]

    def losses(self, batch: CaptionBatch, data: ShapesCaptions, options: DemoOptions, generator) -> dict[str, Tensor]:
        images, text_ids, padding = batch.images, batch.text_ids, batch.padding_mask
        image_embed, text_embed = self.itc(
            self.pooled(self.encoder.encode_image(images), None, "image"),
            self.pooled(self.encoder.encode_text(text_ids, padding), padding, "text"),
        )
        # pairs that equivalent captions describe are positives of each other, never each other's hard negatives
        itc = self.itc.loss(
            image_embed, text_embed, positive_ids=batch.caption_ids, hard_negatives="sample", generator=generator
        )
        neg_text, neg_image = self.itm_negatives(batch, itc, options.itm_random_negatives, generator)
        itm = self.itm_loss(batch, neg_text, neg_image, options.itm_pairs)
        tokenizer = data.tokenizer
        masked_ids, mlm_labels = mask_tokens(
            text_ids,
            padding,
            tokenizer.mask_id,
            tokenizer.vocab_size,
            prob=options.mlm_prob,
            generator=generator,
            special_ids=tokenizer.special_ids,
        )
        few = slice(0, options.mlm_pairs)
        hidden = self.encoder.encode_pair(images[few], masked_ids[few], padding[few]).hidden
        mlm = self.mlm.loss(self.text_states(hidden, text_ids.shape[1]), mlm_labels[few])
        return {"itc": itc.loss, "itm": itm, "mlm": mlm}


def train_encoder(model, data, options, steps, device, history, generator) -> None:
    optimizer, scheduler = adamw_warmup_cosine(model.parameters(), options.lr, steps)
    progress = Progress(steps, "stage 1/2 ITC+ITM+MLM", options.quiet)
    model.train()
    for step in range(steps):
        losses = model.losses(on_device(data.train_batch(options.batch_size), device), data, options, generator)
        loss = losses["itc"] + options.itm_weight * losses["itm"] + losses["mlm"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        for name, value in losses.items():
            getattr(history, name).append(value.detach().item())
        progress.update(step + 1, f"loss {loss.detach().item():.3f}")


def train_decoder(model, decoder, data, options, steps, device, history) -> None:
    params = [{"params": decoder.parameters()}]
    if options.caption_encoder_lr > 0:  # the image expert keeps learning, slower, from the caption loss (BLIP)
        params.append({"params": model.encoder.parameters(), "lr": options.lr * options.caption_encoder_lr})
    optimizer, scheduler = adamw_warmup_cosine(params, options.lr, steps)
    progress = Progress(steps, "stage 2/2 captioning  ", options.quiet)
    model.train(options.caption_encoder_lr > 0)
    decoder.train()
    for step in range(steps):
        batch = on_device(data.train_batch(options.batch_size), device)
        with torch.set_grad_enabled(options.caption_encoder_lr > 0):
            image_tokens = model.encoder.encode_image(batch.images).hidden
        # one caption per picture: with both a caption and its mirror as targets, greedy decoding mixes the two
        loss = decoder.loss(batch.canonical_text_ids, image_tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        history.caption.append(loss.detach().item())
        progress.update(step + 1, f"loss {loss.detach().item():.3f}")


@torch.no_grad()
def evaluate(model, decoder, held_out: CaptionBatch, data, options, device) -> dict:
    model.eval()
    decoder.eval()
    batch = on_device(held_out, device)
    image_embed, text_embed = model.itc(
        model.pooled(model.encoder.encode_image(batch.images), None, "image"),
        model.pooled(model.encoder.encode_text(batch.text_ids, batch.padding_mask), batch.padding_mask, "text"),
    )
    similarity = image_embed @ text_embed.T  # [N images, N texts]
    size = similarity.shape[0]
    retrieval = {
        "image_to_text": {"R@1": recall_at(similarity, 1), "R@5": recall_at(similarity, 5)},
        "text_to_image": {"R@1": recall_at(similarity.T, 1), "R@5": recall_at(similarity.T, 5)},
        "chance": {"R@1": 1 / size, "R@5": min(5, size) / size},
    }
    tokenizer = data.tokenizer
    image_tokens = model.encoder.encode_image(batch.images).hidden
    ids = decoder.generate(image_tokens, data.max_len - 1, tokenizer.bos_id, tokenizer.eos_id)
    generated = tokenizer.decode(ids.cpu())
    exact, word_accuracy = caption_scores(generated, held_out.equivalent_captions)
    return {
        "held_out_pairs": size,
        "retrieval": retrieval,
        "itm": itm_scores(model, batch, similarity, torch.Generator().manual_seed(options.seed)) if size > 1 else None,
        "caption_exact_match": exact,
        "caption_word_accuracy": word_accuracy,
        "examples": [
            {"truth": truth, "generated": caption, "right": caption in truths}
            for truth, caption, truths in zip(held_out.captions, generated, held_out.equivalent_captions, strict=True)
        ][:6],
    }


def write_plot(history: History, metrics: dict, path: Path) -> str | None:
    """A PNG of the loss curves and the retrieval bars; returns why it was skipped, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return f"matplotlib is not installed ({error}); pip install matplotlib to get the plot"
    fig, (losses, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("itc", "itm", "mlm", "caption"):
        start = 0 if name != "caption" else len(history.itm)
        kept = [(start + step, value) for step, value in enumerate(getattr(history, name)) if value is not None]
        if not kept:
            continue
        steps, values = [step for step, _ in kept], [value for _, value in kept]
        window = max(len(values) // 30, 1)
        smooth = torch.tensor(values).unfold(0, window, 1).mean(1).tolist()
        losses.plot(steps[window - 1 :], smooth, label=name)
    losses.set(xlabel="step", ylabel="loss (running mean)", title="training losses", yscale="log")
    losses.legend()
    retrieval = metrics["retrieval"]
    labels = ["i→t R@1", "i→t R@5", "t→i R@1", "t→i R@5"]
    values = [retrieval[d][k] for d in ("image_to_text", "text_to_image") for k in ("R@1", "R@5")]
    chance = [retrieval["chance"][k] for _ in range(2) for k in ("R@1", "R@5")]
    positions = range(len(labels))
    bars.bar([p - 0.2 for p in positions], values, width=0.4, label="model")
    bars.bar([p + 0.2 for p in positions], chance, width=0.4, label="chance")
    bars.set_xticks(list(positions), labels)
    bars.set(ylim=(0, 1), title=f"retrieval on {metrics['held_out_pairs']} held-out pairs")
    bars.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def run_demo(options: DemoOptions, ranks: Ranks | None = None) -> dict | None:
    """Train both stages, evaluate, write ``metrics.json`` and ``demo.png`` under ``options.out``.

    With ``ranks`` (this process's place in a torchrun group, :func:`mome.distributed.init_from_torchrun`) each
    rank trains on its share of every batch under DDP (``mome.demo_distributed``); rank 0 alone evaluates,
    writes the files and returns the metrics, the other ranks return None.
    """
    if options.steps < 2:
        raise ValueError(f"steps must be at least 2 (one per stage), got {options.steps}")
    start = time.perf_counter()
    if ranks is not None:
        from mome import demo_distributed

        demo_distributed.check_options(options, ranks)
    device = pick_device(options.device) if ranks is None else ranks.device
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    data = ShapesCaptions(options.seed, options.image_size, jitter=options.jitter)
    tokenizer = data.tokenizer
    model = Pretrainer(options, tokenizer.vocab_size, data.max_len).to(device)
    decoder = CaptionDecoder(
        tokenizer.vocab_size,
        options.dim,
        depth=options.decoder_depth,
        heads=options.heads,
        max_len=data.max_len,
        pad_id=tokenizer.pad_id,
        label_smoothing=0.1,
        image_tokens=model.encoder.config.num_patches + 1 if options.decoder_image_positions else None,
    ).to(device)
    encoder_steps = min(max(round(options.steps * options.encoder_fraction), 1), options.steps - 1)
    history = History()
    if ranks is None:
        train_encoder(model, data, options, encoder_steps, device, history, generator)
        train_decoder(model, decoder, data, options, options.steps - encoder_steps, device, history)
    else:
        demo_distributed.train_encoder(model, data, options, encoder_steps, ranks, history, generator)
        demo_distributed.train_decoder(model, decoder, data, options, options.steps - encoder_steps, ranks, history)
        if not ranks.is_main:
            return None
    metrics = evaluate(model, decoder, data.held_out(options.eval_size), data, options, device)
    metrics.update(
        seconds=time.perf_counter() - start,
        device=str(device),
        options=asdict(options),
        history=asdict(history),
    )
    if ranks is not None:
        metrics["distributed"] = {"world_size": ranks.world_size, "wrapper": "DistributedDataParallel"}
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_path = out / "demo.png"
    skipped = write_plot(history, metrics, plot_path)
    metrics["plot"] = None if skipped else str(plot_path)
    metrics["plot_skipped"] = skipped
    return metrics


def print_report(metrics: dict, out: Path) -> None:
    retrieval = metrics["retrieval"]
    chance = retrieval["chance"]
    print(f"\nretrieval on {metrics['held_out_pairs']} held-out image-caption pairs (ITC similarity):")
    print(f"  {'':<14}{'R@1':>8}{'R@5':>8}")
    for name, label in (("image_to_text", "image → text"), ("text_to_image", "text → image")):
        print(f"  {label:<14}{retrieval[name]['R@1']:>8.1%}{retrieval[name]['R@5']:>8.1%}")
    print(f"  {'chance':<14}{chance['R@1']:>8.1%}{chance['R@5']:>8.1%}")
    itm = metrics["itm"]
    if itm is not None:
        pairs = itm["random_negatives"]["pairs"] // 2
        print(
            f"\nimage-text matching (fused [CLS]) on {pairs} held-out pairs and as many non-matches, "
            "half a wrong text, half a wrong image:"
        )
        print(f"  {'non-matches':<24}{'balanced accuracy':>19}{'matches':>9}{'non-matches':>13}{'loss':>8}")
        for kind, label in (("random_negatives", "random other scene"), ("hard_negatives", "hardest by ITC (ALBEF)")):
            score = itm[kind]
            print(
                f"  {label:<24}{score['balanced_accuracy']:>19.1%}{score['match_accuracy']:>9.1%}"
                f"{score['no_match_accuracy']:>13.1%}{score['loss']:>8.3f}"
            )
        print(f"  {'majority class':<24}{itm['majority_rate']:>19.1%}{'':>22}{itm['chance_loss']:>8.3f}")
    print(
        f"\ncaptions (greedy, KV cache) on held-out images: {metrics['caption_exact_match']:.1%} exactly right, "
        f"{metrics['caption_word_accuracy']:.1%} of the words right in place (a caption or its mirror counts)"
    )
    for example in metrics["examples"]:
        mark = "=" if example["right"] else "≠"
        print(f"  truth: {example['truth']:<48} {mark} generated: {example['generated']}")
    print(f"\nmetrics: {out / 'metrics.json'}")
    if metrics["plot"]:
        print(f"plot:    {metrics['plot']}")
    else:
        print(f"plot skipped: {metrics['plot_skipped']}")
    print(f"took {metrics['seconds']:.0f} s on {metrics['device']}")


def parse_args(argv: list[str] | None) -> DemoOptions:
    return _parse(argv)[0]


def _parse(argv: list[str] | None) -> tuple[DemoOptions, bool, tuple[str, object] | None]:
    """The options, whether ``--distributed`` was given, and ``(model, its recipe's options)`` for ``--model``
    (None: the default demo)."""
    defaults = DemoOptions()
    parser = argparse.ArgumentParser(
        prog="python -m mome demo",
        description="Train a tiny VLMo-style MoME model from scratch on generated shapes and captions, then report "
        "retrieval on held-out pairs and generated captions.",
    )
    parser.add_argument(
        "--model",
        choices=sorted(RECIPES),
        default=None,
        help="train one of the five systems' recipes (mome/models/<model>.py) instead of the default demo, and report "
        "the metrics that system is known for",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help=f"training steps, all stages together (default {defaults.steps}, or "
        "the --model recipe's own)"
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seeds the data, the model and sampling")
    parser.add_argument("--out", default=defaults.out, help="folder for metrics.json and demo.png")
    parser.add_argument("--device", default=defaults.device, help="auto | cpu | cuda (cuda runs the GPU kernels)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--eval-size", type=int, default=defaults.eval_size, help="held-out pairs for retrieval")
    parser.add_argument(
        "--itm-random-negatives",
        type=float,
        default=defaults.itm_random_negatives,
        help="share of ITM negatives drawn among other scenes instead of ITC's hard ones (0: ALBEF's only)",
    )
    parser.add_argument("--itm-weight", type=float, default=defaults.itm_weight, help="weight of the ITM loss")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="one rank of a torchrun group (torchrun --nproc-per-node 2 -m mome demo --distributed): DDP over "
        "gloo on CPU, NCCL on GPU; each rank trains on its share of every batch, rank 0 reports",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (default 1: the ops are tiny, more threads mostly wait)"
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if not 0.0 <= args.itm_random_negatives <= 1.0:
        parser.error(f"--itm-random-negatives must lie in [0, 1], got {args.itm_random_negatives}")
    if args.itm_weight < 0:
        parser.error(f"--itm-weight must be >= 0, got {args.itm_weight}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.model is not None and args.distributed:
        parser.error("--distributed runs the default demo; --model recipes run in one process")
    torch.set_num_threads(args.threads)
    recipe = None
    if args.model is not None:
        recipe = recipe_options(args.model, steps=args.steps, seed=args.seed, device=args.device,
                                eval_size=args.eval_size, out=args.out, quiet=args.quiet)  # fmt: skip
    options = DemoOptions(
        steps=defaults.steps if args.steps is None else args.steps,
        seed=args.seed,
        out=args.out,
        device=args.device,
        batch_size=args.batch_size,
        eval_size=args.eval_size,
        itm_random_negatives=args.itm_random_negatives,
        itm_weight=args.itm_weight,
        quiet=args.quiet,
    )
    return options, args.distributed, None if recipe is None else (args.model, recipe)


def main(argv: list[str] | None = None) -> int:
    options, distributed, recipe = _parse(argv)
    if recipe is not None:
        run_recipe(*recipe)
        return 0
    if distributed:
        return _main_distributed(options)
    print(
        f"mome demo: a {options.depth}-layer VLMo-style MoME (dim {options.dim}) learns {options.image_size}px "
        f"shapes and their captions from scratch, {options.steps} steps, seed {options.seed}",
        flush=True,
    )
    metrics = run_demo(options)
    print_report(metrics, Path(options.out))
    return 0


def _main_distributed(options: DemoOptions) -> int:
    """``main`` on one rank of a torchrun group: rank 0 prints and writes, every rank leaves the group."""
    from mome.demo_distributed import check_options
    from mome.distributed import init_from_torchrun, teardown

    try:
        ranks = init_from_torchrun(options.device)
    except (RuntimeError, ValueError) as error:
        raise SystemExit(f"mome demo --distributed: {error}") from None
    try:
        try:
            check_options(options, ranks)
        except ValueError as error:
            raise SystemExit(f"mome demo --distributed: {error}") from None
        if ranks.is_main:
            print(
                f"mome demo on {ranks.world_size} ranks ({ranks.device.type}, DDP): a {options.depth}-layer "
                f"VLMo-style MoME (dim {options.dim}) learns {options.image_size}px shapes and their captions from "
                f"scratch, {options.steps} steps of {options.batch_size} pairs "
                f"({options.batch_size // ranks.world_size} per rank), seed {options.seed}",
                flush=True,
            )
        metrics = run_demo(options, ranks)
        if metrics is not None:
            print_report(metrics, Path(options.out))
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
