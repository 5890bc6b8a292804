"""Multiway (per-modality expert) layers: linear, LayerNorm and FFN with one set of weights per expert.

Each token picks its expert by a modality id (0 = vision, 1 = language, 2 = vision-language), given
either per token or as torchscale's ``split_position`` along the sequence dim. The weights of all
experts are stacked, ``(E, ...)``, and one ``mome.ops`` call handles every token whatever the layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mome import ops

VISION, LANGUAGE, VISION_LANGUAGE = 0, 1, 2


def modality_from_split(split_position: int, batch: int, seq: int, device: torch.device | str) -> Tensor:
    """``(batch, seq)`` int64 ids from torchscale's split position.

    -1: every token vision; 0: every token language; k > 0: tokens ``[:k]`` vision, ``[k:]`` language.
    """
    if isinstance(split_position, bool) or not isinstance(split_position, int):
        raise TypeError(f"split_position must be an int, got {type(split_position).__name__}")
    if split_position < -1 or split_position > seq:
        raise ValueError(f"split_position must lie in [-1, {seq}] (sequence length {seq}), got {split_position}")
    if split_position == -1:
        return torch.full((batch, seq), VISION, dtype=torch.int64, device=device)
    positions = torch.arange(seq, device=device)
    ids = torch.where(positions < split_position, VISION, LANGUAGE)  # [N]
    return ids.expand(batch, seq)


def resolve_modality(module_name: str, x: Tensor, modality: Tensor | None, split_position: int | None) -> Tensor:
    """Per-token ids ``x.shape[:-1]`` from either argument, flattened to ``(T,)`` int64."""
    if modality is not None and split_position is not None:
        raise ValueError(f"{module_name}: pass modality or split_position, not both")
    if modality is None:
        if x.dim() < 2:
            raise ValueError(f"{module_name}: split_position needs x of shape (..., N, D), got {tuple(x.shape)}")
        lead, seq = math.prod(x.shape[:-2]), x.shape[-2]
        modality = modality_from_split(split_position, lead, seq, x.device).reshape(x.shape[:-1])
    if not isinstance(modality, Tensor):
        raise TypeError(f"{module_name}: modality must be an int tensor, got {type(modality).__name__}")
    if modality.is_floating_point() or modality.dtype == torch.bool:
        raise TypeError(f"{module_name}: modality must hold integer ids, got dtype {modality.dtype}")
    if tuple(modality.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"{module_name}: modality must have shape {tuple(x.shape[:-1])} (x's shape without the feature dim), "
            f"got {tuple(modality.shape)}"
        )
    return modality.reshape(-1).to(torch.int64)


class _Multiway(nn.Module):
    """Shared behaviour: the expert count and torchscale's ``split_position`` attribute.

    torchscale sets ``split_position`` on every module that has the attribute before each forward
    (``set_split_position``); it is used when a forward gets neither ``modality`` nor ``split_position``.
    """

    def __init__(self, num_experts: int):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts
        self.split_position = -1

    def _ids(self, x: Tensor, modality: Tensor | None, split_position: int | None) -> Tensor:
        if modality is None and split_position is None:
            split_position = self.split_position
        return resolve_modality(type(self).__name__, x, modality, split_position)


class MultiwayLinear(_Multiway):
    """One ``nn.Linear`` per expert: weight ``(E, out_features, in_features)``, bias ``(E, out_features)``."""

    def __init__(self, in_features: int, out_features: int, num_experts: int = 2, bias: bool = True):
        super().__init__(num_experts)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for expert in range(self.num_experts):  # each expert initialised like nn.Linear
            nn.init.kaiming_uniform_(self.weight[expert], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self, x: Tensor, modality: Tensor | None = None, split_position: int | None = None, activation=None
    ) -> Tensor:
        """x ``(..., in_features)``; modality ``x.shape[:-1]`` ids or torchscale's split_position."""
        ids = self._ids(x, modality, split_position)
        out = ops.modality_linear(x.reshape(-1, self.in_features), ids, self.weight, self.bias, activation=activation)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.num_experts}, bias={self.bias is not None}"
        )


class MultiwayLayerNorm(_Multiway):
    """One LayerNorm per expert over the last dim: weight and bias ``(E, dim)``."""

    def __init__(self, dim: int, num_experts: int = 2, eps: float = 1e-5):
        super().__init__(num_experts)
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(num_experts, dim))
        self.bias = nn.Parameter(torch.zeros(num_experts, dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, modality: Tensor | None = None, split_position: int | None = None) -> Tensor:
        ids = self._ids(x, modality, split_position)
        out = ops.modality_layer_norm(x.reshape(-1, self.dim), ids, self.weight, self.bias, self.eps)
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, eps={self.eps}"


class ModalityFFN(_Multiway):
    """Expert feed-forward ``fc2(act(fc1(x)))`` per token, optionally with torchscale's sub-LayerNorm after the act.

    Without the sub-LayerNorm the whole FFN is one ``mome.ops.modality_ffn`` call (routing, bias and
    activation fused); with it, linear+act, then LayerNorm, then linear. Dropout (if any) acts after the
    activation and after fc2, like torchscale's FeedForwardNetwork.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int = 3,
        activation: str = "gelu",
        subln: bool = False,
        eps: float = 1e-5,
        dropout: float = 0.0,
    ):
        super().__init__(num_experts)
        if activation not in ("gelu", "gelu_tanh", "relu"):
            raise ValueError(f"activation must be 'gelu', 'gelu_tanh' or 'relu', got {activation!r}")
        self.dim, self.hidden_dim, self.activation, self.dropout = dim, hidden_dim, activation, dropout
        self.fc1 = MultiwayLinear(dim, hidden_dim, num_experts)
        self.ffn_layernorm = MultiwayLayerNorm(hidden_dim, num_experts, eps) if subln else None
        self.fc2 = MultiwayLinear(hidden_dim, dim, num_experts)

    def forward(self, x: Tensor, modality: Tensor | None = None, split_position: int | None = None) -> Tensor:
        ids = self._ids(x, modality, split_position)
        tokens = x.reshape(-1, self.dim)  # [T, D]
        dropping = self.dropout > 0 and self.training
        if self.ffn_layernorm is None and not dropping:
            fc1, fc2 = self.fc1, self.fc2
            out = ops.modality_ffn(tokens, ids, fc1.weight, fc1.bias, fc2.weight, fc2.bias, activation=self.activation)
        else:
            hidden = ops.modality_linear(tokens, ids, self.fc1.weight, self.fc1.bias, activation=self.activation)
            hidden = F.dropout(hidden, self.dropout, self.training)
            if self.ffn_layernorm is not None:
                norm = self.ffn_layernorm
                hidden = ops.modality_layer_norm(hidden, ids, norm.weight, norm.bias, norm.eps)
            out = ops.modality_linear(hidden, ids, self.fc2.weight, self.fc2.bias)
        out = F.dropout(out, self.dropout, self.training)
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
            f"activation={self.activation!r}, subln={self.ffn_layernorm is not None}"
        )
