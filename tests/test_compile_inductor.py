"""Training steps under torch.compile with inductor, the default backend: forward and backward of every op and of
MoMELayer, MoMETransformer and CaptionDecoder, with fullgraph=True, dynamic=True and two shapes, equal to eager.

inductor (unlike aot_eager) trusts the strides each custom op's fake implementation promises, so an op whose real
outputs have other strides computes garbage or fails here. CPU: the ops on both CPU backends (native, what `auto`
picks, and the reference), the modules on native.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._inductor.config
import torch.nn.functional as F

from mome import settings
from mome.models import MoMETransformer
from mome.models.config import vlmo_tiny
from mome.nn import CaptionDecoder, ITCLoss, MoMELayer
from mome.ops import attention, decode_attention, itc_loss, modality_ffn, modality_layer_norm, modality_linear
from tests.helpers import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # inductor's notes on CPU codegen


@pytest.fixture(autouse=True)
def fresh_compile_state():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=["native", "reference"])
def cpu_backend(request):
    """What ``auto`` means inside the test: each CPU backend in turn."""
    with settings.override(backend=request.param):
        yield request.param


def _leaves(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).requires_grad_() for shape in shapes]


def _check_step(fn, make_inputs, sizes):
    """Compile ``fn`` once (dynamic shapes) and compare loss and every gradient with eager at each size."""
    _check_step_with(fn, torch.compile(fn, fullgraph=True, dynamic=True), make_inputs, sizes)


def _check_step_with(fn, compiled, make_inputs, sizes):
    for size in sizes:
        eager_inputs, compiled_inputs = make_inputs(size), make_inputs(size)
        expected, got = fn(*eager_inputs), compiled(*compiled_inputs)
        assert_close(got.detach(), expected.detach(), 1e-5, f"loss at size {size}")
        expected.backward()
        got.backward()
        for index, (a, b) in enumerate(zip(compiled_inputs, eager_inputs, strict=True)):
            if isinstance(b, torch.Tensor) and b.requires_grad:
                assert_close(a.grad, b.grad, 1e-5, f"grad of input {index} at size {size}")


def test_attention_with_every_mask_and_gqa(cpu_backend):
    def step(q, k, v, padding, modality):
        table = torch.tensor([[True, False], [True, True]])
        out = attention(q, k, v, causal=True, key_padding_mask=padding, prefix_len=2, modality=modality,
                        modality_mask=table)  # fmt: skip
        return out.square().mean()

    def inputs(n):
        q, k, v = _leaves((2, 4, n, 16), (2, 2, n, 16), (2, 2, n, 16), seed=n)
        padding = torch.arange(n)[None, :] >= torch.tensor([[n], [n - 2]])
        modality = (torch.arange(n) >= 3).long().expand(2, n).contiguous()
        return q, k, v, padding, modality

    _check_step(step, inputs, (9, 13))


@torch._inductor.config.patch(fallback_random=True)  # eager's generator draws the dropout seed
def test_attention_with_a_learned_bias_and_dropout():
    """On ``auto``: native declines dropout and a bias that needs a gradient, so the reference runs."""

    def step(q, k, v, bias):
        out = attention(q, k, v, causal=True, attn_bias=bias, dropout_p=0.2)
        return out.square().mean()

    def seeded(fn):
        def run(*inputs):
            torch.manual_seed(7)  # the same dropout seed for the eager and the compiled step
            return fn(*inputs)

        return run

    compiled = seeded(torch.compile(step, fullgraph=True, dynamic=True))
    _check_step_with(seeded(step), compiled, lambda n: _leaves((2, 4, n, 16), (2, 2, n, 16), (2, 2, n, 16),
                                                            (1, 4, n, n), seed=n), (9, 13))  # fmt: skip


def test_itc_loss_with_a_queue_refilled_inside_the_step():
    """The backward must read the queue as the loss saw it, not after the step's enqueue overwrote its rows (a
    clone of a buffer is cheap to recompute, so the partitioner would save the buffer and clone it too late)."""

    class TwoTowers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image, self.text = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
            self.itc = ITCLoss(queue_size=8, embed_dim=4)

        def forward(self, x, y):
            return self.itc(F.normalize(self.image(x), dim=-1), F.normalize(self.text(y), dim=-1)).loss

    torch.manual_seed(0)
    eager = TwoTowers()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    for step in range(3):  # the queue changes between steps too
        x, y = torch.randn(3, 6), torch.randn(3, 6)
        expected, got = eager(x, y), compiled(x, y)
        assert_close(got.detach(), expected.detach(), 1e-6, f"loss at step {step}")
        wanted = torch.autograd.grad(expected, list(eager.parameters()))
        grads = torch.autograd.grad(got, list(compiled_module.parameters()))
        for index, (a, b) in enumerate(zip(grads, wanted, strict=True)):
            assert_close(a, b, 1e-5, f"grad {index} at step {step}")
    assert torch.equal(eager.itc.queue.image_queue, compiled_module.itc.queue.image_queue)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_attention_plain(kv_heads, cpu_backend):
    """The case of the report: H = Hkv, dk came back with transposed strides."""
    _check_step(lambda q, k, v: attention(q, k, v).sum(), lambda n: _leaves((2, 4, n, 8), *[(2, kv_heads, n, 8)] * 2),
                (5, 11))  # fmt: skip


def test_decode_attention_forward(cpu_backend):
    def step(q, k_cache, v_cache, lengths):
        return decode_attention(q, k_cache, v_cache, lengths).square().sum()

    def inputs(nmax):
        q, k, v = (t.detach() for t in _leaves((3, 4, 16), (3, 2, nmax, 16), (3, 2, nmax, 16), seed=nmax))
        return q, k, v, torch.tensor([nmax, 1, 0])

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for nmax in (7, 12):
        assert_close(compiled(*inputs(nmax)), step(*inputs(nmax)), 1e-5)


def test_modality_ops(cpu_backend):
    def step(x, w1, b1, w2, norm_w, norm_b, ids):
        hidden = modality_layer_norm(x, ids, norm_w, norm_b)
        y = modality_linear(hidden, ids, w1, b1, activation="gelu")
        return (modality_ffn(x, ids, w1, b1, w2, None).square().mean() + y.square().mean()) / 2

    def inputs(tokens):
        gen = torch.Generator().manual_seed(tokens)
        x, w1, b1, w2, norm_w, norm_b = _leaves(
            (tokens, 8), (3, 12, 8), (3, 12), (3, 8, 12), (3, 8), (3, 8), seed=tokens
        )
        return x, w1, b1, w2, norm_w, norm_b, torch.randint(0, 3, (tokens,), generator=gen)

    _check_step(step, inputs, (10, 17))


@pytest.mark.parametrize("mode", ["clip_hardest", "momentum_queue"])
def test_itc_loss(mode, cpu_backend):
    def step(image, text, scale, image_m, text_m, image_queue, text_queue):
        if mode == "clip_hardest":
            return itc_loss(image, text, scale, hard_negatives="hardest").loss
        out = itc_loss(image, text, scale, image_feats_m=image_m, text_feats_m=text_m, image_queue=image_queue,
                       text_queue=text_queue, alpha=0.4, hard_negatives="hardest")  # fmt: skip
        return out.loss

    def inputs(batch):
        image, text = (F.normalize(t.detach(), dim=-1).requires_grad_() for t in _leaves((batch, 8), (batch, 8)))
        momentum = [F.normalize(t.detach(), dim=-1) for t in _leaves((batch, 8), (batch, 8), (5, 8), (5, 8), seed=1)]
        return image, text, torch.tensor(7.0, requires_grad=True), *momentum

    _check_step(step, inputs, (6, 9))


@pytest.mark.parametrize("layout", ["vlmo", "beit3"])
def test_mome_layer(layout):
    torch.manual_seed(0)
    layer = MoMELayer(16, 2, 2.0, layout=layout, vl_ffn=True, layer_scale_init=0.5 if layout == "vlmo" else None)

    def step(x, modality, padding):
        return layer(x, modality, padding, fused=True).square().mean()

    def inputs(n):
        padding = torch.zeros(2, n, dtype=torch.bool)
        padding[1, -2:] = True
        return _leaves((2, n, 16), seed=n)[0], (torch.arange(n) >= 4).long().expand(2, n).contiguous(), padding

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for n in (7, 10):
        args = inputs(n)
        expected = step(*args)
        grads = torch.autograd.grad(expected, list(layer.parameters()))
        got = compiled(*args)
        assert_close(got, expected, 1e-5)
        for a, b in zip(torch.autograd.grad(got, list(layer.parameters())), grads, strict=True):
            assert_close(a, b, 1e-5)


def test_mome_transformer_and_caption_decoder_training_step():
    torch.manual_seed(0)
    model = MoMETransformer(vlmo_tiny(depth=2, dim=32, heads=2))
    decoder = CaptionDecoder(vocab_size=50, dim=32, depth=1, heads=2, mlp_ratio=2.0, max_len=16, image_dim=32)
    config = model.config

    def step(images, text, padding):
        pair = model.encode_pair(images, text, padding)
        return pair.hidden.square().mean() + decoder.loss(text, pair.hidden[:, : pair.hidden.shape[1] - text.shape[1]])

    def inputs(length):
        gen = torch.Generator().manual_seed(length)
        images = torch.randn(2, config.in_chans, config.image_size, config.image_size, generator=gen)
        text = torch.randint(3, 50, (2, length), generator=gen)
        padding = torch.zeros(2, length, dtype=torch.bool)
        padding[1, -2:] = True
        return images, text, padding

    params = [*model.parameters(), *decoder.parameters()]
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for length in (6, 9):
        args = inputs(length)
        expected = step(*args)
        want = torch.autograd.grad(expected, params, allow_unused=True)
        got = compiled(*args)
        assert_close(got, expected, 1e-5)
        for a, b in zip(torch.autograd.grad(got, params, allow_unused=True), want, strict=True):
            if b is not None:
                assert_close(a, b, 1e-4)


def _bad_id_calls():
    """(name, fn, inputs with an out-of-range id) per op whose ids the compiled graph cannot check itself."""
    q = torch.randn(2, 2, 6, 8)
    modality = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 5]])  # 5: no such row of the table
    table = torch.tensor([[True, False], [True, True]])
    cache = torch.randn(2, 2, 4, 8)
    x, ids = torch.randn(5, 8), torch.tensor([0, 1, 2, 7, 1])  # 7: no such expert
    weight = torch.randn(3, 4, 8)
    return {
        "attention": (lambda q, m: attention(q, q, q, modality=m, modality_mask=table), (q, modality), 1),
        "decode_attention": (lambda q, n: decode_attention(q, cache, cache, n), (q[:, :, 0], torch.tensor([4, 9])), 1),
        "modality_linear": (lambda x, e: modality_linear(x, e, weight), (x, ids), 3),
        "modality_layer_norm": (lambda x, e: modality_layer_norm(x, e, weight[:, 0]), (x, ids), 3),
        "modality_ffn": (
            lambda x, e: modality_ffn(x, e, weight, None, weight.transpose(1, 2).contiguous(), None),
            (x, ids),
            3,
        ),
    }


@pytest.mark.parametrize("name", sorted(_bad_id_calls()))
def test_bad_ids_are_caught_in_compiled_code_or_poison_their_rows(name):
    from mome import settings

    fn, args, bad_index = _bad_id_calls()[name]
    compiled = torch.compile(fn, fullgraph=True)
    with pytest.raises(ValueError, match="must lie in"):
        compiled(*args)
    with settings.override(check_ids=False):  # no host sync: the rows a bad id would produce come back as NaN
        out = compiled(*args)
    bad = out[bad_index]
    assert torch.isnan(bad).all(), f"{name}: the row of the bad id is not poisoned"
    good = torch.cat([out[:bad_index].flatten(), out[bad_index + 1 :].flatten()])
    assert torch.isfinite(good).all(), f"{name}: rows of valid ids must stay finite"
