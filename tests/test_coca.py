"""CoCa (mome.models.coca) and its AttentionalPooler: shapes, the one-forward losses, padding, KV-cached generation,
state_dict, torch.compile, training on the demo's data and the argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mome.models.coca import CoCa, CoCaConfig, coca_base, coca_tiny
from mome.nn.pooling import AttentionalPooler
from mome.shapes_data import ShapesCaptions
from tests.helpers import assert_close

VOCAB, BOS, EOS, PAD = 23, 1, 2, 0


def _model(dtype=torch.float64, seed=0, **overrides) -> CoCa:
    torch.manual_seed(seed)
    overrides = {"image_size": 24, "vision_depth": 1, "caption_queries": 5, "vocab_size": VOCAB, "pad_id": PAD,
                 **overrides}  # fmt: skip
    return CoCa(coca_tiny(**overrides)).to(dtype)


def _batch(model: CoCa, lengths=(7, 4, 6), seed=1):
    """Random images and right-padded captions ``[bos] words [eos] pad...``, one of each length."""
    gen = torch.Generator().manual_seed(seed)
    c, dtype = model.config, model.token_embed.weight.dtype
    images = torch.randn(len(lengths), c.in_chans, c.image_size, c.image_size, generator=gen, dtype=dtype)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=gen)
    padding = torch.arange(width)[None, :] >= torch.tensor(lengths)[:, None]
    ids[:, 0] = BOS
    ids[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = EOS
    return images, ids.masked_fill(padding, PAD), padding


def _grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def _assert_same_grads(got, want, tol, what):
    """None (not reached) and zeros are the same gradient; the [CLS] reaching the caption loss is not."""
    for (name, param), a, b in zip(what, got, want, strict=True):
        if a is None and b is None:
            continue
        zeros = torch.zeros_like(param)
        assert_close(zeros if a is None else a, zeros if b is None else b, tol, f"grad of {name}")


# -- AttentionalPooler ---------------------------------------------------------------------------------------------
def _pooler_reference(pooler: AttentionalPooler, tokens, padding):
    """float64 multi-head attention of ln_q(query) over ln_k(tokens), written out (the softmax over unmasked keys)."""
    attn, heads = pooler.attn, pooler.heads
    keys = F.layer_norm(tokens, (pooler.context_dim,), pooler.ln_k.weight, pooler.ln_k.bias, pooler.ln_k.eps)
    queries = F.layer_norm(pooler.query, (pooler.dim,), pooler.ln_q.weight, pooler.ln_q.bias, pooler.ln_q.eps)
    if attn._qkv_same_embed_dim:
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    batch, tokens_len, head_dim = tokens.shape[0], tokens.shape[1], pooler.dim // heads
    q = (queries @ w_q.T + b_q).view(-1, heads, head_dim).transpose(0, 1)  # [H, Q, Dh]
    k = (keys @ w_k.T + b_k).view(batch, tokens_len, heads, head_dim).transpose(1, 2)  # [B, H, M, Dh]
    v = (keys @ w_v.T + b_v).view(batch, tokens_len, heads, head_dim).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)  # [B, H, Q, M]
    if padding is not None:
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, -1, pooler.dim)  # [B, Q, D]
    return attn.out_proj(out)


@pytest.mark.parametrize("context_dim", [12, 10])  # packed in_proj_weight, and separate q/k/v weights
@pytest.mark.parametrize("padded", [False, True])
def test_pooler_matches_reference_with_gradients(context_dim, padded):
    torch.manual_seed(context_dim)
    pooler = AttentionalPooler(12, context_dim, heads=3, queries=5).double()
    tokens = torch.randn(3, 7, context_dim, dtype=torch.float64, requires_grad=True)
    padding = torch.tensor([[False] * 7, [False] * 4 + [True] * 3, [True, False] * 3 + [True]]) if padded else None
    out = pooler(tokens, padding)
    assert out.shape == (3, 5, 12)
    expected = _pooler_reference(pooler, tokens, padding)
    assert_close(out, expected, 1e-10)
    weight = torch.randn_like(out)
    leaves = [tokens, *pooler.parameters()]
    got = torch.autograd.grad((out * weight).sum(), leaves)
    want = torch.autograd.grad((expected * weight).sum(), leaves)
    names = [("tokens", tokens), *pooler.named_parameters()]
    _assert_same_grads(got, want, 1e-9, names)


def test_pooler_all_tokens_ignored_gives_the_output_bias():
    pooler = AttentionalPooler(8, heads=2, queries=3).double()
    nn.init.normal_(pooler.attn.out_proj.bias)
    tokens = torch.randn(2, 4, 8, dtype=torch.float64)
    padding = torch.tensor([[True] * 4, [False] * 4])
    out = pooler(tokens, padding)
    assert_close(out[0], pooler.attn.out_proj.bias.expand(3, -1), 1e-12)
    assert_close(out[1], _pooler_reference(pooler, tokens[1:], None)[0], 1e-10)


def test_pooler_loads_open_clips_attentional_pooler():
    from tests import torchvision_standin

    torchvision_standin.install_if_missing()
    open_clip_transformer = pytest.importorskip("open_clip.transformer")
    theirs = open_clip_transformer.AttentionalPooler(12, 10, n_head=3, n_queries=5).double()
    ours = AttentionalPooler(12, 10, heads=3, queries=5).double()
    ours.load_state_dict(theirs.state_dict())  # strict: the same names and shapes
    tokens = torch.randn(2, 6, 10, dtype=torch.float64)
    assert_close(ours(tokens), theirs(tokens), 1e-10)


# -- CoCa: shapes, losses, padding -----------------------------------------------------------------------------------
def test_forward_shapes_and_unit_embeddings():
    model = _model()
    images, ids, padding = _batch(model)
    out = model(images, ids, padding)
    c = model.config
    assert out.image_embed.shape == out.text_embed.shape == (3, c.embed_dim)
    assert out.logits.shape == (3, ids.shape[1] - 1, VOCAB)
    assert_close(out.image_embed.norm(dim=-1), torch.ones(3, dtype=torch.float64), 1e-12)
    assert_close(out.text_embed.norm(dim=-1), torch.ones(3, dtype=torch.float64), 1e-12)
    states = model.image_states(images)
    assert states.pooled.shape == (3, c.vision_dim) and states.tokens.shape == (3, c.caption_queries, c.vision_dim)
    assert torch.isfinite(out.logits).all()


def test_losses_equal_their_definitions():
    model = _model()
    images, ids, padding = _batch(model)
    losses = model.loss(images, ids, padding)
    out = model(images, ids, padding)
    logits = model.itc.scale * out.image_embed @ out.text_embed.T
    labels = torch.arange(3)
    contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    targets = ids[:, 1:].masked_fill(padding[:, 1:], -100)
    caption = F.cross_entropy(out.logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
    assert_close(losses.contrastive, contrastive, 1e-10)
    assert_close(losses.caption, caption, 1e-10)
    assert_close(losses.loss, 1.0 * contrastive + 2.0 * caption, 1e-10)  # CoCa's weights


def test_one_forward_gradients_equal_those_of_two_separate_forwards():
    """Contrastive and caption losses from one pass of the text (the [CLS] appended) have the gradients of a
    contrastive forward and a caption forward that never sees the [CLS] or the last token."""
    model = _model()
    images, ids, padding = _batch(model)
    named = list(model.named_parameters())
    params = [p for _, p in named]
    together = model.loss(images, ids, padding)
    contrastive = model.itc(model.encode_image(images), model.encode_text(ids, padding)).loss
    caption_text = model.text_states(ids[:, :-1], cls=False).tokens  # no [CLS], no padding mask
    caption_logits = model.caption_logits(caption_text, model.image_states(images).tokens)
    caption = model.caption_loss(caption_logits, ids, padding)
    assert_close(together.contrastive, contrastive, 1e-12)
    assert_close(together.caption, caption, 1e-10)
    _assert_same_grads(_grads(together.contrastive, params), _grads(contrastive, params), 1e-10, named)
    _assert_same_grads(_grads(together.caption, params), _grads(caption, params), 1e-9, named)


def test_attention_runs_on_mome_ops_with_masks_as_structure(monkeypatch):
    import mome.ops

    calls, attention = [], mome.ops.attention

    def recording(q, k, v, **kwargs):
        calls.append((q.shape[2], k.shape[2], kwargs))
        return attention(q, k, v, **kwargs)

    monkeypatch.setattr(mome.ops, "attention", recording)
    model = _model(caption_queries=3)  # 3 queries, 5 image tokens: every call tells by its shapes where it is
    images, ids, padding = _batch(model)
    model.loss(images, ids, padding)
    c, length, patches = model.config, ids.shape[1], model.config.num_patches + 1
    assert all(kwargs.get("attn_bias") is None for _, _, kwargs in calls)  # no dense mask anywhere
    text = [(nq, nk, kw) for nq, nk, kw in calls if kw.get("causal") and kw.get("key_padding_mask") is not None]
    assert [(nq, nk) for nq, nk, _ in text] == [(length + 1, length + 1)] * c.text_depth  # text + [CLS]
    assert torch.equal(text[0][2]["key_padding_mask"][:, :length], padding)
    assert not text[0][2]["key_padding_mask"][:, length].any()  # the [CLS] is a key for itself
    pooled = sorted((nq, nk) for nq, nk, kw in calls if nk == patches and not kw.get("causal"))
    assert pooled == sorted([(patches, patches)] * c.vision_depth + [(1, patches), (c.caption_queries, patches)])
    cross = [(nq, nk) for nq, nk, kw in calls if nk == c.caption_queries]
    assert cross == [(length - 1, c.caption_queries)] * c.multimodal_depth


def test_text_embedding_does_not_depend_on_padding():
    model = _model()
    _, ids, padding = _batch(model, lengths=(5, 3))
    short = model.encode_text(ids[:, :5], padding[:, :5])
    longer = torch.cat([ids, torch.full((2, 4), PAD)], dim=1)
    long = model.encode_text(longer, longer == PAD)
    assert_close(long, short, 1e-12)
    unpadded = model.encode_text(ids[1:, :3])  # no mask, no padding: every token counts
    assert_close(unpadded, short[1:], 1e-12)


def test_caption_loss_ignores_padded_targets():
    model = _model()
    images, ids, padding = _batch(model)
    other = ids.masked_fill(padding, 7)  # junk where padded: masked by text_padding_mask only
    assert_close(model.loss(images, other, padding).caption, model.loss(images, ids, padding).caption, 1e-12)


# -- generation ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_generate_with_cache_equals_without(strategy):
    model = _model().eval()
    images, _, _ = _batch(model)
    runs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(5)
        runs.append(model.generate(images, 6, BOS, EOS, strategy=strategy, top_k=8, generator=gen,
                                   use_cache=use_cache, return_logits=True))  # fmt: skip
    (ids, logits), (ids_ref, logits_ref) = runs
    assert ids.shape[0] == 3 and ids.shape[1] <= 7 and (ids[:, 0] == BOS).all()
    assert torch.equal(ids, ids_ref)
    assert_close(logits, logits_ref, 1e-10)
    assert logits.shape == (3, ids.shape[1] - 1, VOCAB)
    # the logits are those of the training forward over the generated prefix
    states = model.text_states(ids[:, :-1], cls=False).tokens
    assert_close(model.caption_logits(states, model.image_states(images).tokens), logits, 1e-10)


def test_generate_stops_and_pads_after_eos():
    model = _model().eval()
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[EOS] = 1e3  # every step says eos
    ids = model.generate(_batch(model)[0], 6, BOS, EOS)
    assert torch.equal(ids, torch.tensor([[BOS, EOS]] * 3))
    assert model.generate(_batch(model)[0], 0, BOS, EOS).shape == (3, 1)


# -- training, state_dict, compile -----------------------------------------------------------------------------------
def test_loss_decreases_on_the_demo_data():
    torch.manual_seed(0)
    data = ShapesCaptions(seed=0, image_size=24, jitter=0.03)
    model = CoCa(coca_tiny(image_size=24, vocab_size=data.tokenizer.vocab_size, max_text_len=data.max_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(25):
        batch = data.train_batch(16)
        losses = model.loss(batch.images, batch.canonical_text_ids, batch.canonical_text_ids == 0,
                            positive_ids=batch.caption_ids)  # fmt: skip
        optimizer.zero_grad()
        losses.loss.backward()
        optimizer.step()
        totals.append(losses.loss.item())
    first, last = sum(totals[:5]) / 5, sum(totals[-5:]) / 5
    assert last < 0.75 * first, f"loss went from {first:.3f} to {last:.3f} over 25 steps"


def test_state_dict_round_trip():
    model = _model(seed=0)
    images, ids, padding = _batch(model)
    copy = _model(seed=1)
    assert not torch.equal(copy.lm_head.weight, model.lm_head.weight)
    copy.load_state_dict(model.state_dict())  # strict
    for a, b in zip(copy.loss(images, ids, padding), model.loss(images, ids, padding), strict=True):
        assert torch.equal(a, b)
    keys = model.state_dict().keys()
    assert {"itc.logit_scale", "caption_pooler.query", "contrastive_pooler.attn.in_proj_weight"} <= set(keys)
    assert "patch_embed.mask_token" not in keys  # no masked-image-modelling token: nothing unused to carry


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torch_compile_training_step_equals_eager():
    torch._dynamo.reset()
    model = _model(dtype=torch.float32)
    images, ids, padding = _batch(model)
    named = list(model.named_parameters())
    params = [p for _, p in named]

    def step(images, ids, padding):
        return model.loss(images, ids, padding).loss

    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    got, want = compiled(images, ids, padding), step(images, ids, padding)
    assert_close(got, want, 1e-5, "loss")
    _assert_same_grads(_grads(got, params), _grads(want, params), 1e-4, named)
    torch._dynamo.reset()


def test_coca_base_is_coca_base():
    c = coca_base()
    assert (c.image_size, c.patch_size, c.vision_dim, c.vision_depth, c.vision_heads) == (224, 16, 768, 12, 12)
    assert (c.text_dim, c.text_depth, c.multimodal_depth, c.text_heads, c.caption_queries) == (768, 12, 12, 12, 256)
    assert (c.contrastive_weight, c.caption_weight) == (1.0, 2.0)
    with torch.device("meta"):
        params = sum(p.numel() for p in CoCa(c).parameters())
    assert 380e6 < params < 395e6  # the paper's CoCa-Base: 383M


def test_train_coca_reports_the_demo_metrics():
    from mome.demo_coca import CoCaDemoOptions, train_coca

    metrics = train_coca(CoCaDemoOptions(steps=2, batch_size=8, eval_size=8, image_size=24, quiet=True))
    for direction in ("image_to_text", "text_to_image"):
        assert 0.0 <= metrics["retrieval"][direction]["R@1"] <= metrics["retrieval"][direction]["R@5"] <= 1.0
    assert 0.0 <= metrics["caption_exact_match"] <= metrics["caption_word_accuracy"] <= 1.0
    assert len(metrics["history"]["contrastive"]) == len(metrics["history"]["caption"]) == 2


# -- argument checks -------------------------------------------------------------------------------------------------
_BAD_CONFIGS = [
    (dict(vision_dim=65), "vision_dim"),
    (dict(text_depth=0), "text_depth"),
    (dict(max_text_len=1), "max_text_len"),
    (dict(pad_id=99, vocab_size=32), "pad_id"),
    (dict(caption_weight=-1.0), "caption_weight"),
    (dict(image_size=50), "image_size"),
    (dict(label_smoothing=1.0), "label_smoothing"),
]


@pytest.mark.parametrize("overrides, name", _BAD_CONFIGS)
def test_bad_config_names_the_field(overrides, name):
    with pytest.raises(ValueError, match=name):
        coca_tiny(**overrides)


def test_bad_model_inputs_name_the_argument():
    model = _model()
    images, ids, padding = _batch(model)
    cases = [
        (lambda: CoCa("tiny"), TypeError, "config must be a CoCaConfig"),
        (lambda: model.loss(images[:, :, :20], ids, padding), ValueError, "images must have shape"),
        (lambda: model.loss(images, ids.float(), padding), TypeError, "text_ids must be an int64"),
        (lambda: model.loss(images, ids[:, :1], padding[:, :1]), ValueError, "L >= 2"),
        (lambda: model.loss(images, torch.ones(3, 13, dtype=torch.long)), ValueError, "max_text_len"),
        (lambda: model.loss(images, ids.masked_fill(padding, VOCAB), padding), ValueError, "text_ids"),
        (lambda: model.loss(images, ids, padding.long()), TypeError, "text_padding_mask must be a bool"),
        (lambda: model.loss(images, ids, padding[:, :3]), ValueError, "text_padding_mask must have"),
        (lambda: model.loss(images[:2], ids, padding), ValueError, "same batch"),
        (lambda: model.generate(images, 12, BOS, EOS), ValueError, "max_new_tokens"),
        (lambda: model.generate(images, 3, VOCAB, EOS), ValueError, "bos_id"),
        (lambda: model.generate(images, 3, BOS, -1), ValueError, "eos_id"),
        (lambda: model.generate(images, 3, BOS, EOS, strategy="beam"), ValueError, "strategy"),
        (lambda: model.generate(images, 3, BOS, EOS, temperature=0.0), ValueError, "temperature"),
        (lambda: model.generate(images, 3, BOS, EOS, top_k=0), ValueError, "top_k"),
        (lambda: model.generate(images, 3, BOS, EOS, top_p=1.5), ValueError, "top_p"),
        (lambda: model.generate(images, 3, BOS, EOS, generator=5), TypeError, "generator"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_bad_pooler_inputs_name_the_argument():
    pooler = AttentionalPooler(8, 6, heads=2, queries=3)
    tokens = torch.randn(2, 4, 6)
    cases = [
        (lambda: AttentionalPooler(10, heads=3), ValueError, "divisible"),
        (lambda: AttentionalPooler(8, queries=0), ValueError, "queries"),
        (lambda: pooler(tokens[0]), TypeError, "tokens must be a float tensor"),
        (lambda: pooler(tokens.long()), TypeError, "tokens must be a float tensor"),
        (lambda: pooler(torch.randn(2, 4, 8)), ValueError, "context_dim=6"),
        (lambda: pooler(tokens[:, :0]), ValueError, "M >= 1"),
        (lambda: pooler(tokens, torch.zeros(2, 4)), TypeError, "key_padding_mask must be a bool"),
        (lambda: pooler(tokens, torch.zeros(2, 3, dtype=torch.bool)), ValueError, "key_padding_mask must be"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_config_replace_keeps_checks():
    assert isinstance(coca_tiny().replace(text_depth=2), CoCaConfig)
    with pytest.raises(ValueError, match="text_heads"):
        coca_tiny().replace(text_heads=5)
