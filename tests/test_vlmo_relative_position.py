"""VLMo's relative position bias and attention dropout inside mome's layer and model, against VLMo's block
re-typed in plain torch (softmax(q kᵀ·scale + rel_pos_bias) v, as VLMo's Attention computes it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mome import settings
from mome.models import MoMEConfig, MoMETransformer, beit3_tiny, vlmo_base, vlmo_large, vlmo_tiny
from mome.nn import MoMELayer, MultiwaySelfAttention, RelativePositionBias, SharedSelfAttention
from mome.ops.attention import BACKENDS as ATTENTION_BACKENDS
from tests.helpers import assert_close, usable_backends
from tests.test_relative_position import _loop_vlmo_index

VISION, LANGUAGE, VL = 0, 1, 2
# the Triton kernels too where they run (the interpreter here); native has no bias gradient, so auto passes it by
BACKENDS = ["auto"] + [b for b in usable_backends(ATTENTION_BACKENDS) if b in ("reference", "triton")]


def _plain_attention(attn: SharedSelfAttention, x, keep, rel_pos_bias):
    """VLMo's Attention.forward: keep ``(B, N)`` bool True = attend; rel_pos_bias ``(H, N, N)``."""
    batch, seq, dim = x.shape
    qkv_bias = torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias])
    qkv = F.linear(x, attn.qkv.weight, qkv_bias).reshape(batch, seq, 3, attn.heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (dim // attn.heads) ** -0.5
    scores = q @ k.transpose(-2, -1) + rel_pos_bias.unsqueeze(0)
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, seq, dim)
    return attn.proj(out)


def _plain_mlp(layer: MoMELayer, x, expert: int):
    """norm2_<expert> then mlp_<expert> (fc1, GELU, fc2) with the expert's slice of mome's stacked weights."""
    h = F.layer_norm(x, x.shape[-1:], layer.norm2.weight[expert], layer.norm2.bias[expert], layer.norm2.eps)
    h = F.gelu(F.linear(h, layer.ffn.fc1.weight[expert], layer.ffn.fc1.bias[expert]))
    return F.linear(h, layer.ffn.fc2.weight[expert], layer.ffn.fc2.bias[expert])


def _plain_block(layer: MoMELayer, x, keep, modality_type: str, rel_pos_bias, n_text: int):
    """VLMo's Block.forward: modality_type "image", "text" or "vl" (text first, n_text tokens)."""
    h = F.layer_norm(x, x.shape[-1:], layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    x = x + layer.gamma_1 * _plain_attention(layer.attn, h, keep, rel_pos_bias)
    if modality_type == "image":
        return x + layer.gamma_2 * _plain_mlp(layer, x, VISION)
    if modality_type == "text":
        return x + layer.gamma_2 * _plain_mlp(layer, x, LANGUAGE)
    if not layer.vl_ffn:
        text, image = x[:, :n_text], x[:, n_text:]
        text = text + layer.gamma_2 * _plain_mlp(layer, text, LANGUAGE)
        image = image + layer.gamma_2 * _plain_mlp(layer, image, VISION)
        return torch.cat([text, image], dim=1)
    return x + layer.gamma_2 * _plain_mlp(layer, x, VL)


def _vlmo_rel_pos_biases(table, index, layers: int):
    """VLMo's get_rel_pos_bias: one embedding lookup of every layer's heads, chunked per layer."""
    values = F.embedding(index, table).permute(2, 0, 1).contiguous()  # [layers·H, N, N]
    return torch.chunk(values, layers, dim=0)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3)


LAYER_CASES = [  # (modality type, vl_ffn, text tokens, image grid)
    ("vl", False, 5, (2, 3)),
    ("vl", True, 4, (3, 3)),
    ("text", False, 6, (2, 3)),
    ("image", True, 0, (3, 2)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("modality_type,vl_ffn,n_text,grid", LAYER_CASES)
def test_layer_with_bias_matches_plain_vlmo_block(backend, modality_type, vl_ffn, n_text, grid):
    dim, heads, layers, table_len = 16, 2, 3, 7
    layer = MoMELayer(dim, heads, 2.0, layout="vlmo", vl_ffn=vl_ffn, layer_scale_init=0.5)
    rel = RelativePositionBias(heads, grid, text_table_len=table_len, layers=layers)
    _randomise(layer, 0)
    _randomise(rel, 1)
    n_image = 0 if modality_type == "text" else 1 + grid[0] * grid[1]
    n_text = n_text if modality_type != "image" else 0
    seq = n_text + n_image
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, seq, dim, generator=generator, requires_grad=True)
    modality = torch.tensor([LANGUAGE] * n_text + [VISION] * n_image).expand(2, seq)
    padding = None
    if n_text > 2:
        padding = torch.zeros(2, seq, dtype=torch.bool)
        padding[1, n_text - 2 : n_text] = True  # the end of sample 1's text
    with settings.override(backend=backend):
        out = layer(x, modality, padding, fused=modality_type == "vl", attn_bias=rel(n_text, n_image, layer=1))
    index = _loop_vlmo_index(*grid, table_len, n_text, n_image > 0)
    bias = _vlmo_rel_pos_biases(rel.relative_position_bias_table, index, layers)[1]
    keep = None if padding is None else ~padding
    expected = _plain_block(layer, x, keep, modality_type, bias, n_text)
    assert_close(out, expected, 1e-6)
    grad = torch.randn(out.shape, generator=generator)
    params = [x, rel.relative_position_bias_table, layer.attn.qkv.weight]
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(expected, params, grad)
    for name, a, b in zip(["x", "relative_position_bias_table", "qkv.weight"], got, want, strict=True):
        assert_close(a, b, 1e-5, f"d{name}")
    assert got[1][:, heads : 2 * heads].abs().max() > 0 and not got[1][:, :heads].any()  # layer 1's columns only


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_plain_vlmo_with_every_layers_bias(backend):
    config = vlmo_tiny(depth=3, vl_layers=1, dim=32, heads=2, image_size=24, max_text_len=7)
    model = MoMETransformer(config).eval()
    _randomise(model, 3)
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 24, 24, generator=generator)
    text = torch.randint(config.vocab_size, (2, 6), generator=generator)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, 4:] = True
    table = model.relative_position.relative_position_bias_table
    grid = (3, 3)
    for kind in ("pair", "image", "text"):
        with settings.override(backend=backend):
            if kind == "pair":
                got = model.encode_pair(images, text, padding).hidden
            elif kind == "image":
                got = model.encode_image(images).hidden
            else:
                got = model.encode_text(text, padding).hidden
        parts, keep, n_text = [], [], 0
        if kind != "image":
            parts.append(model.embed_text(text, padding))
            keep.append(~padding)
            n_text = 6
        if kind != "text":
            parts.append(model.embed_image(images))
            keep.append(torch.ones(2, 10, dtype=torch.bool))
        x, keep = torch.cat(parts, dim=1), torch.cat(keep, dim=1)
        index = _loop_vlmo_index(*grid, 7, n_text, kind != "text")
        biases = _vlmo_rel_pos_biases(table, index, config.depth)
        modality_type = {"pair": "vl", "image": "image", "text": "text"}[kind]
        for layer, bias in zip(model.layers, biases, strict=True):
            x = _plain_block(layer, x, keep, modality_type, bias, n_text)
        expected = model.norm(x)
        assert_close(got, expected, 1e-6, kind)
        grad = torch.randn(got.shape, generator=generator)
        (d_got,) = torch.autograd.grad(got, table, grad)
        (d_want,) = torch.autograd.grad(expected, table, grad)
        assert_close(d_got, d_want, 1e-5, f"{kind}: drelative_position_bias_table")


def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    shared = SharedSelfAttention(16, 2, dropout=1.0)
    multiway = MultiwaySelfAttention(16, 2, dropout=1.0)
    _randomise(shared, 5)
    _randomise(multiway, 6)
    x = torch.randn(2, 7, 16)
    modality = torch.tensor([1] * 3 + [0] * 4).expand(2, 7)
    plain_shared, plain_multiway = SharedSelfAttention(16, 2), MultiwaySelfAttention(16, 2)
    plain_shared.load_state_dict(shared.state_dict())
    plain_multiway.load_state_dict(multiway.state_dict())
    # every probability dropped: the attention output is zero, leaving the output projection's bias
    assert_close(shared(x), shared.proj.bias.expand(2, 7, 16), 1e-6, "shared, p=1")
    zero = multiway.out_proj(multiway.inner_attn_ln(torch.zeros(2, 7, 16), modality), modality)
    assert_close(multiway(x, modality), zero, 1e-6, "multiway, p=1")
    shared.eval(), multiway.eval()
    assert torch.equal(shared(x), plain_shared(x)) and torch.equal(multiway(x, modality), plain_multiway(x, modality))
    shared.train().dropout = 0.4
    torch.manual_seed(1)
    first = shared(x)
    torch.manual_seed(1)
    assert torch.equal(shared(x), first)  # the mask comes from torch's generator
    assert not torch.allclose(first, plain_shared(x))
    with pytest.raises(ValueError, match=r"dropout \(attention dropout probability\) must be a float in \[0, 1\]"):
        SharedSelfAttention(16, 2, dropout=1.5)


def test_config_wires_bias_and_dropout_into_the_model():
    model = MoMETransformer(vlmo_tiny(depth=2, attention_dropout=0.25))
    assert all(layer.attn.dropout == 0.25 for layer in model.layers)
    keys = set(model.state_dict())
    assert "relative_position.relative_position_bias_table" in keys and "vision_pos_embed" not in keys
    assert model.relative_position.relative_position_bias_table.shape == ((2 * 4 - 1) ** 2 + 3 + 2 + 2 * 16, 4 * 2)
    assert vlmo_base().relative_position == "vlmo" and vlmo_large().rel_pos_text_len == 196
    base_rows = (2 * 14 - 1) ** 2 + 3 + 2 * 196 + 2  # VLMo-Base's all_num_relative_distance
    assert base_rows == 1126 and vlmo_base().absolute_position is False
    # configs without relative position keep their keys
    beit3 = set(MoMETransformer(beit3_tiny()).state_dict())
    assert not any("relative" in key for key in beit3) and {"vision_pos_embed", "text_pos_embed"} <= beit3
    plain_vlmo = MoMETransformer(vlmo_tiny(depth=1, relative_position=None, absolute_position=True))
    assert plain_vlmo.relative_position is None and "text_pos_embed" in plain_vlmo.state_dict()
    x, modality = torch.randn(1, 3, 64), torch.ones(1, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="pass attn_biases=model.attention_biases"):
        model.run_layers(x, modality, None, fused=False)
    with pytest.raises(ValueError, match=r"one bias per layer \(2\), got 1"):
        model.run_layers(x, modality, None, fused=False, attn_biases=model.attention_biases(3, 0)[:1])


def test_relative_position_config_errors():
    with pytest.raises(ValueError, match="relative_position must be one of"):
        MoMEConfig(relative_position="rope")
    with pytest.raises(ValueError, match="relative_position='vlmo' needs layout='vlmo'"):
        beit3_tiny(relative_position="vlmo")
    with pytest.raises(ValueError, match="rel_pos_text_len must be an int >= max_text_len = 40"):
        vlmo_base(rel_pos_text_len=20)
    with pytest.raises(ValueError, match="rel_pos_buckets >= 4"):
        beit3_tiny(relative_position="buckets", rel_pos_buckets=2)
    with pytest.raises(ValueError, match="attention_dropout must lie in"):
        vlmo_tiny(attention_dropout=-0.1)
