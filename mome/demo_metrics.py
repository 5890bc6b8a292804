"""The demo's held-out metrics: retrieval recall, caption scores and a balanced image-text matching (ITM) test."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mome.shapes_data import CaptionBatch


def recall_at(similarity: Tensor, k: int) -> float:
    """Fraction of rows whose own column (the diagonal) ranks in the top k."""
    k = min(k, similarity.shape[1])
    top = similarity.topk(k, dim=1).indices
    return float((top == torch.arange(similarity.shape[0], device=similarity.device)[:, None]).any(1).float().mean())


def retrieval_scores(similarity: Tensor) -> dict:
    """R@1 and R@5 both ways for an ``(images, texts)`` similarity whose diagonal holds the true pairs, and chance."""
    size = similarity.shape[0]
    return {
        "image_to_text": {"R@1": recall_at(similarity, 1), "R@5": recall_at(similarity, 5)},
        "text_to_image": {"R@1": recall_at(similarity.T, 1), "R@5": recall_at(similarity.T, 5)},
        "chance": {"R@1": 1 / size, "R@5": min(5, size) / size},
    }


def print_retrieval(heading: str, retrieval: dict) -> None:
    """The table of :func:`retrieval_scores` under ``heading``."""
    print(f"\n{heading}")
    print(f"  {'':<14}{'R@1':>8}{'R@5':>8}")
    for name, label in (("image_to_text", "image → text"), ("text_to_image", "text → image")):
        print(f"  {label:<14}{retrieval[name]['R@1']:>8.1%}{retrieval[name]['R@5']:>8.1%}")
    chance = retrieval["chance"]
    print(f"  {'chance':<14}{chance['R@1']:>8.1%}{chance['R@5']:>8.1%}")


def caption_scores(generated: list[str], equivalents: list[tuple[str, ...]]) -> tuple[float, float]:
    """Exact-match rate and words-in-place rate of generated captions; each is scored against the closest
    of its image's equivalent captions ("a X left of a Y" and "a Y right of a X" are both right)."""
    exact, right_words, total_words = 0, 0, 0
    for caption, truths in zip(generated, equivalents, strict=True):
        words = caption.split()
        in_place = [(sum(a == b for a, b in zip(words, t.split(), strict=False)), len(t.split())) for t in truths]
        right, length = max(in_place, key=lambda score: score[0] / score[1])
        exact += caption in truths
        right_words, total_words = right_words + right, total_words + length
    return exact / max(len(generated), 1), right_words / max(total_words, 1)


def other_scene(caption_ids: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Per pair, a pair drawn uniformly among those of other scenes (another id): a random negative that is a
    true non-match. -1 where no other scene exists."""
    others = (caption_ids[:, None] != caption_ids[None, :]).double()  # [B, B]
    has = others.any(1)
    drawn = torch.multinomial(others[has].cpu(), 1, generator=generator)[:, 0].to(caption_ids.device)
    picked = torch.full_like(caption_ids, -1)
    picked[has] = drawn
    return picked


def itm_eval_pairs(caption_ids: Tensor, similarity: Tensor, generator: torch.Generator | None = None) -> dict:
    """The non-matches of the ITM test, one per held-out pair, as ``(image rows, text rows)`` per kind.

    Even rows pair image i with another text, odd rows text i with another image: as many non-matches as
    matches, half of each sort. ``"hard"``: the pair of another scene with the highest ITC similarity (ALBEF's
    hard negative); ``"random"``: one drawn uniformly among other scenes. A pair whose id equals the positive's
    (the same caption, or its mirror: a caption of the same image) is never a non-match; -1 where none exists.
    """
    same = caption_ids[:, None] == caption_ids[None, :]
    others = similarity.masked_fill(same, float("-inf"))  # [images, texts]
    alone = same.all(1)
    rows = torch.arange(caption_ids.shape[0], device=caption_ids.device)
    text_side = rows % 2 == 0
    picks = {  # (per image a text, per text an image)
        "hard": (others.argmax(1).masked_fill(alone, -1), others.argmax(0).masked_fill(alone, -1)),
        "random": (other_scene(caption_ids, generator), other_scene(caption_ids, generator)),
    }
    return {
        kind: (torch.where(text_side, rows, image_pick), torch.where(text_side, text_pick, rows))
        for kind, (text_pick, image_pick) in picks.items()
    }


def _match_logits(model, batch: CaptionBatch, image_rows: Tensor, text_rows: Tensor, chunk: int = 128) -> Tensor:
    logits = []
    for start in range(0, image_rows.shape[0], chunk):
        images, texts = image_rows[start : start + chunk], text_rows[start : start + chunk]
        fused = model.encoder.encode_pair(batch.images[images], batch.text_ids[texts], batch.padding_mask[texts])
        logits.append(model.itm(model.encoder.fused_cls(fused)))
    return torch.cat(logits)  # [pairs, 2]


def _binary_scores(match_logits: Tensor, no_match_logits: Tensor) -> dict:
    logits = torch.cat([match_logits, no_match_logits])
    labels = torch.cat([torch.ones(len(match_logits)), torch.zeros(len(no_match_logits))]).long().to(logits.device)
    predicted = logits.argmax(1)
    match = float((predicted[labels == 1] == 1).float().mean())
    no_match = float((predicted[labels == 0] == 0).float().mean())
    return {
        "pairs": int(labels.numel()),
        "balanced_accuracy": (match + no_match) / 2,
        "accuracy": float((predicted == labels).float().mean()),
        "match_accuracy": match,
        "no_match_accuracy": no_match,
        "loss": float(F.cross_entropy(logits, labels)),
    }


@torch.no_grad()
def itm_scores(model, batch: CaptionBatch, similarity: Tensor, generator: torch.Generator | None = None) -> dict:
    """ITM on held-out pairs, balanced: every pair as a match, and per kind of :func:`itm_eval_pairs` as many
    true non-matches. Balanced accuracy is the mean of the match and non-match accuracies; the majority class
    is 50% and the chance loss ln 2. ``model`` has ``encoder`` (a MoMETransformer) and ``itm`` (an ITMHead)."""
    rows = torch.arange(similarity.shape[0], device=similarity.device)
    matches = _match_logits(model, batch, rows, rows)
    scores = {"majority_rate": 0.5, "chance_loss": math.log(2)}
    for kind, (image_rows, text_rows) in itm_eval_pairs(batch.caption_ids, similarity, generator).items():
        keep = (image_rows >= 0) & (text_rows >= 0)
        no_matches = _match_logits(model, batch, image_rows[keep], text_rows[keep])
        scores[f"{kind}_negatives"] = _binary_scores(matches[keep], no_matches)
    return scores
