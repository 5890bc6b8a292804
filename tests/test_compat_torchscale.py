"""mome.compat.torchscale against the real torchscale BEiT3 (pip install --no-deps torchscale)."""

from __future__ import annotations

import copy
import importlib.util
import sys
import types

import pytest
import torch

from mome.compat.torchscale import config_from_args, convert_state_dict, from_beit3, patch
from mome.models import MoMETransformer
from tests import torchvision_standin
from tests.helpers import TOLERANCE, assert_close


def _stand_in(name: str, **attributes) -> None:
    """Register a tiny module for an import torchscale makes but these tests never exercise."""
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        module_name = ".".join(parts[:depth])
        if module_name not in sys.modules:
            sys.modules[module_name] = types.ModuleType(module_name)
        if depth > 1:
            setattr(sys.modules[".".join(parts[: depth - 1])], parts[depth - 1], sys.modules[module_name])
    for key, value in attributes.items():
        setattr(sys.modules[name], key, value)


def _import_torchscale():
    if importlib.util.find_spec("torchscale") is None:
        pytest.skip("torchscale is not installed (pip install --no-deps torchscale==0.3.0)", allow_module_level=True)
    # torchscale imports timm only for drop_path (PyPI's timm pulls a CUDA torchvision that breaks the CPU torch)
    # and fairscale only for checkpoint/FSDP wrappers; drop_path is unused at drop_path_rate=0.
    if importlib.util.find_spec("timm") is None:
        _stand_in("timm.models.layers", drop_path=lambda x, drop_prob=0.0, training=False: x)
    else:  # the real timm (the integration tests install it) imports torchvision: stand in for it where it is unusable
        torchvision_standin.install_if_missing()
    if importlib.util.find_spec("fairscale") is None:
        _stand_in("fairscale.nn", checkpoint_wrapper=lambda module, **kwargs: module, wrap=lambda module, **kw: module)
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3

    return EncoderConfig, BEiT3


EncoderConfig, BEiT3 = _import_torchscale()


def _beit3(seed: int = 0, **overrides) -> torch.nn.Module:
    settings = dict(vocab_size=50, multiway=True, img_size=16, patch_size=8, encoder_embed_dim=32,
                    encoder_attention_heads=4, encoder_ffn_embed_dim=48, encoder_layers=2,
                    max_source_positions=20, no_output_layer=True)  # fmt: skip
    settings.update(overrides)
    torch.manual_seed(seed)
    model = BEiT3(EncoderConfig(**settings)).eval()
    with torch.no_grad():  # move every weight off its init (LayerNorms at 1/0 would hide an A/B mix-up)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def _inputs(batch: int = 3, length: int = 6):
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(50, (batch, length), generator=generator)
    images = torch.randn(batch, 3, 16, 16, generator=generator)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[1, 4:] = True
    padding[2, 2:] = True
    return text, images, padding


def _cases():
    text, images, padding = _inputs()
    masked = torch.zeros(3, 4, dtype=torch.bool)
    masked[0, 1] = True
    return {
        "image": dict(visual_tokens=images),
        "image_masked": dict(visual_tokens=images, vision_masked_position=masked),
        "text": dict(textual_tokens=text),
        "text_padded": dict(textual_tokens=text, text_padding_position=padding),
        "pair_padded": dict(textual_tokens=text, visual_tokens=images, text_padding_position=padding),
    }


@pytest.mark.parametrize("subln", [True, False])
def test_from_beit3_matches_torchscale_forward_and_backward(subln):
    theirs = _beit3(subln=subln)
    ours = from_beit3(theirs)
    assert isinstance(ours, MoMETransformer) and ours.config.layout == "beit3"
    for name, kwargs in _cases().items():
        expected = theirs(**kwargs)
        got = ours(**kwargs)
        assert_close(got["encoder_out"], expected["encoder_out"], TOLERANCE[torch.float32], name)
        assert got["multiway_split_position"] == expected["multiway_split_position"], name
        assert torch.equal(got["encoder_padding_mask"], expected["encoder_padding_mask"]), name
    kwargs = _cases()["pair_padded"]
    grad = torch.randn(3, 11, 32)
    theirs(**kwargs)["encoder_out"].backward(grad)
    ours(**kwargs)["encoder_out"].backward(grad)
    layer_theirs, layer_ours = theirs.encoder.layers[1], ours.layers[1]
    pairs = [
        ("q_proj", layer_theirs.self_attn.q_proj, layer_ours.attn.q_proj),
        ("fc1", layer_theirs.ffn, layer_ours.ffn.fc1),
        ("final_layer_norm", layer_theirs.final_layer_norm, layer_ours.norm2),
    ]
    for name, multiway, stacked in pairs:
        a_grad = multiway.A.fc1.weight.grad if name == "fc1" else multiway.A.weight.grad
        b_grad = multiway.B.fc1.weight.grad if name == "fc1" else multiway.B.weight.grad
        assert_close(stacked.weight.grad, torch.stack([a_grad, b_grad]), 1e-4, f"d{name}.weight")
    assert_close(ours.text_embed.weight.grad, theirs.text_embed.weight.grad, 1e-4, "dtext_embed")


def test_load_state_dict_converts_torchscale_keys():
    theirs = _beit3(seed=2)
    ours = MoMETransformer(config_from_args(theirs.args)).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: every key converted, none left over
    text, images, padding = _inputs()
    expected = theirs(textual_tokens=text, visual_tokens=images, text_padding_position=padding)["encoder_out"]
    assert_close(ours.encode_pair(images, text, padding).hidden, expected, TOLERANCE[torch.float32])
    converted = convert_state_dict(theirs.state_dict())
    assert converted["layers.0.attn.k_proj.weight"].shape == (2, 32, 32)
    assert torch.equal(converted["layers.0.attn.k_proj.weight"][1], theirs.encoder.layers[0].self_attn.k_proj.B.weight)
    assert converted["vision_pos_embed"].shape == (1, 5, 32) and converted["text_pos_embed"].shape == (1, 18, 32)


def test_output_projection_is_kept():
    theirs = _beit3(seed=3, no_output_layer=False)
    ours = from_beit3(theirs)
    text, images, padding = _inputs()
    kwargs = dict(textual_tokens=text, visual_tokens=images, text_padding_position=padding)
    expected = theirs(**kwargs)["encoder_out"]
    assert expected.shape[-1] == 50
    assert_close(ours(**kwargs)["encoder_out"], expected, TOLERANCE[torch.float32])


def test_patch_swaps_layers_in_place_and_keeps_outputs():
    theirs = _beit3(seed=4)
    patched = patch(copy.deepcopy(theirs))
    layer = patched.encoder.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == "MultiwayLinear"
    assert type(layer.ffn).__name__ == "ModalityFFN"
    assert type(layer.final_layer_norm).__name__ == "MultiwayLayerNorm"
    assert type(layer.self_attn).__name__ == "FusedMultiheadAttention"
    assert "encoder.layers.0.self_attn.q_proj.weight" in patched.state_dict()
    for name, kwargs in _cases().items():
        expected = theirs(**kwargs)["encoder_out"]
        assert_close(patched(**kwargs)["encoder_out"], expected, TOLERANCE[torch.float32], name)


def test_unsupported_configs_are_named():
    with pytest.raises(ValueError, match="deepnorm"):
        from_beit3(_beit3(deepnorm=True))
    with pytest.raises(ValueError, match="xpos_rel_pos"):
        from_beit3(_beit3(xpos_rel_pos=True))
    ours = from_beit3(_beit3())
    with pytest.raises(NotImplementedError, match="attn_mask"):
        ours(textual_tokens=torch.zeros(1, 3, dtype=torch.int64), attn_mask=torch.zeros(3, 3))


def test_relative_position_buckets_convert_and_match_torchscale():
    theirs = _beit3(seed=5, rel_pos_buckets=8, max_rel_pos=12)
    ours = from_beit3(theirs)
    config = ours.config
    assert (config.relative_position, config.rel_pos_buckets, config.max_rel_pos) == ("buckets", 8, 12)
    weight = ours.relative_position.relative_attention_bias.weight
    assert torch.equal(weight, theirs.encoder.relative_position.relative_attention_bias.weight)
    patched = patch(copy.deepcopy(theirs))
    for name, kwargs in _cases().items():
        expected = theirs(**kwargs)["encoder_out"]
        assert_close(ours(**kwargs)["encoder_out"], expected, TOLERANCE[torch.float32], name)
        assert_close(patched(**kwargs)["encoder_out"], expected, TOLERANCE[torch.float32], f"patched {name}")
    kwargs = _cases()["pair_padded"]
    grad = torch.randn(3, 11, 32)
    theirs(**kwargs)["encoder_out"].backward(grad)
    ours(**kwargs)["encoder_out"].backward(grad)
    theirs_grad = theirs.encoder.relative_position.relative_attention_bias.weight.grad
    assert theirs_grad.abs().max() > 0
    assert_close(weight.grad, theirs_grad, 1e-4, "drelative_attention_bias")


def test_attention_dropout_converts_and_is_off_in_eval():
    theirs = _beit3(seed=6, attention_dropout=0.3)
    ours = from_beit3(theirs)
    assert ours.config.attention_dropout == 0.3 and all(layer.attn.dropout == 0.3 for layer in ours.layers)
    kwargs = _cases()["pair_padded"]
    assert_close(ours(**kwargs)["encoder_out"], theirs(**kwargs)["encoder_out"], TOLERANCE[torch.float32])
