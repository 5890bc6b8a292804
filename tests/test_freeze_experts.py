"""freeze_experts: a frozen expert's rows of the stacked weights get no gradient and no optimizer update."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mome.models import MoMETransformer, vlmo_tiny
from mome.nn import (
    LANGUAGE,
    VISION,
    VISION_LANGUAGE,
    ModalityFFN,
    MultiwayLayerNorm,
    MultiwayLinear,
    freeze_experts,
    unfreeze_experts,
)


def _stacked(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every stacked ``(E, ...)`` parameter of the multiway modules, by name."""
    multiway = (MultiwayLinear, MultiwayLayerNorm)
    return {
        f"{prefix}.{name}".strip("."): param
        for prefix, module in model.named_modules()
        if isinstance(module, multiway)
        for name, param in module.named_parameters(recurse=False)
    }


def _modality_model(kind: str) -> tuple[nn.Module, callable]:
    """A module and a loss over tokens of every expert it has."""
    torch.manual_seed(0)
    if kind == "transformer":
        model = MoMETransformer(vlmo_tiny(depth=2, vl_layers=1, image_size=16, patch_size=8))
        images, text = torch.randn(3, 3, 16, 16), torch.randint(4, 128, (3, 5))

        def loss():  # a VL expert in the top layer only sees fused input, its V / L experts only one modality
            outputs = model.encode_pair(images, text), model.encode_image(images), model.encode_text(text)
            return sum(output.hidden.square().mean() for output in outputs)

        return model, loss
    model = {
        "linear": lambda: MultiwayLinear(6, 5, num_experts=3),
        "layer_norm": lambda: MultiwayLayerNorm(6, num_experts=3),
        "ffn": lambda: ModalityFFN(6, 10, num_experts=3, subln=True),
    }[kind]()
    with torch.no_grad():  # LayerNorms start at 1 / 0: move them off so that decay and gradients show
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    x = torch.randn(4, 7, 6)
    ids = torch.arange(28).reshape(4, 7) % 3
    target = torch.randn(4, 7, 5 if kind == "linear" else 6)
    return model, lambda: (model(x, ids) - target).square().mean()


def _steps(model, loss, optimizer, count: int) -> None:
    for _ in range(count):
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()


@pytest.mark.parametrize("kind", ["linear", "layer_norm", "ffn", "transformer"])
@pytest.mark.parametrize("frozen", [VISION, "language"])
def test_frozen_expert_is_bit_identical_after_adamw_steps(kind, frozen):
    model, loss = _modality_model(kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _steps(model, loss, optimizer, 2)  # momentum built up before freezing must not move the frozen rows either
    row = frozen if isinstance(frozen, int) else LANGUAGE
    names = freeze_experts(model, experts=frozen, optimizer=optimizer)
    assert set(names) == set(_stacked(model))
    before = {name: param.detach().clone() for name, param in _stacked(model).items()}
    _steps(model, loss, optimizer, 4)
    for name, param in _stacked(model).items():
        assert torch.equal(param[row], before[name][row]), f"{name}: frozen expert {row} moved"
        for other in set(range(param.shape[0])) - {row}:
            assert not torch.equal(param[other], before[name][other]), f"{name}: expert {other} did not train"
        for state_name, state in optimizer.state[param].items():
            if state.shape == param.shape:
                assert not state[row].any(), f"{name}: optimizer {state_name} remembers the frozen expert"


@pytest.mark.parametrize("kind", ["linear", "layer_norm", "ffn", "transformer"])
def test_frozen_slices_get_zero_gradient(kind):
    model, loss = _modality_model(kind)
    freeze_experts(model, experts=[VISION, "vision-language"])
    loss().backward()
    for name, param in _stacked(model).items():
        frozen = [VISION, VISION_LANGUAGE][: param.shape[0] - 1]
        assert not param.grad[frozen].any(), f"{name}: a frozen expert got a gradient"
        assert param.grad[LANGUAGE].abs().sum() > 0, f"{name}: the language expert got no gradient"


def test_without_the_optimizer_only_gradients_are_masked():
    model, loss = _modality_model("linear")
    freeze_experts(model, experts=VISION)
    before = model.weight.detach().clone()
    _steps(model, loss, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), 1)
    assert not torch.equal(model.weight[VISION], before[VISION]), "AdamW's weight decay moves a zero-gradient row"
    model, loss = _modality_model("linear")
    freeze_experts(model, experts=VISION)
    before = model.weight.detach().clone()
    _steps(model, loss, torch.optim.SGD(model.parameters(), lr=1e-1), 2)
    assert torch.equal(model.weight[VISION], before[VISION]), "plain SGD with a zero gradient must not move it"


def test_unfreeze_lets_the_expert_train_again():
    model, loss = _modality_model("ffn")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    freeze_experts(model, experts=["vision", "language"], optimizer=optimizer)
    freeze_experts(model, experts="vision", optimizer=optimizer)  # again: idempotent, no second hooks
    unfreeze_experts(model, experts="language")
    weight = model.fc1.weight
    before = weight.detach().clone()
    _steps(model, loss, optimizer, 2)
    assert torch.equal(weight[VISION], before[VISION])
    assert not torch.equal(weight[LANGUAGE], before[LANGUAGE]), "the unfrozen expert should train"
    unfreeze_experts(model)
    optimizer.zero_grad(set_to_none=True)
    loss().backward()
    assert weight.grad[VISION].abs().sum() > 0, "after unfreeze_experts(model) every expert gets its gradient"
    before = weight.detach().clone()
    optimizer.step()
    assert not torch.equal(weight[VISION], before[VISION])


def test_a_deepcopy_comes_out_unfrozen():
    model = MultiwayLinear(4, 3, num_experts=2)
    freeze_experts(model, experts="vision")
    twin = copy.deepcopy(model)  # e.g. ALBEF's momentum model: the copy holds no hooks, so nothing of it is frozen
    x, ids = torch.randn(6, 4), torch.arange(6) % 2
    model(x, ids).sum().backward()
    twin(x, ids).sum().backward()
    assert not model.weight.grad[VISION].any() and twin.weight.grad[VISION].abs().sum() > 0
    unfreeze_experts(twin)  # nothing to undo there; the original stays frozen
    model.weight.grad = None
    model(x, ids).sum().backward()
    assert not model.weight.grad[VISION].any()


def test_the_vl_expert_is_skipped_where_a_layer_has_none():
    model, _ = _modality_model("transformer")
    names = freeze_experts(model, experts="vision-language")
    assert names and all(name.startswith("layers.1.") for name in names), names  # only the top layer has it


@pytest.mark.parametrize(
    ("experts", "error", "message"),
    [
        (3, ValueError, r"experts: index 3 is out of range \[0, 3\)"),
        (-1, ValueError, r"experts: index -1 is out of range \[0, 3\)"),
        ("audio", ValueError, r"experts: unknown expert name 'audio'.*'vision' \(0\), 'language' \(1\)"),
        ([], ValueError, "at least one expert"),
        (True, TypeError, "experts must hold int indices or names"),
        (1.0, TypeError, "experts must be an int, a name or a sequence"),
    ],
)
def test_bad_experts_are_named(experts, error, message):
    model, _ = _modality_model("ffn")
    with pytest.raises(error, match=message):
        freeze_experts(model, experts=experts)


def test_bad_model_and_optimizer_are_named():
    two = MultiwayLinear(4, 4, num_experts=2)
    with pytest.raises(ValueError, match=r"index 2 is out of range \[0, 2\)"):
        freeze_experts(two, experts=2)
    with pytest.raises(ValueError, match="unknown expert name 'vision-language'"):
        freeze_experts(two, experts="vision-language")
    with pytest.raises(ValueError, match="no multiway module"):
        freeze_experts(nn.Linear(4, 4), experts=0)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        freeze_experts("model", experts=0)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        freeze_experts(two, experts=0, optimizer=[two.weight])
