"""CaptionDecoder: forward and gradients vs plain torch, the LM loss, cached vs uncached generation, sampling."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCE, assert_close

from mome import ops
from mome.nn.decoder import CaptionDecoder, filter_logits

VOCAB, DIM, HEADS, DEPTH, IMAGE_DIM, MAX_LEN = 13, 24, 3, 2, 20, 12
BOS, EOS, PAD = 1, 2, 0


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core machine: OpenMP threads mostly wait on each other (10-40x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_decoder(dtype=torch.float64, seed=0, **overrides) -> CaptionDecoder:
    torch.manual_seed(seed)
    args = dict(vocab_size=VOCAB, dim=DIM, depth=DEPTH, heads=HEADS, mlp_ratio=2.5, max_len=MAX_LEN)
    decoder = CaptionDecoder(**{**args, "image_dim": IMAGE_DIM, "pad_id": PAD, **overrides})
    with torch.no_grad():  # larger weights than the init so that logits differ clearly between tokens
        for param in decoder.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return decoder.to(dtype)


def make_inputs(batch=3, length=7, tokens=5, dtype=torch.float64, padded=True, seed=1):
    gen = torch.Generator().manual_seed(seed)
    text_ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    text_ids[:, 0] = BOS
    text_ids[0, length - 2 :] = PAD  # right padding on one row
    image_tokens = torch.randn(batch, tokens, IMAGE_DIM, generator=gen, dtype=dtype)
    mask = None
    if padded:
        mask = torch.zeros(batch, tokens, dtype=torch.bool)
        mask[1, -2:] = True
        mask[2, 0] = True
    return text_ids, image_tokens, mask


def plain_torch_logits(decoder: CaptionDecoder, text_ids, image_tokens, image_padding_mask):
    """The same network written with torch.nn.functional only (the specification of the module)."""
    length = text_ids.shape[1]
    x = decoder.token_embed.weight[text_ids] + decoder.pos_embed[:length]
    cross_mask = None if image_padding_mask is None else ~image_padding_mask[:, None, None, :]

    def heads(t):
        return t.unflatten(-1, (decoder.heads, -1)).transpose(1, 2)

    def merge(t):
        return t.transpose(1, 2).flatten(2)

    for layer in decoder.layers:
        h = F.layer_norm(x, (DIM,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
        q, k, v = F.linear(h, layer.self_qkv.weight, layer.self_qkv.bias).chunk(3, -1)
        x = x + layer.self_out(merge(F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)))
        h = F.layer_norm(x, (DIM,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
        k, v = layer.cross_kv(image_tokens).chunk(2, -1)
        attended = F.scaled_dot_product_attention(heads(layer.cross_q(h)), heads(k), heads(v), attn_mask=cross_mask)
        x = x + layer.cross_out(merge(attended))
        h = F.layer_norm(x, (DIM,), layer.norm3.weight, layer.norm3.bias, layer.norm3.eps)
        x = x + layer.fc2(F.gelu(layer.fc1(h)))
    x = F.layer_norm(x, (DIM,), decoder.norm.weight, decoder.norm.bias, decoder.norm.eps)
    return x @ decoder.token_embed.weight.T + decoder.lm_head.bias


@pytest.mark.parametrize("padded", [False, True])
def test_forward_and_gradients_match_plain_torch(padded):
    decoder = make_decoder()
    text_ids, image_tokens, mask = make_inputs(padded=padded)
    image_tokens.requires_grad_(True)
    logits = decoder(text_ids, image_tokens, mask)
    expected = plain_torch_logits(decoder, text_ids, image_tokens, mask)
    assert_close(logits, expected, TOLERANCE[torch.float64], "logits")
    upstream = torch.randn_like(logits)
    params = [image_tokens, *decoder.parameters()]
    grads = torch.autograd.grad((logits * upstream).sum(), params)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), params)
    names = ["image_tokens", *(name for name, _ in decoder.named_parameters())]
    for name, grad, want in zip(names, grads, expected_grads, strict=True):
        assert_close(grad, want, 1e-9, f"grad {name}")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_ignores_padding_and_smooths_labels(smoothing):
    decoder = make_decoder(label_smoothing=smoothing)
    text_ids, image_tokens, mask = make_inputs()
    loss = decoder.loss(text_ids, image_tokens, mask)
    log_probs = plain_torch_logits(decoder, text_ids[:, :-1], image_tokens, mask).log_softmax(-1)
    targets = text_ids[:, 1:]
    nll = -log_probs.gather(-1, targets[..., None]).squeeze(-1)
    uniform = -log_probs.mean(-1)
    per_token = (1 - smoothing) * nll + smoothing * uniform
    keep = targets != PAD
    assert keep.sum() < keep.numel(), "the test inputs must contain padding targets"
    assert_close(loss, per_token[keep].mean(), 1e-10, "loss")
    assert_close(decoder.loss(text_ids, image_tokens, mask, label_smoothing=0.0), nll[keep].mean(), 1e-10, "override")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padded", [False, True])
def test_cached_greedy_generation_equals_recomputation(dtype, padded):
    decoder = make_decoder(dtype, seed=2)
    _, image_tokens, mask = make_inputs(batch=4, tokens=6, dtype=dtype, padded=padded, seed=3)
    if mask is not None:
        mask = torch.cat([mask, torch.zeros(1, 6, dtype=torch.bool)])[:4]
    steps = MAX_LEN - 1
    cached, cached_logits = decoder.generate(image_tokens, steps, BOS, EOS, image_padding_mask=mask, return_logits=True)
    fresh, fresh_logits = decoder.generate(
        image_tokens, steps, BOS, EOS, image_padding_mask=mask, use_cache=False, return_logits=True
    )
    assert torch.equal(cached, fresh), f"cached ids {cached.tolist()} != recomputed {fresh.tolist()}"
    assert cached.shape[1] > 3, "the test should decode several tokens"
    assert_close(cached_logits, fresh_logits, TOLERANCE[dtype], "step logits")
    # the logits of step t are those of a full forward over the tokens chosen so far
    full = decoder(cached[:, :-1], image_tokens, mask)
    assert_close(cached_logits, full, TOLERANCE[dtype], "step logits vs forward")


def test_image_positions_are_added_before_cross_attention_and_kept_by_the_cache():
    decoder = make_decoder(seed=5, image_tokens=6)
    plain = make_decoder(seed=5)
    plain.load_state_dict({k: v for k, v in decoder.state_dict().items() if k != "image_pos_embed"})
    text_ids, image_tokens, mask = make_inputs(tokens=6, seed=6)
    assert decoder.image_pos_embed.shape == (6, IMAGE_DIM) and decoder.image_pos_embed.abs().max() > 0
    expected = plain_torch_logits(plain, text_ids, image_tokens + decoder.image_pos_embed, mask)
    assert_close(decoder(text_ids, image_tokens, mask), expected, TOLERANCE[torch.float64], "logits")
    cached = decoder.generate(image_tokens, MAX_LEN - 1, BOS, EOS, image_padding_mask=mask)
    fresh = decoder.generate(image_tokens, MAX_LEN - 1, BOS, EOS, image_padding_mask=mask, use_cache=False)
    assert torch.equal(cached, fresh)
    loss = decoder.loss(text_ids, image_tokens, mask)
    loss.backward()
    assert decoder.image_pos_embed.grad is not None and decoder.image_pos_embed.grad.abs().max() > 0
    with pytest.raises(ValueError, match="image_tokens"):
        decoder(text_ids, image_tokens[:, :5])
    with pytest.raises(ValueError, match="image_tokens"):
        CaptionDecoder(VOCAB, DIM, DEPTH, HEADS, image_tokens=0)


def test_cache_uses_decode_attention_and_projects_image_once():
    decoder = make_decoder(seed=4)
    _, image_tokens, _ = make_inputs(padded=False)
    real_decode = ops.decode_attention
    with (
        mock.patch.object(ops, "decode_attention", side_effect=real_decode) as decode,
        mock.patch.object(decoder.layers[0].cross_kv, "forward", wraps=decoder.layers[0].cross_kv.forward) as proj,
    ):
        ids = decoder.generate(image_tokens, 5, BOS, EOS)
    steps = ids.shape[1] - 1
    assert decode.call_count == 2 * DEPTH * steps  # self-attention over the cache + cross-attention, per layer
    assert proj.call_count == 1


def test_sampling_is_reproducible_and_respects_filters():
    decoder = make_decoder(seed=5)
    _, image_tokens, mask = make_inputs(batch=6)
    image_tokens = torch.cat([image_tokens, image_tokens])

    def sample(seed, **kwargs):
        gen = torch.Generator().manual_seed(seed)
        return decoder.generate(image_tokens, 8, BOS, EOS, strategy="sample", generator=gen, **kwargs)

    first, again, other = sample(0, temperature=1.5), sample(0, temperature=1.5), sample(1, temperature=1.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, other), "different seeds should draw different captions"
    greedy = decoder.generate(image_tokens, 8, BOS, EOS)
    assert torch.equal(sample(3, top_k=1), greedy)
    assert torch.equal(sample(4, top_p=1e-6), greedy)
    assert torch.equal(sample(5, temperature=1e-4), greedy)
    uncached = decoder.generate(
        image_tokens,
        8,
        BOS,
        EOS,
        strategy="sample",
        top_k=4,
        generator=torch.Generator().manual_seed(6),
        use_cache=False,
    )
    assert torch.equal(sample(6, top_k=4), uncached)


def test_filter_logits_top_k_and_nucleus():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 11, generator=gen, dtype=torch.float64)
    kept = torch.isfinite(filter_logits(logits, top_k=3))
    assert torch.equal(kept, logits >= logits.topk(3, -1).values[:, -1:])
    for top_p in (0.3, 0.75, 0.999):
        kept = torch.isfinite(filter_logits(logits, top_p=top_p))
        probs = logits.softmax(-1)
        for row in range(5):
            order = probs[row].argsort(descending=True)
            need = int((probs[row][order].cumsum(0) < top_p).sum()) + 1  # smallest prefix reaching top_p
            expected = torch.zeros(11, dtype=torch.bool)
            expected[order[:need]] = True
            assert torch.equal(kept[row], expected), f"top_p={top_p} row {row}"
    both = torch.isfinite(filter_logits(logits, top_k=2, top_p=0.999))
    assert torch.equal(both.sum(-1), torch.full((5,), 2))


def test_generation_stops_at_eos_and_pads_after_it():
    decoder = make_decoder(seed=8)
    with torch.no_grad():
        decoder.lm_head.bias[EOS] += 5.0  # eos likely but not certain: rows end at different steps
    _, image_tokens, _ = make_inputs(batch=8, padded=False)
    ids = decoder.generate(image_tokens, 10, BOS, EOS, strategy="sample", generator=torch.Generator().manual_seed(0))
    assert ids.shape[1] <= 11 and (ids[:, 0] == BOS).all()
    ended_at = []
    for row in ids.tolist():
        end = row.index(EOS, 1) if EOS in row[1:] else len(row)  # a row without eos ran to max_new_tokens
        assert all(token == PAD for token in row[end + 1 :]), f"tokens after eos must be pad: {row}"
        ended_at.append(end)
    assert max(ended_at) >= ids.shape[1] - 1, "decoding should stop once every row has ended"
    assert len(set(ended_at)) > 1, f"rows should end at different steps in this test, got {ended_at}"
    assert max(ended_at) < 10, f"this seed should end every row before max_new_tokens, got {ended_at}"


def test_bad_arguments_are_named():
    decoder = make_decoder()
    text_ids, image_tokens, mask = make_inputs()
    with pytest.raises(ValueError, match="image_tokens"):
        decoder(text_ids, image_tokens[..., :-1])
    with pytest.raises(TypeError, match="image_tokens"):
        decoder(text_ids, image_tokens.long())
    with pytest.raises(TypeError, match="image_padding_mask"):
        decoder(text_ids, image_tokens, mask.int())
    with pytest.raises(ValueError, match="image_padding_mask"):
        decoder(text_ids, image_tokens, mask[:, 1:])
    with pytest.raises(TypeError, match="text_ids"):
        decoder(text_ids.double(), image_tokens)
    with pytest.raises(ValueError, match="text_ids"):
        decoder(torch.full((3, MAX_LEN + 1), BOS), image_tokens)
    with pytest.raises(ValueError, match="text_ids"):
        decoder(torch.full((3, 4), VOCAB), image_tokens)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate(image_tokens, MAX_LEN, BOS, EOS)
    with pytest.raises(ValueError, match="strategy"):
        decoder.generate(image_tokens, 3, BOS, EOS, strategy="beam")
    with pytest.raises(ValueError, match="temperature"):
        decoder.generate(image_tokens, 3, BOS, EOS, strategy="sample", temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        decoder.generate(image_tokens, 3, BOS, EOS, strategy="sample", top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        decoder.generate(image_tokens, 3, BOS, EOS, strategy="sample", top_k=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        CaptionDecoder(VOCAB, DIM, DEPTH, HEADS, label_smoothing=1.0)
    with pytest.raises(ValueError, match="heads"):
        CaptionDecoder(VOCAB, 25, DEPTH, HEADS)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_generation_matches_float64_cpu(dtype):
    reference = make_decoder(torch.float64, seed=9)
    decoder = make_decoder(dtype, seed=9).cuda()
    _, image_tokens, mask = make_inputs(batch=4, tokens=37, padded=True, seed=10)
    text_ids = make_inputs(batch=4, length=MAX_LEN, seed=11)[0]
    logits = decoder(text_ids.cuda(), image_tokens.to("cuda", dtype), mask.cuda())
    loose = max(TOLERANCE[dtype], 1e-3) * 4  # a whole network, not one op: errors add up over layers
    assert_close(logits.cpu(), reference(text_ids, image_tokens, mask), loose, "logits")
    ids, step_logits = decoder.generate(image_tokens.to("cuda", dtype), MAX_LEN - 1, BOS, EOS, return_logits=True)
    assert_close(step_logits.cpu(), reference(ids[:, :-1].cpu(), image_tokens), loose, "step logits")
