"""The MoME transformer block in its two real layouts: VLMo and BEiT-3 (torchscale)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mome.nn.attention import MultiwaySelfAttention, SharedSelfAttention
from mome.nn.multiway import VISION_LANGUAGE, ModalityFFN, MultiwayLayerNorm, modality_from_split

LAYOUTS = ("vlmo", "beit3")


def drop_path(x: Tensor, probability: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""
    if probability == 0.0 or not training:
        return x
    keep = 1.0 - probability
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class MoMELayer(nn.Module):
    """Shared self-attention + per-modality expert FFN.

    ``layout="vlmo"``: shared ``norm1`` and attention (one qkv, q and v bias), per-expert ``norm2`` and
    FFN, layer scale ``gamma_1`` / ``gamma_2`` (when ``layer_scale_init``). ``layout="beit3"`` (torchscale
    with ``subln``): both LayerNorms, the q/k/v/out projections, the sub-LayerNorm before out_proj and the
    FFN (with its sub-LayerNorm after the activation) are per-modality; only the softmax is shared.

    With ``vl_ffn=True`` the layer owns a third, vision-language expert for ``norm2`` and the FFN and
    sends every token there when ``fused=True`` (VLMo's top layers); otherwise tokens use the V / L
    expert of their position. ``attention_dropout`` drops attention probabilities in training; ``forward``'s
    ``attn_bias`` (e.g. a relative position bias) is added to the attention scores.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        *,
        layout: str = "vlmo",
        vl_ffn: bool = False,
        eps: float | None = None,
        layer_scale_init: float | None = None,
        subln: bool = True,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        activation: str = "gelu",
        attention_dropout: float = 0.0,
    ):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout, self.vl_ffn, self.dropout, self.drop_path = layout, vl_ffn, dropout, drop_path
        eps = (1e-6 if layout == "vlmo" else 1e-5) if eps is None else eps
        ffn_experts = 3 if vl_ffn else 2
        hidden = int(dim * mlp_ratio)
        if layout == "vlmo":
            self.norm1 = nn.LayerNorm(dim, eps=eps)
            self.attn = SharedSelfAttention(dim, heads, dropout=attention_dropout)
            self.norm2 = MultiwayLayerNorm(dim, ffn_experts, eps)
            self.ffn = ModalityFFN(dim, hidden, ffn_experts, activation, subln=False, dropout=dropout)
        else:
            self.norm1 = MultiwayLayerNorm(dim, 2, eps)
            self.attn = MultiwaySelfAttention(dim, heads, 2, subln=subln, eps=eps, dropout=attention_dropout)
            self.norm2 = MultiwayLayerNorm(dim, ffn_experts, eps)
            self.ffn = ModalityFFN(dim, hidden, ffn_experts, activation, subln=subln, eps=eps, dropout=dropout)
        if layer_scale_init:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(
        self,
        x: Tensor,
        modality: Tensor | int,
        key_padding_mask: Tensor | None = None,
        fused: bool = False,
        attn_bias: Tensor | None = None,
    ) -> Tensor:
        """x ``(B, N, D)``; modality ``(B, N)`` ids (0 vision, 1 language) or torchscale's split position;
        key_padding_mask ``(B, N)`` bool, True = pad; fused: image-text input (VL expert in VL layers);
        attn_bias broadcastable as ``(B, H, N, N)``, added to the scaled attention scores."""
        if isinstance(modality, int):
            modality = modality_from_split(modality, x.shape[0], x.shape[1], x.device)
        ffn_ids = torch.full_like(modality, VISION_LANGUAGE) if (fused and self.vl_ffn) else modality
        if self.layout == "vlmo":
            branch = self.attn(self.norm1(x), key_padding_mask, attn_bias)
        else:
            branch = self.attn(self.norm1(x, modality), modality, key_padding_mask, attn_bias)
        x = x + self._residual(F.dropout(branch, self.dropout, self.training), self.gamma_1)
        branch = self.ffn(self.norm2(x, ffn_ids), ffn_ids)  # the FFN applies its own dropout
        return x + self._residual(branch, self.gamma_2)

    def _residual(self, branch: Tensor, gamma: Tensor | None) -> Tensor:
        if gamma is not None:
            branch = gamma * branch
        return drop_path(branch, self.drop_path, self.training)

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}, vl_ffn={self.vl_ffn}, drop_path={self.drop_path}"
