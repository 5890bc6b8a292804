"""The demo's two training stages on one rank of a torchrun group (``python -m mome demo --distributed``).

Every rank draws the same global batch from the data stream (the same seed as one process) and keeps its
``B / world`` rows. What must equal one process on the global batch, and how:

- ITC: this rank's rows against every rank's features, gathered with gradient (global negatives); the
  hard negatives are drawn with one seed keyed by global row (``mome.ops.itc.itc_loss_rows``).
- The random streams (ITC's seed, ITM's random negatives, MLM masking) are the global batch's: every rank's
  generator starts alike and draws for the whole batch, so they stay alike; each rank then uses its part.
- ITM and MLM score the same pairs one process would (the first ``itm_pairs`` / ``mlm_pairs`` of the global
  batch, whose raw inputs the ranks gather, as VLMo does), split among the ranks.
- DDP averages the gradients over the ranks, so each rank's loss is its share of the global mean: its sum
  over its pairs divided by the global count (or weight), times the world size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from mome.demo_training import Progress, adamw_warmup_cosine, on_device
from mome.distributed import Ranks, gather_rows, mean_over_ranks, sum_over_ranks
from mome.nn import itm_inputs, mask_tokens
from mome.nn.heads import IGNORE_INDEX
from mome.nn.itc import gather_with_grad
from mome.ops.itc import ITCOptions, itc_loss_rows, sample_seed
from mome.shapes_data import CaptionBatch

STAGE1_LOSSES = ("itc", "itm", "mlm")


class HardNegatives(NamedTuple):
    """ITC's picks for the whole batch, indices into it (what ``Pretrainer.itm_negatives`` reads)."""

    neg_text_idx: Tensor
    neg_image_idx: Tensor


def share_of(batch: CaptionBatch, rows: slice) -> CaptionBatch:
    """The rows ``rows`` of a batch: one rank's part of the global batch."""
    return CaptionBatch(
        batch.images[rows],
        batch.text_ids[rows],
        batch.padding_mask[rows],
        batch.caption_ids[rows],
        batch.captions[rows],
        batch.equivalent_captions[rows],
        batch.canonical_text_ids[rows],
    )


def check_options(options, ranks: Ranks) -> None:
    """A ValueError naming the option that does not split over the ranks."""
    ranks.equal_share(options.batch_size, "--batch-size")
    for name in ("itm_pairs", "mlm_pairs"):
        if getattr(options, name) < ranks.world_size:
            raise ValueError(
                f"{name} must be at least the number of ranks ({ranks.world_size}): every rank scores a part of "
                f"them, got {getattr(options, name)}"
            )


class Stage1Step(nn.Module):
    """This rank's stage-1 losses as a ``forward``, so that DDP (or FSDP2) sees the call it wraps."""

    def __init__(self, model: nn.Module, ranks: Ranks) -> None:
        super().__init__()
        self.model, self.ranks = model, ranks

    def forward(self, share: CaptionBatch, data, options, generator) -> dict[str, Tensor]:
        model, ranks = self.model, self.ranks
        local = share.images.shape[0]
        # the global batch's raw inputs: ITM's cross-rank pairs and the MLM rows read them
        images, text_ids, padding, caption_ids = (
            gather_rows(t) for t in (share.images, share.text_ids, share.padding_mask, share.caption_ids)
        )
        # stage 1 reads neither the caption strings nor the decoder's targets: they stay on their rank
        whole = CaptionBatch(images, text_ids, padding, caption_ids, [], [], canonical_text_ids=None)
        image_embed, text_embed = model.itc(
            model.pooled(model.encoder.encode_image(share.images), None, "image"),
            model.pooled(model.encoder.encode_text(share.text_ids, share.padding_mask), share.padding_mask, "text"),
        )
        # drawn as itc_loss draws it; the ranks' generators are in one state, so they draw one seed
        seed = int(sample_seed(generator))
        itc = itc_loss_rows(
            image_embed,
            text_embed,
            gather_with_grad(image_embed),
            gather_with_grad(text_embed),
            model.itc.scale,
            row_offset=ranks.rank * local,
            options=ITCOptions(positive_ids=whole.caption_ids),
            hard_negatives="sample",
            seed=seed,
        )
        hard = HardNegatives(gather_rows(itc.neg_text_idx), gather_rows(itc.neg_image_idx))
        neg_text, neg_image = model.itm_negatives(whole, hard, options.itm_random_negatives, generator)
        itm = self._itm_share(whole, neg_text, neg_image, options.itm_pairs)
        tokenizer = data.tokenizer
        masked_ids, mlm_labels = mask_tokens(
            whole.text_ids,
            whole.padding_mask,
            tokenizer.mask_id,
            tokenizer.vocab_size,
            prob=options.mlm_prob,
            generator=generator,
            special_ids=tokenizer.special_ids,
        )
        mlm = self._mlm_share(whole, masked_ids, mlm_labels, options.mlm_pairs)
        return {"itc": itc.loss, "itm": itm, "mlm": mlm}

    def _itm_share(self, whole: CaptionBatch, neg_text: Tensor, neg_image: Tensor, count: int) -> Tensor:
        """This rank's part of the weighted ITM cross-entropy over the pairs one process scores."""
        model, world = self.model, self.ranks.world_size
        pairs = itm_inputs(whole.images, whole.text_ids, whole.padding_mask, neg_text, neg_image)
        groups = [whole.images.shape[0], int((neg_text >= 0).sum()), int((neg_image >= 0).sum())]
        images, ids, padding, labels = model._itm_subset(pairs, groups, count)
        mine = self.ranks.share(labels.shape[0])
        fused = model.encoder.encode_pair(images[mine], ids[mine], padding[mine])
        matches = labels.float().mean().clamp(1e-6, 1 - 1e-6)  # over all the pairs, as in Pretrainer.itm_loss
        weight = torch.stack([0.5 / (1 - matches), 0.5 / matches]).to(fused.hidden.dtype)
        logits = model.itm(model.encoder.fused_cls(fused))
        # F.cross_entropy's weighted mean divides by the weight of every pair, not of this rank's
        summed = F.cross_entropy(logits, labels[mine], weight=weight, reduction="sum")
        return summed * (world / weight[labels].sum())

    def _mlm_share(self, whole: CaptionBatch, masked_ids: Tensor, labels: Tensor, count: int) -> Tensor:
        """This rank's part of the MLM cross-entropy over the masked tokens of the first ``count`` pairs."""
        model, world = self.model, self.ranks.world_size
        few = min(count, whole.images.shape[0])
        mine = self.ranks.share(few)
        hidden = model.encoder.encode_pair(whole.images[mine], masked_ids[mine], whole.padding_mask[mine]).hidden
        mean = model.mlm.loss(model.text_states(hidden, whole.text_ids.shape[1]), labels[mine])
        masked_here = (labels[mine] != IGNORE_INDEX).sum()
        masked_all = (labels[:few] != IGNORE_INDEX).sum().clamp(min=1)
        return mean * (masked_here * world / masked_all)


class CaptionStep(nn.Module):
    """This rank's share of the stage-2 caption loss as a ``forward``: the mean over every rank's target tokens.

    The encoder is a submodule (and DDP reduces its gradients) only when it trains; frozen, it is kept out
    of sight of DDP, which would otherwise wait for gradients that never come.
    """

    def __init__(self, decoder: nn.Module, encoder: nn.Module, train_encoder: bool, ranks: Ranks) -> None:
        super().__init__()
        self.decoder, self.ranks = decoder, ranks
        self.encoder = encoder if train_encoder else None
        self._frozen_encoder = None if train_encoder else (encoder,)

    def forward(self, images: Tensor, text_ids: Tensor) -> Tensor:
        encoder = self.encoder if self.encoder is not None else self._frozen_encoder[0]
        with torch.set_grad_enabled(self.encoder is not None):
            image_tokens = encoder.encode_image(images).hidden
        mean = self.decoder.loss(text_ids, image_tokens)
        targets = (text_ids[:, 1:] != self.decoder.pad_id).sum()
        return mean * (targets * self.ranks.world_size / sum_over_ranks(targets).clamp(min=1))


def wrap_ddp(module: nn.Module, ranks: Ranks, find_unused_parameters: bool = False) -> DistributedDataParallel:
    device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def train_encoder(model, data, options, steps, ranks: Ranks, history, generator) -> None:
    """Stage 1 on this rank: ``mome.demo.train_encoder`` with DDP over the ranks' shares of each batch."""
    # the vision embedding's mask token (BEiT's masked image modelling) gets no gradient in this recipe
    step_module = wrap_ddp(Stage1Step(model, ranks), ranks, find_unused_parameters=True)
    optimizer, scheduler = adamw_warmup_cosine(model.parameters(), options.lr, steps)
    progress = Progress(steps, "stage 1/2 ITC+ITM+MLM", options.quiet or not ranks.is_main)
    rows = ranks.equal_share(options.batch_size, "--batch-size")
    model.train()
    for step in range(steps):
        share = on_device(share_of(data.train_batch(options.batch_size), rows), ranks.device)
        losses = step_module(share, data, options, generator)
        loss = losses["itc"] + options.itm_weight * losses["itm"] + losses["mlm"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        means = mean_over_ranks(torch.stack([losses[name] for name in STAGE1_LOSSES])).tolist()
        for name, value in zip(STAGE1_LOSSES, means, strict=True):
            getattr(history, name).append(value)
        progress.update(step + 1, f"loss {means[0] + options.itm_weight * means[1] + means[2]:.3f}")


def train_decoder(model, decoder, data, options, steps, ranks: Ranks, history) -> None:
    """Stage 2 on this rank: ``mome.demo.train_decoder`` with DDP over the ranks' shares of each batch."""
    train_encoder_too = options.caption_encoder_lr > 0
    step_module = wrap_ddp(CaptionStep(decoder, model.encoder, train_encoder_too, ranks), ranks)
    params = [{"params": decoder.parameters()}]
    if train_encoder_too:
        params.append({"params": model.encoder.parameters(), "lr": options.lr * options.caption_encoder_lr})
    optimizer, scheduler = adamw_warmup_cosine(params, options.lr, steps)
    progress = Progress(steps, "stage 2/2 captioning  ", options.quiet or not ranks.is_main)
    rows = ranks.equal_share(options.batch_size, "--batch-size")
    model.train(train_encoder_too)
    decoder.train()
    for step in range(steps):
        share = on_device(share_of(data.train_batch(options.batch_size), rows), ranks.device)
        loss = step_module(share.images, share.canonical_text_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        value = mean_over_ranks(loss).item()
        history.caption.append(value)
        progress.update(step + 1, f"loss {value:.3f}")
