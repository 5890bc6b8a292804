"""mome.integrations.timm against the real library: small random-weight ViT, EVA (RoPE), latent-pooling and BEiT
(relative position bias) models.

timm imports torchvision when it loads; where no torchvision imports beside this torch (PyPI's does not beside the
CPU build), tests/torchvision_standin.py stands in for it: the models built here never use its code.
"""

import copy

import pytest
import torch

from tests import torchvision_standin

torchvision_standin.install_if_missing()
timm = pytest.importorskip("timm")

import mome.integrations.timm as mtimm  # noqa: E402
import mome.nn.masks as masks  # noqa: E402
import mome.ops  # noqa: E402
from mome import settings  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.integration_helpers import assert_grads_close, spread_weights  # noqa: E402

SMALL = dict(pretrained=False, num_classes=5, depth=2)


@pytest.fixture(autouse=True)
def tally():
    mtimm.TALLY.reset()
    return mtimm.TALLY


def _pair(name, **kwargs):
    torch.manual_seed(0)
    reference = spread_weights(timm.create_model(name, **SMALL, **kwargs).eval())
    return reference, mtimm.patch(copy.deepcopy(reference))


def _check(reference, ours, size, tol):
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    expected, actual = reference(images), ours(images)
    assert_close(actual, expected, tol, "logits")
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2))
    (expected * weights).sum().backward()
    (actual * weights).sum().backward()
    assert_grads_close(reference, ours, tol)


MODELS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8), 32, 2),
    "vit-map-pool": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, global_pool="map"), 32, 3),
    "eva-rope": ("eva02_tiny_patch14_224", dict(img_size=28), 28, 2),
}


@pytest.mark.parametrize("model", MODELS)
def test_patched_models_match_and_run_fused(model, tally):
    name, kwargs, size, calls = MODELS[model]
    reference, ours = _pair(name, **kwargs)
    _check(reference, ours, size, 1e-6)
    assert tally.fused == calls and not tally.fallbacks


def test_eva_on_the_triton_kernels(tally):
    reference, ours = _pair("eva02_tiny_patch14_224", img_size=28)
    with settings.override(backend="triton"):
        _check(reference, ours, 28, 1e-4)
    assert tally.fused == 2


def test_attention_dropout_while_training_runs_fused(tally):
    reference, ours = _pair("vit_tiny_patch16_224", img_size=32, patch_size=8, attn_drop_rate=0.2)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert_close(ours(images), reference(images), 1e-6, "eval logits")  # eval: no dropout, timm's own result
    ours.train()

    def run(seed):
        torch.manual_seed(seed)
        return ours(images)

    first = run(5)
    assert tally.fused == 2 + 2 and not tally.fallbacks  # eval, then training
    assert torch.equal(run(5), first) and not torch.allclose(run(6), first)
    assert not torch.allclose(first, reference.train()(images))  # the dropout masks differ from torch's
    first.sum().backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)


BEIT = dict(img_size=32, embed_dim=32, num_heads=4)


def _beit_pair(**kwargs):
    torch.manual_seed(0)
    reference = spread_weights(timm.create_model("beit_base_patch16_224", **SMALL, **BEIT, **kwargs).eval())
    with torch.no_grad():  # timm's init (std 0.02) makes the bias nearly zero: make it matter
        for name, p in reference.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(generator=torch.Generator().manual_seed(4))
    return reference, mtimm.patch(copy.deepcopy(reference))


@pytest.mark.parametrize("shared", [False, True], ids=["per-layer-bias", "shared-bias"])
def test_beit_relative_position_bias_runs_as_the_op_bias(shared, tally, monkeypatch):
    kwargs = dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True) if shared else {}
    reference, ours = _beit_pair(**kwargs)
    monkeypatch.setattr(masks, "recognise", lambda *a: pytest.fail("a relative position bias was read back"))
    spy_calls = []
    attention = mome.ops.attention
    monkeypatch.setattr(mome.ops, "attention", lambda *a, **k: spy_calls.append(k) or attention(*a, **k))
    _check(reference, ours, 32, 1e-6)
    assert tally.fused == 2 and not tally.fallbacks
    assert all(k["attn_bias"] is not None and k["attn_bias"].requires_grad for k in spy_calls)
    with torch.no_grad():  # no gradient: the bias is still known as one, not read
        ours(torch.randn(1, 3, 32, 32))
    assert tally.fused == 4


def test_beit_on_the_triton_kernels(tally):
    reference, ours = _beit_pair()
    with settings.override(backend="triton"):
        _check(reference, ours, 32, 1e-4)
    assert tally.fused == 2


def test_beit_with_attention_dropout_runs_fused(tally):
    reference, ours = _beit_pair(attn_drop_rate=0.3)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert_close(ours(images), reference(images), 1e-6, "eval logits")
    torch.manual_seed(3)
    ours.train()(images).sum().backward()
    assert tally.fused == 4 and not tally.fallbacks
    table = ours.blocks[0].attn.relative_position_bias_table
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_patch_checks_its_argument():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        mtimm.patch("vit")
