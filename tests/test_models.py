"""MoMELayer vs a plain-torch re-implementation; MoMETransformer routing, padding, configs, torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mome.models import MoMEConfig, MoMETransformer, beit3_base, beit3_tiny, vlmo_base, vlmo_large, vlmo_tiny
from mome.nn import MoMELayer
from tests.helpers import TOLERANCE, assert_close

DIM, HEADS = 16, 2


def _per_token(function, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Expert e = ids[b, n] runs ``function(rows, e)`` on its tokens; plain boolean indexing."""
    out = None
    for expert in ids.unique().tolist():
        rows = ids == expert
        result = function(x[rows], expert)
        if out is None:
            out = x.new_zeros(*x.shape[:-1], result.shape[-1])
        out = out.index_put(rows.nonzero(as_tuple=True), result)
    return out


def _plain_attention(q, k, v, padding, heads):
    batch, seq, dim = q.shape
    q, k, v = (t.reshape(batch, seq, heads, -1).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5
    if padding is not None:
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, dim)


def _plain_layer(layer: MoMELayer, x, modality, padding, fused):
    """The block written out with per-expert F.linear / F.layer_norm (the spec of both layouts)."""
    ffn_ids = torch.full_like(modality, 2) if fused and layer.vl_ffn else modality

    def norm(module, ids, h):
        return _per_token(
            lambda r, e: F.layer_norm(r, r.shape[-1:], module.weight[e], module.bias[e], module.eps), h, ids
        )

    def linear(module, ids, h):
        return _per_token(lambda r, e: F.linear(r, module.weight[e], module.bias[e]), h, ids)

    if layer.layout == "vlmo":
        attn = layer.attn
        h = F.layer_norm(x, (DIM,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        q, k, v = F.linear(h, attn.qkv.weight, bias).chunk(3, dim=-1)
        branch = attn.proj(_plain_attention(q, k, v, padding, HEADS))
    else:
        attn = layer.attn
        h = norm(layer.norm1, modality, x)
        q, k, v = (linear(p, modality, h) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        branch = linear(
            attn.out_proj, modality, norm(attn.inner_attn_ln, modality, _plain_attention(q, k, v, padding, HEADS))
        )
    x = x + (branch if layer.gamma_1 is None else layer.gamma_1 * branch)
    h = F.gelu(linear(layer.ffn.fc1, ffn_ids, norm(layer.norm2, ffn_ids, x)))
    if layer.ffn.ffn_layernorm is not None:
        h = norm(layer.ffn.ffn_layernorm, ffn_ids, h)
    branch = linear(layer.ffn.fc2, ffn_ids, h)
    return x + (branch if layer.gamma_2 is None else layer.gamma_2 * branch)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (LayerNorm gammas, biases, layer scale) so any mix-up shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3)


@pytest.mark.parametrize("layout", ["vlmo", "beit3"])
@pytest.mark.parametrize(
    "vl_ffn,fused,dtype",
    [
        (False, False, torch.float64),
        (True, False, torch.float64),
        (True, True, torch.float64),
        (True, True, torch.float32),
    ],
)
def test_layer_matches_plain_torch(layout, vl_ffn, fused, dtype):
    layer = MoMELayer(DIM, HEADS, 2.5, layout=layout, vl_ffn=vl_ffn, layer_scale_init=0.5 if layout == "vlmo" else None)
    layer = layer.to(dtype)
    _randomise(layer, 0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, DIM, dtype=dtype, generator=generator, requires_grad=True)
    modality = torch.tensor([1] * 4 + [0] * 7).expand(2, 11)  # VLMo order: text, then image
    padding = torch.zeros(2, 11, dtype=torch.bool)
    padding[1, 2:4] = True
    out = layer(x, modality, padding, fused=fused)
    expected = _plain_layer(layer, x, modality, padding, fused)
    tol = TOLERANCE[dtype]
    assert_close(out, expected, tol)
    grad = torch.randn(out.shape, dtype=dtype, generator=generator)
    params = [x] + [p for p in layer.parameters()]
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    got = torch.autograd.grad(out, params, grad, allow_unused=True)
    want = torch.autograd.grad(expected, params, grad, allow_unused=True)
    for name, a, b in zip(names, got, want, strict=True):
        if b is None:  # an expert no token reached (the VL expert when not fused): no gradient either way
            assert a is None or not a.any(), name
            continue
        assert_close(a if a is not None else torch.zeros_like(b), b, tol, f"d{name}")


def _perturb_expert(model: MoMETransformer, layer_index: int, expert: int) -> MoMETransformer:
    perturbed = MoMETransformer(model.config).eval()
    perturbed.load_state_dict(model.state_dict())
    with torch.no_grad():
        weight = perturbed.layers[layer_index].ffn.fc1.weight[expert]
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(expert)))
    return perturbed


def _tiny_inputs(config: MoMEConfig, batch: int = 2, length: int = 6):
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(batch, config.in_chans, config.image_size, config.image_size, generator=generator)
    text = torch.randint(config.vocab_size, (batch, length), generator=generator)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[1, 4:] = True
    return images, text, padding


def test_vlmo_routing_vl_ffn_only_in_top_layers_for_fused_input():
    config = vlmo_tiny(depth=3, vl_layers=1, dim=32, heads=2)
    model = MoMETransformer(config).eval()
    images, text, padding = _tiny_inputs(config)
    assert [layer.vl_ffn for layer in model.layers] == [False, False, True]
    with torch.no_grad():
        base = (model.encode_pair(images, text, padding), model.encode_image(images), model.encode_text(text, padding))
        for layer_index, expert, changes in [
            (2, 2, (True, False, False)),  # top layer VL expert: only fused input uses it
            (2, 0, (False, True, False)),  # top layer V expert: unused by fused input
            (2, 1, (False, False, True)),
            (0, 0, (True, True, False)),  # lower layers: fused tokens use V / L by position
            (0, 1, (True, False, True)),
        ]:
            perturbed = _perturb_expert(model, layer_index, expert)
            outs = (
                perturbed.encode_pair(images, text, padding),
                perturbed.encode_image(images),
                perturbed.encode_text(text, padding),
            )
            for name, before, after, expected_change in zip(
                ("pair", "image", "text"), base, outs, changes, strict=True
            ):
                changed = not torch.allclose(before.hidden, after.hidden)
                assert changed == expected_change, f"layer {layer_index} expert {expert}: {name} changed={changed}"


@pytest.mark.parametrize("make_config", [vlmo_tiny, beit3_tiny])
def test_token_order_cls_and_padding(make_config):
    config = make_config(depth=2)
    model = MoMETransformer(config).eval()
    images, text, padding = _tiny_inputs(config)
    n_image = config.num_patches + 1
    with torch.no_grad():
        pair = model.encode_pair(images, text, padding)
        image_only = model.encode_image(images)
        text_only = model.encode_text(text, padding)
        assert pair.hidden.shape == (2, n_image + 6, config.dim)
        assert image_only.hidden.shape == (2, n_image, config.dim) and image_only.text_cls is None
        assert text_only.hidden.shape == (2, 6, config.dim) and text_only.image_cls is None
        text_first = config.layout == "vlmo"
        text_start = 0 if text_first else n_image
        image_start = 6 if text_first else 0
        assert torch.equal(pair.text_cls, pair.hidden[:, text_start])
        assert torch.equal(pair.image_cls, pair.hidden[:, image_start])
        assert model.fused_cls(pair) is (pair.text_cls if text_first else pair.image_cls)
        # padded tokens are invisible: changing their ids changes no other token's state
        altered = text.clone()
        altered[1, 4:] = (altered[1, 4:] + 1) % config.vocab_size
        for before, after, keep in [
            (text_only.hidden, model.encode_text(altered, padding).hidden, ~padding),
            (pair.hidden, model.encode_pair(images, altered, padding).hidden, None),
        ]:
            if keep is None:
                keep = torch.ones(before.shape[:2], dtype=torch.bool)
                keep[1, text_start + 4 : text_start + 6] = False
            assert_close(after[keep], before[keep], 1e-6, "unpadded tokens")


def test_transformer_gradients_flow_to_every_used_parameter():
    config = vlmo_tiny(depth=2, vl_layers=1)
    model = MoMETransformer(config)
    images, text, padding = _tiny_inputs(config)
    out = model.encode_pair(images, text, padding)
    (
        out.hidden.square().mean() + model.encode_image(images).image_cls.sum() + model.encode_text(text).text_cls.sum()
    ).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None and "mask_token" not in n]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_configs_and_bad_inputs():
    assert vlmo_base().dim == 768 and vlmo_large().depth == 24 and beit3_base().num_experts == 2
    assert vlmo_tiny(dim=32, heads=2).dim == 32
    with pytest.raises(ValueError, match="layout"):
        MoMEConfig(layout="clip")
    with pytest.raises(ValueError, match="vl_layers"):
        MoMEConfig(num_experts=2, vl_layers=1)
    with pytest.raises(ValueError, match="divisible"):
        MoMEConfig(dim=30, heads=4)
    model = MoMETransformer(vlmo_tiny(depth=1))
    with pytest.raises(ValueError, match="images must have shape"):
        model.encode_image(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="max_text_len"):
        model.encode_text(torch.zeros(1, 99, dtype=torch.int64))
    with pytest.raises(TypeError, match="text_padding_mask"):
        model.encode_text(torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 4))


def test_dropout_and_drop_path_in_training():
    config = vlmo_tiny(depth=2, dropout=0.1, drop_path=0.2)
    model = MoMETransformer(config)
    images, text, padding = _tiny_inputs(config)
    torch.manual_seed(0)
    first = model.encode_pair(images, text, padding).hidden
    second = model.encode_pair(images, text, padding).hidden
    assert not torch.allclose(first, second)  # stochastic while training
    model.eval()
    assert torch.equal(model.encode_pair(images, text, padding).hidden, model.encode_pair(images, text, padding).hidden)


@pytest.mark.parametrize("layout", ["vlmo", "beit3"])
def test_layer_compiles_without_graph_breaks(layout):
    torch._dynamo.reset()
    layer = MoMELayer(DIM, HEADS, layout=layout, vl_ffn=True, layer_scale_init=0.1 if layout == "vlmo" else None)
    x = torch.randn(2, 9, DIM, requires_grad=True)
    modality = torch.tensor([0] * 5 + [1] * 4).expand(2, 9)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[0, 7:] = True
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x, modality, padding, fused=True)
    expected = layer(x, modality, padding, fused=True)
    assert_close(out, expected, 1e-6)
    (grad_compiled,) = torch.autograd.grad(out.sum(), x)
    (grad_eager,) = torch.autograd.grad(expected.sum(), x)
    assert_close(grad_compiled, grad_eager, 1e-6, "dx")


@pytest.mark.gpu
@pytest.mark.parametrize("make_config", [vlmo_tiny, beit3_tiny])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-3), (torch.bfloat16, 5e-2)])
def test_model_on_gpu_matches_float64_cpu(make_config, dtype, tol):
    """The GPU backends (Triton / CUDA) inside a whole model vs the float64 reference; fp32 tolerance
    allows TF32 tensor-core GEMMs."""
    config = make_config(depth=2)
    model = MoMETransformer(config).eval()
    images, text, padding = _tiny_inputs(config)
    reference = copy.deepcopy(model).double()
    expected = reference.encode_pair(images.double(), text, padding).hidden
    gpu = copy.deepcopy(model).to("cuda", dtype)
    got = gpu.encode_pair(images.to("cuda", dtype), text.cuda(), padding.cuda()).hidden
    assert_close(got.double().cpu(), expected, tol, "hidden")
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected.backward(grad)
    got.backward(grad.to("cuda", dtype))
    for (name, p_ref), p in zip(reference.named_parameters(), gpu.parameters(), strict=True):
        if p_ref.grad is not None:
            assert_close(p.grad.double().cpu(), p_ref.grad, 2 * tol, f"d{name}")
