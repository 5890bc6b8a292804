"""Pre-training heads: image-text contrastive (ITC), image-text matching (ITM), masked LM (MLM)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mome import ops
from mome.ops.itc import ITCOutput

IGNORE_INDEX = -100
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.001, 0.5  # ALBEF's clamp: scale stays within [2, 1000]


class ITCHead(nn.Module):
    """Projects image and text [CLS] states to a shared space, normalised; owns the temperature.

    ``scale`` (a 0-d tensor) is ``1 / temperature`` with the temperature clamped to [0.001, 0.5] as in
    ALBEF; it is what :func:`mome.ops.itc_loss` multiplies the similarities by (:meth:`loss`).
    """

    def __init__(self, dim: int, embed_dim: int, init_temperature: float = 0.07, learnable: bool = True):
        super().__init__()
        if not MIN_TEMPERATURE <= init_temperature <= MAX_TEMPERATURE:
            raise ValueError(
                f"init_temperature must lie in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {init_temperature}"
            )
        self.image_proj = nn.Linear(dim, embed_dim)
        self.text_proj = nn.Linear(dim, embed_dim)
        temperature = torch.tensor(float(init_temperature))
        if learnable:
            self.temperature = nn.Parameter(temperature)
        else:
            self.register_buffer("temperature", temperature)

    @property
    def scale(self) -> Tensor:
        return 1.0 / self.temperature.clamp(MIN_TEMPERATURE, MAX_TEMPERATURE)

    def forward(self, image_cls: Tensor | None, text_cls: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """``(B, dim)`` states -> unit-norm ``(B, embed_dim)`` embeddings (None stays None)."""
        image_embed = None if image_cls is None else F.normalize(self.image_proj(image_cls), dim=-1)
        text_embed = None if text_cls is None else F.normalize(self.text_proj(text_cls), dim=-1)
        return image_embed, text_embed

    def loss(self, image_embed: Tensor, text_embed: Tensor, **itc_kwargs) -> ITCOutput:
        """:func:`mome.ops.itc_loss` at this head's scale; kwargs: queue, momentum features, hard_negatives..."""
        return ops.itc_loss(image_embed, text_embed, self.scale, **itc_kwargs)


class ITMHead(nn.Module):
    """Binary match / no-match logits from the fused [CLS] state: ``(B, dim) -> (B, 2)``, class 1 = match."""

    def __init__(self, dim: int):
        super().__init__()
        self.classifier = nn.Linear(dim, 2)

    def forward(self, fused_cls: Tensor) -> Tensor:
        return self.classifier(fused_cls)


def itm_inputs(
    images: Tensor,
    text_ids: Tensor,
    text_padding_mask: Tensor | None,
    neg_text_idx: Tensor,
    neg_image_idx: Tensor,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """ALBEF's ITM batch from the hard negatives that ``itc_loss(..., hard_negatives=...)`` returns.

    Rows: the B positive pairs, then each image with its hard-negative text, then each text with its
    hard-negative image; a negative index of -1 (no negative exists) drops that row. Returns
    ``(images, text_ids, text_padding_mask, labels)`` with labels 1 = match, 0 = no match.
    """
    batch = images.shape[0]
    image_rows = torch.arange(batch, device=images.device)
    has_text = neg_text_idx >= 0
    has_image = neg_image_idx >= 0
    pair_images = torch.cat([image_rows, image_rows[has_text], neg_image_idx[has_image]])
    pair_texts = torch.cat([image_rows, neg_text_idx[has_text], image_rows[has_image]])
    labels = torch.cat(
        [
            torch.ones(batch, dtype=torch.int64, device=images.device),
            torch.zeros(int(pair_images.shape[0]) - batch, dtype=torch.int64, device=images.device),
        ]
    )
    padding = None if text_padding_mask is None else text_padding_mask[pair_texts]
    return images[pair_images], text_ids[pair_texts], padding, labels


class MLMHead(nn.Module):
    """BERT's LM head: dense + GELU + LayerNorm, then a projection to the vocabulary."""

    def __init__(self, dim: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:
        """``(..., dim) -> (..., vocab_size)`` logits."""
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))

    def loss(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy over the masked positions only (labels -100 elsewhere); logits of the rest are
        never computed. hidden ``(B, L, dim)`` and labels ``(B, L)`` (text positions)."""
        if hidden.shape[:-1] != labels.shape:
            raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
        selected = labels != IGNORE_INDEX
        logits = self(hidden[selected])  # [M, V]
        if logits.shape[0] == 0:
            return logits.sum() * 0.0  # no masked token: zero loss, still connected to the graph
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the softmax in fp32
        return F.cross_entropy(logits, labels[selected])


def mask_tokens(
    text_ids: Tensor,
    padding_mask: Tensor | None,
    mask_id: int,
    vocab_size: int,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
    special_ids: Sequence[int] = (),
) -> tuple[Tensor, Tensor]:
    """BERT masking: each non-pad, non-special token is chosen with probability ``prob``; a chosen token
    becomes ``mask_id`` (80%), a random id in ``[0, vocab_size)`` (10%) or stays (10%).

    Returns ``(masked_ids, labels)``: labels hold the original id where chosen and -100 elsewhere.
    """
    if text_ids.is_floating_point() or text_ids.dim() != 2:
        raise ValueError(f"text_ids must be a (B, L) integer tensor, got {tuple(text_ids.shape)} {text_ids.dtype}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must lie in [0, 1], got {prob}")
    device = text_ids.device if generator is None else generator.device
    candidates = torch.ones_like(text_ids, dtype=torch.bool)
    if padding_mask is not None:
        if padding_mask.shape != text_ids.shape or padding_mask.dtype != torch.bool:
            raise ValueError(f"padding_mask must be a bool tensor of shape {tuple(text_ids.shape)}")
        candidates &= ~padding_mask
    if len(special_ids) > 0:
        special = torch.tensor(list(special_ids), dtype=text_ids.dtype, device=text_ids.device)
        candidates &= ~torch.isin(text_ids, special)
    draw = torch.rand(text_ids.shape, generator=generator, device=device).to(text_ids.device)
    kind = torch.rand(text_ids.shape, generator=generator, device=device).to(text_ids.device)
    random_ids = torch.randint(vocab_size, text_ids.shape, generator=generator, device=device).to(text_ids.device)
    chosen = candidates & (draw < prob)
    labels = torch.where(chosen, text_ids, torch.full_like(text_ids, IGNORE_INDEX))
    masked = torch.where(chosen & (kind < 0.8), torch.full_like(text_ids, mask_id), text_ids)
    masked = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), random_ids.to(text_ids.dtype), masked)
    return masked, labels
