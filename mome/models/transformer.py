"""MoMETransformer: embeddings + MoME layers + final norm, in the VLMo or BEiT-3 layout."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mome.models.config import MoMEConfig
from mome.models.torchscale_keys import convert_state_dict
from mome.nn.layer import MoMELayer
from mome.nn.multiway import LANGUAGE, VISION, MultiwayLayerNorm, MultiwayLinear
from mome.nn.relative_position import BucketedRelativePositionBias, RelativePositionBias
from mome.ops._validate import check_ids


class MoMEOutput(NamedTuple):
    hidden: Tensor  # [B, N, D] final states in the layout's token order
    image_cls: Tensor | None  # [B, D] state of the image [CLS] token, None without an image
    text_cls: Tensor | None  # [B, D] state of the first text token ([CLS]), None without text


class PatchEmbedding(nn.Module):
    """Non-overlapping patches by a strided conv, then a [CLS] token in front: ``(B, 1 + P, D)``.

    ``masked_position`` ``(B, P)`` bool replaces those patches by the learned mask token (BEiT MIM).
    """

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, images: Tensor, masked_position: Tensor | None = None) -> Tensor:
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a (B, C, H, W) float tensor, got {tuple(images.shape)} {images.dtype}")
        if tuple(images.shape[1:]) != (self.proj.in_channels, self.image_size, self.image_size):
            expected = (self.proj.in_channels, self.image_size, self.image_size)
            raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        patches = self.proj(images).flatten(2).transpose(1, 2)  # [B, P, D]
        if masked_position is not None:
            expected = tuple(patches.shape[:2])
            if not isinstance(masked_position, Tensor) or tuple(masked_position.shape) != expected:
                got = tuple(masked_position.shape) if isinstance(masked_position, Tensor) else masked_position
                raise ValueError(
                    f"masked_position must be a (B, P) = {expected} bool tensor (True = mask token), got {got}"
                )
            if masked_position.device != patches.device:
                raise ValueError(
                    f"masked_position must be on {patches.device} like images, got {masked_position.device}"
                )
            weight = masked_position.unsqueeze(-1).to(patches.dtype)
            patches = patches * (1 - weight) + self.mask_token.to(patches.dtype) * weight
        cls = self.cls_token.to(patches.dtype).expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1)


class MoMETransformer(nn.Module):
    """A VLMo / BEiT-3 encoder: shared attention, per-modality experts, three entry points.

    ``encode_image(images)``, ``encode_text(text_ids, text_padding_mask)`` and ``encode_pair(...)`` return
    :class:`MoMEOutput`. Token order of ``encode_pair``: VLMo puts the text first, then the image, and its
    fused [CLS] (for ITM) is ``text_cls``; BEiT-3 puts the image first ([CLS] + patches), then the text,
    and its fused [CLS] is ``image_cls``. :meth:`fused_cls` picks the right one.

    Embeddings: learned absolute positions for both modalities (``config.absolute_position``); VLMo adds
    BERT's embedding LayerNorm to the text and a modality-type embedding to every token; BEiT-3 zeroes the
    embeddings of padded text like torchscale. ``config.relative_position`` adds a learned bias to every
    layer's attention scores: VLMo's table (``relative_position.relative_position_bias_table``, every layer's
    heads side by side) or torchscale's bucketed one (``relative_position.relative_attention_bias``). A
    load_state_dict pre-hook converts torchscale BEiT3 checkpoints (``*.A.*`` / ``*.B.*`` keys) on load.
    """

    def __init__(self, config: MoMEConfig):
        super().__init__()
        if not isinstance(config, MoMEConfig):
            raise TypeError(f"config must be a MoMEConfig, got {type(config).__name__}")
        self.config = c = config
        self.vision_embed = PatchEmbedding(c.image_size, c.patch_size, c.in_chans, c.dim)
        self.text_embed = nn.Embedding(c.vocab_size, c.dim)
        if c.absolute_position:
            self.vision_pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.dim))
            self.text_pos_embed = nn.Parameter(torch.zeros(1, c.max_text_len, c.dim))
        else:
            self.vision_pos_embed = self.text_pos_embed = None
        if c.layout == "vlmo":
            self.text_embed_norm = nn.LayerNorm(c.dim, eps=1e-12)
            self.modality_embed = nn.Embedding(2, c.dim)  # indexed by VISION / LANGUAGE
        self.layers = nn.ModuleList(
            MoMELayer(
                c.dim,
                c.heads,
                c.mlp_ratio,
                layout=c.layout,
                vl_ffn=index >= c.depth - c.vl_layers,
                eps=c.eps,
                layer_scale_init=c.layer_scale_init,
                subln=c.subln,
                dropout=c.dropout,
                drop_path=c.drop_path * index / max(c.depth - 1, 1),
                activation=c.activation,
                attention_dropout=c.attention_dropout,
            )
            for index in range(c.depth)
        )
        self.relative_position = _relative_position(c)
        self.norm = nn.LayerNorm(c.dim, eps=c.eps) if c.layout == "vlmo" else MultiwayLayerNorm(c.dim, 2, c.eps)
        self.apply(_init_weights)
        for param in (self.vision_pos_embed, self.text_pos_embed, self.vision_embed.cls_token):
            if param is not None:
                nn.init.trunc_normal_(param, std=0.02)
        self.register_load_state_dict_pre_hook(_convert_torchscale_keys)

    # --- embeddings -------------------------------------------------------------------------------------
    def embed_image(self, images: Tensor, masked_position: Tensor | None = None) -> Tensor:
        x = self.vision_embed(images, masked_position)  # [B, 1 + P, D]
        if self.vision_pos_embed is not None:
            x = x + self.vision_pos_embed
        if self.config.layout == "vlmo":
            x = x + self.modality_embed.weight[VISION]
        return x

    def embed_text(self, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> Tensor:
        _check_text(text_ids, text_padding_mask, self.config, self.text_embed.weight.device)
        x = self.text_embed(text_ids.long())  # [B, L, D]
        if self.text_pos_embed is not None:
            x = x + self.text_pos_embed[:, : text_ids.shape[1]]
        if self.config.layout == "vlmo":
            x = self.text_embed_norm(x) + self.modality_embed.weight[LANGUAGE]
        elif text_padding_mask is not None:
            x = x * (~text_padding_mask).unsqueeze(-1).to(x.dtype)
        return x

    # --- encoder ----------------------------------------------------------------------------------------
    def attention_biases(self, text_len: int, image_len: int) -> tuple[Tensor | None, ...]:
        """Each layer's ``(1, H, N, N)`` relative position bias (None without one) for ``text_len`` text and
        ``image_len`` image tokens in the layout's order."""
        rel = self.relative_position
        if isinstance(rel, RelativePositionBias):
            return rel.per_layer(text_len, image_len)
        if isinstance(rel, BucketedRelativePositionBias):
            return (rel(text_len + image_len),) * len(self.layers)
        return (None,) * len(self.layers)

    def run_layers(
        self,
        x: Tensor,
        modality: Tensor,
        key_padding_mask: Tensor | None,
        fused: bool,
        attn_biases: tuple[Tensor | None, ...] | None = None,
    ) -> Tensor:
        """Every layer, then the final norm; modality ``(B, N)`` V/L ids of the tokens; ``attn_biases`` one
        bias (or None) per layer, as :meth:`attention_biases` gives."""
        x = F.dropout(x, self.config.dropout, self.training)
        if attn_biases is None:
            if self.relative_position is not None:
                raise ValueError(
                    "this model has a relative position bias: pass attn_biases=model.attention_biases(text_len, "
                    "image_len) for the tokens in x"
                )
            attn_biases = (None,) * len(self.layers)
        if len(attn_biases) != len(self.layers):
            raise ValueError(f"attn_biases must hold one bias per layer ({len(self.layers)}), got {len(attn_biases)}")
        for layer, bias in zip(self.layers, attn_biases, strict=True):
            x = layer(x, modality, key_padding_mask, fused=fused, attn_bias=bias)
        return self.norm(x) if self.config.layout == "vlmo" else self.norm(x, modality)

    def encode_image(self, images: Tensor, masked_position: Tensor | None = None) -> MoMEOutput:
        """images ``(B, C, H, W)`` -> hidden ``(B, 1 + P, D)``, image_cls = hidden[:, 0]."""
        x = self.embed_image(images, masked_position)
        modality = torch.full(x.shape[:2], VISION, dtype=torch.int64, device=x.device)
        hidden = self.run_layers(x, modality, None, fused=False, attn_biases=self.attention_biases(0, x.shape[1]))
        return MoMEOutput(hidden, hidden[:, 0], None)

    def encode_text(self, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> MoMEOutput:
        """text_ids ``(B, L)`` ints in ``[0, vocab_size)`` with ``1 <= L <= max_text_len`` (the first token is the
        [CLS]), text_padding_mask ``(B, L)`` bool True = pad -> text_cls = hidden[:, 0]. Bad ids raise ValueError."""
        x = self.embed_text(text_ids, text_padding_mask)
        modality = torch.full(x.shape[:2], LANGUAGE, dtype=torch.int64, device=x.device)
        biases = self.attention_biases(x.shape[1], 0)
        hidden = self.run_layers(x, modality, text_padding_mask, fused=False, attn_biases=biases)
        return MoMEOutput(hidden, None, hidden[:, 0])

    def encode_pair(
        self,
        images: Tensor,
        text_ids: Tensor,
        text_padding_mask: Tensor | None = None,
        masked_position: Tensor | None = None,
    ) -> MoMEOutput:
        """Fused image-text encoding. VLMo: [text, image], fused CLS = ``text_cls``; BEiT-3: [image, text],
        fused CLS = ``image_cls``. Both CLS states are returned; :meth:`fused_cls` picks the fused one."""
        image = self.embed_image(images, masked_position)  # [B, 1 + P, D]
        text = self.embed_text(text_ids, text_padding_mask)  # [B, L, D]
        if image.shape[0] != text.shape[0]:
            raise ValueError(f"images and text_ids must have the same batch, got {image.shape[0]} and {text.shape[0]}")
        batch, n_image, n_text = image.shape[0], image.shape[1], text.shape[1]
        image_pad = torch.zeros(batch, n_image, dtype=torch.bool, device=image.device)
        padding = text_padding_mask
        image_ids = torch.full((batch, n_image), VISION, dtype=torch.int64, device=image.device)
        text_ids_modality = torch.full((batch, n_text), LANGUAGE, dtype=torch.int64, device=image.device)
        biases = self.attention_biases(n_text, n_image)
        if self.config.layout == "vlmo":
            x = torch.cat([text, image], dim=1)
            modality = torch.cat([text_ids_modality, image_ids], dim=1)
            padding = None if padding is None else torch.cat([padding, image_pad], dim=1)
            hidden = self.run_layers(x, modality, padding, fused=True, attn_biases=biases)
            return MoMEOutput(hidden, hidden[:, n_text], hidden[:, 0])
        x = torch.cat([image, text], dim=1)
        modality = torch.cat([image_ids, text_ids_modality], dim=1)
        padding = None if padding is None else torch.cat([image_pad, padding], dim=1)
        hidden = self.run_layers(x, modality, padding, fused=True, attn_biases=biases)
        return MoMEOutput(hidden, hidden[:, 0], hidden[:, n_image])

    def fused_cls(self, output: MoMEOutput) -> Tensor:
        """The [CLS] state ITM reads from an ``encode_pair`` output: text_cls (VLMo) or image_cls (BEiT-3)."""
        return output.text_cls if self.config.layout == "vlmo" else output.image_cls

    def forward(
        self,
        images: Tensor | None = None,
        text_ids: Tensor | None = None,
        text_padding_mask: Tensor | None = None,
    ) -> MoMEOutput:
        """``encode_pair`` with both inputs, else ``encode_image`` or ``encode_text``."""
        if images is not None and text_ids is not None:
            return self.encode_pair(images, text_ids, text_padding_mask)
        if images is not None:
            return self.encode_image(images)
        if text_ids is not None:
            return self.encode_text(text_ids, text_padding_mask)
        raise ValueError("pass images, text_ids or both")


def _check_text(text_ids: Tensor, text_padding_mask: Tensor | None, config: MoMEConfig, device: torch.device) -> None:
    """Shape, dtype, device and values of the text ids (an out-of-vocabulary id is a ValueError here, not an
    IndexError in the embedding, or a device-side assert on CUDA)."""
    integer = isinstance(text_ids, Tensor) and not text_ids.is_floating_point() and not text_ids.is_complex()
    if not integer or text_ids.dim() != 2 or text_ids.dtype == torch.bool:
        got = f"{tuple(text_ids.shape)} {text_ids.dtype}" if isinstance(text_ids, Tensor) else type(text_ids).__name__
        raise ValueError(f"text_ids must be a (B, L) integer tensor, got {got}")
    if text_ids.shape[1] == 0:
        raise ValueError(
            f"text_ids must hold at least one token per text (the [CLS] that text_cls reads), got shape "
            f"{tuple(text_ids.shape)}"
        )
    if text_ids.shape[1] > config.max_text_len:
        raise ValueError(
            f"text_ids has {text_ids.shape[1]} tokens, more than config.max_text_len = {config.max_text_len}"
        )
    if text_ids.device != device:
        raise ValueError(f"text_ids must be on the model's device {device}, got {text_ids.device}")
    # reads min/max back (one sync); skipped while torch.compile traces and with MOME_CHECK_IDS=0
    check_ids("text_ids", text_ids, config.vocab_size, f"token ids of config.vocab_size = {config.vocab_size}")
    if text_padding_mask is not None:
        if not isinstance(text_padding_mask, Tensor) or text_padding_mask.dtype != torch.bool:
            raise TypeError("text_padding_mask must be a bool tensor (True = pad)")
        if text_padding_mask.shape != text_ids.shape:
            raise ValueError(
                f"text_padding_mask must have text_ids' shape {tuple(text_ids.shape)}, "
                f"got {tuple(text_padding_mask.shape)}"
            )
        if text_padding_mask.device != device:
            raise ValueError(
                f"text_padding_mask must be on the model's device {device}, got {text_padding_mask.device}"
            )


def _relative_position(c: MoMEConfig) -> nn.Module | None:
    if c.relative_position == "vlmo":
        grid = c.image_size // c.patch_size
        return RelativePositionBias(c.heads, grid, text_table_len=c.rel_pos_text_len or c.max_text_len, layers=c.depth)
    if c.relative_position == "buckets":
        return BucketedRelativePositionBias(c.heads, c.rel_pos_buckets, c.max_rel_pos)
    return None


def _init_weights(module: nn.Module) -> None:
    """BEiT / VLMo initialisation: truncated normal 0.02 for weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, MultiwayLinear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, (nn.LayerNorm, MultiwayLayerNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _convert_torchscale_keys(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """Load torchscale BEiT3 checkpoints directly: their keys are converted in place."""
    if any(key.startswith(prefix + "encoder.layers.") for key in state_dict):
        converted = convert_state_dict({k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)})
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]
        state_dict.update({prefix + k: v for k, v in converted.items()})
