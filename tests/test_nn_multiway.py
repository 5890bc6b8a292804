"""mome.nn multiway layers vs plain-torch per-expert modules (torchscale's split / run / concatenate)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mome.nn import LANGUAGE, VISION, ModalityFFN, MultiwayLayerNorm, MultiwayLinear, modality_from_split
from tests.helpers import TOLERANCE, assert_close

DTYPES = [torch.float64, torch.float32]


def _ids(kind: str, batch: int, seq: int, experts: int, generator: torch.Generator) -> torch.Tensor | int:
    """Token layouts: torchscale split positions, interleaved ids, and one with an empty expert."""
    if kind.startswith("split"):
        return int(kind[len("split") :])
    if kind == "interleaved":
        return torch.randint(experts, (batch, seq), generator=generator)
    if kind == "empty_expert":  # only the last expert
        return torch.full((batch, seq), experts - 1, dtype=torch.int64)
    raise AssertionError(kind)


def _per_expert(functions, x: torch.Tensor, ids) -> torch.Tensor:
    """Plain torch: split at a position (torchscale) or gather/scatter by ids, expert e runs functions[e]."""
    if isinstance(ids, int):
        if ids == -1:
            return functions[0](x)
        if ids == 0:
            return functions[1](x)
        return torch.cat([functions[0](x[:, :ids]), functions[1](x[:, ids:])], dim=1)
    rows = [functions[e](x[ids == e]) for e in range(len(functions))]
    out = x.new_zeros(*x.shape[:-1], rows[0].shape[-1])
    for e, r in enumerate(rows):
        out = out.index_put((ids == e).nonzero(as_tuple=True), r)
    return out


def _check_grads(ours: nn.Module, theirs: list[nn.Module], x: torch.Tensor, ids, tol: float, param_map) -> None:
    x_ours = x.clone().requires_grad_()
    x_theirs = x.clone().requires_grad_()
    out_ours = ours(x_ours, split_position=ids) if isinstance(ids, int) else ours(x_ours, ids)
    out_theirs = _per_expert(theirs, x_theirs, ids)
    assert_close(out_ours, out_theirs, tol, "forward")
    grad = torch.randn_like(out_theirs)
    out_ours.backward(grad)
    out_theirs.backward(grad)
    assert_close(x_ours.grad, x_theirs.grad, tol, "dx")
    for name, stacked, per_expert in param_map(ours, theirs):
        expected = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in per_expert])
        assert_close(stacked.grad, expected, tol, f"d{name}")


def _linear_params(ours, theirs):
    return [("weight", ours.weight, [m.weight for m in theirs]), ("bias", ours.bias, [m.bias for m in theirs])]


LAYOUTS = ["split-1", "split0", "split3", "interleaved", "empty_expert"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_multiway_linear_matches_per_expert_linears(dtype, layout):
    generator = torch.Generator().manual_seed(1)
    experts = 2 if layout.startswith("split") else 3
    ours = MultiwayLinear(13, 7, experts).to(dtype)
    theirs = [nn.Linear(13, 7).to(dtype) for _ in range(experts)]
    with torch.no_grad():
        for e, m in enumerate(theirs):
            m.weight.copy_(ours.weight[e])
            m.bias.copy_(ours.bias[e])
    x = torch.randn(3, 9, 13, dtype=dtype, generator=generator)
    _check_grads(ours, theirs, x, _ids(layout, 3, 9, experts, generator), TOLERANCE[dtype], _linear_params)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_multiway_layer_norm_matches_per_expert_layer_norms(dtype, layout):
    generator = torch.Generator().manual_seed(2)
    experts = 2 if layout.startswith("split") else 3
    ours = MultiwayLayerNorm(11, experts, eps=1e-6).to(dtype)
    with torch.no_grad():  # non-trivial gamma / beta so a swapped expert shows
        ours.weight.copy_(torch.randn(experts, 11, generator=generator))
        ours.bias.copy_(torch.randn(experts, 11, generator=generator))
    theirs = [nn.LayerNorm(11, eps=1e-6).to(dtype) for _ in range(experts)]
    with torch.no_grad():
        for e, m in enumerate(theirs):
            m.weight.copy_(ours.weight[e])
            m.bias.copy_(ours.bias[e])
    x = torch.randn(2, 10, 11, dtype=dtype, generator=generator) * 3 + 1
    _check_grads(ours, theirs, x, _ids(layout, 2, 10, experts, generator), TOLERANCE[dtype], _linear_params)


class _TorchscaleFFN(nn.Module):
    """torchscale's FeedForwardNetwork: fc1, GELU, optional LayerNorm, fc2."""

    def __init__(self, dim, hidden, subln):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.ffn_layernorm = nn.LayerNorm(hidden) if subln else None

    def forward(self, x):
        x = F.gelu(self.fc1(x))
        if self.ffn_layernorm is not None:
            x = self.ffn_layernorm(x)
        return self.fc2(x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("subln", [False, True])
@pytest.mark.parametrize("layout", ["split5", "interleaved", "empty_expert"])
def test_modality_ffn_matches_per_expert_ffns(dtype, subln, layout):
    generator = torch.Generator().manual_seed(3)
    experts = 2 if layout.startswith("split") else 3
    ours = ModalityFFN(12, 20, experts, subln=subln).to(dtype)
    theirs = [_TorchscaleFFN(12, 20, subln).to(dtype) for _ in range(experts)]
    with torch.no_grad():
        if subln:
            ours.ffn_layernorm.weight.copy_(torch.randn(experts, 20, generator=generator))
            ours.ffn_layernorm.bias.copy_(torch.randn(experts, 20, generator=generator))
        for e, m in enumerate(theirs):
            for name in ("fc1", "fc2") + (("ffn_layernorm",) if subln else ()):
                getattr(m, name).weight.copy_(getattr(ours, name).weight[e])
                getattr(m, name).bias.copy_(getattr(ours, name).bias[e])

    def params(ours, theirs):
        names = ("fc1", "fc2") + (("ffn_layernorm",) if subln else ())
        out = []
        for name in names:
            for attr in ("weight", "bias"):
                stacked = getattr(getattr(ours, name), attr)
                out.append((f"{name}.{attr}", stacked, [getattr(getattr(m, name), attr) for m in theirs]))
        return out

    x = torch.randn(2, 8, 12, dtype=dtype, generator=generator)
    _check_grads(ours, theirs, x, _ids(layout, 2, 8, experts, generator), TOLERANCE[dtype], params)


def test_modality_from_split_follows_torchscale():
    assert (modality_from_split(-1, 2, 5, "cpu") == VISION).all()
    assert (modality_from_split(0, 2, 5, "cpu") == LANGUAGE).all()
    ids = modality_from_split(3, 2, 5, "cpu")
    assert ids.tolist() == [[0, 0, 0, 1, 1]] * 2
    assert (modality_from_split(5, 1, 5, "cpu") == VISION).all()


def test_split_position_attribute_drives_forward_like_torchscale():
    layer = MultiwayLinear(4, 4, 2)
    x = torch.randn(2, 6, 4)
    layer.split_position = 2  # what torchscale's set_split_position does before each forward
    assert torch.equal(layer(x), layer(x, split_position=2))
    assert torch.equal(layer(x), layer(x, modality_from_split(2, 2, 6, "cpu")))


def test_bad_inputs_raise_clear_errors():
    layer = MultiwayLinear(4, 3, 2)
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="not both"):
        layer(x, torch.zeros(2, 5, dtype=torch.int64), split_position=1)
    with pytest.raises(ValueError, match=r"modality must have shape \(2, 5\)"):
        layer(x, torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer ids"):
        layer(x, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="split_position must lie in"):
        layer(x, split_position=9)
    with pytest.raises(ValueError, match="modality"):  # id 2 with only 2 experts: from mome.ops
        layer(x, torch.full((2, 5), 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="activation"):
        ModalityFFN(4, 8, 2, activation="swish")
