"""mome.integrations.timm against the real library: small random-weight ViT, EVA (RoPE) and latent-pooling models.

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


def test_attention_dropout_while_training_falls_back(tally):
    _, ours = _pair("vit_tiny_patch16_224", img_size=32, patch_size=8, attn_drop_rate=0.2)
    ours.train()(torch.randn(2, 3, 32, 32))
    assert tally.fused == 0 and tally.fallbacks == {"attention dropout (dropout_p > 0)": 2}


def test_beit_blocks_are_left_as_they_are_and_say_why(tally):
    model = timm.create_model("beit_base_patch16_224", **SMALL, img_size=32, embed_dim=32, num_heads=4)
    mtimm.patch(model)  # logs the reason once
    assert tally.fallbacks == {mtimm.BEIT_REASON: 2}
    assert type(model.blocks[0].attn).__module__ == "timm.models.beit"
    model(torch.randn(1, 3, 32, 32))
    assert tally.fused == 0


def test_patch_checks_its_argument():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        mtimm.patch("vit")
