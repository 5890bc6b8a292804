"""BLIP (mome.models.blip): shapes, the three losses, parameter sharing between the text encoder and decoder, the
decoder's causal mask, KV-cached generation, CapFilt (``bootstrap``), state_dict, torch.compile, training on the
demo's data and the argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mome.models.blip import BLIP, SHARED_LAYER_MODULES, BLIPConfig, blip_base, blip_tiny, bootstrap
from mome.nn.heads import itm_inputs
from mome.shapes_data import ShapesCaptions
from tests.helpers import assert_close

VOCAB, BOS, EOS, PAD = 23, 1, 2, 0


def _model(dtype=torch.float64, seed=0, **overrides) -> BLIP:
    torch.manual_seed(seed)
    overrides = {"image_size": 24, "vision_depth": 1, "vocab_size": VOCAB, "pad_id": PAD, **overrides}
    return BLIP(blip_tiny(**overrides)).to(dtype)


def _batch(model: BLIP, lengths=(7, 4, 6), seed=1):
    """Random images and right-padded captions ``[bos] words [eos] pad...``, one of each length."""
    gen = torch.Generator().manual_seed(seed)
    c, dtype = model.config, model.image_pos_embed.dtype
    images = torch.randn(len(lengths), c.in_chans, c.image_size, c.image_size, generator=gen, dtype=dtype)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=gen)
    padding = torch.arange(width)[None, :] >= torch.tensor(lengths)[:, None]
    ids[:, 0] = BOS
    ids[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = EOS
    return images, ids.masked_fill(padding, PAD), padding


def _grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


# -- shapes and losses -----------------------------------------------------------------------------------------------
def test_forward_shapes_and_unit_embeddings():
    model = _model()
    images, ids, padding = _batch(model)
    out = model(images, ids, padding)
    c = model.config
    assert out.image_embed.shape == out.text_embed.shape == (3, c.embed_dim)
    assert out.itm_logits.shape == (3, 2)
    assert out.lm_logits.shape == (3, ids.shape[1] - 1, VOCAB)
    ones = torch.ones(3, dtype=torch.float64)
    assert_close(out.image_embed.norm(dim=-1), ones, 1e-12)
    assert_close(out.text_embed.norm(dim=-1), ones, 1e-12)
    assert model.image_tokens(images).shape == (3, c.num_patches + 1, c.vision_dim)
    assert all(torch.isfinite(t).all() for t in out)


def _reference_encoder(model: BLIP, ids, padding, image_tokens=None):
    """The text encoder written out in float64 with a plain softmax attention (masked keys at -inf)."""
    enc, c = model.text_encoder, model.config
    heads, dim = c.text_heads, c.text_dim

    def attend(q, k, v, mask):  # [B, N, D] each; mask [B, M] True = ignore
        split = [t.view(t.shape[0], t.shape[1], heads, dim // heads).transpose(1, 2) for t in (q, k, v)]
        scores = split[0] @ split[1].transpose(-1, -2) / math.sqrt(dim // heads)
        if mask is not None:
            scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
        return (scores.softmax(-1) @ split[2]).transpose(1, 2).reshape(q.shape)

    x = enc.token_embed.weight[ids] + enc.pos_embed[: ids.shape[1]]
    x[:, 0] = (enc.cls_prompt if image_tokens is None else enc.enc_prompt) + enc.pos_embed[0]
    for layer in enc.layers:
        h = F.layer_norm(x, (dim,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
        x = x + layer.proj(attend(*layer.qkv(h).chunk(3, dim=-1), padding))
        if image_tokens is not None:
            h = F.layer_norm(x, (dim,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
            x = x + layer.cross_out(attend(layer.cross_q(h), *layer.cross_kv(image_tokens).chunk(2, dim=-1), None))
        h = F.layer_norm(x, (dim,), layer.norm3.weight, layer.norm3.bias, layer.norm3.eps)
        x = x + layer.fc2(F.gelu(layer.fc1(h)))
    return enc.norm(x)


@pytest.mark.parametrize("grounded", [False, True])
def test_text_encoder_matches_reference_with_gradients(grounded):
    model = _model()
    images, ids, padding = _batch(model, lengths=(5, 3, 4))
    image_tokens = model.image_tokens(images).detach().requires_grad_(grounded)
    context = image_tokens if grounded else None
    got = model.text_encoder(ids, padding, context)
    want = _reference_encoder(model, ids, padding, context)
    assert_close(got, want, 1e-10)
    weight = torch.randn_like(got)
    leaves = [p for p in model.text_encoder.parameters() if p.requires_grad] + ([image_tokens] if grounded else [])
    for index, (a, b) in enumerate(zip(_grads((got * weight).sum(), leaves), _grads((want * weight).sum(), leaves),
                                       strict=True)):  # fmt: skip
        assert (a is None) == (b is None), f"leaf {index}: reached by one and not the other"
        if a is not None:
            assert_close(a, b, 1e-9, f"grad of leaf {index}")


def test_losses_equal_their_definitions():
    model = _model()
    images, ids, padding = _batch(model, lengths=(7, 4, 6, 5))
    positive_ids = torch.tensor([0, 1, 0, 2])  # pairs 0 and 2 are each other's positives: never hard negatives
    losses = model.loss(images, ids, padding, positive_ids, torch.Generator().manual_seed(3))
    out = model(images, ids, padding)
    logits = model.itc.scale * out.image_embed @ out.text_embed.T
    positives = (positive_ids[:, None] == positive_ids[None, :]).double()
    targets = positives / positives.sum(1, keepdim=True)
    itc = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    assert_close(losses.itc, itc, 1e-10, "itc")
    # the same draw: ITM on the positives and one hard negative text per image and image per text
    tokens = model.image_tokens(images)
    drawn = model.itc_output(tokens, model.text_states(ids, padding), positive_ids, torch.Generator().manual_seed(3))
    for negatives in (drawn.neg_text_idx, drawn.neg_image_idx):
        assert (negatives >= 0).all() and (positive_ids[negatives] != positive_ids).all()
    pair_tokens, pair_ids, pair_padding, labels = itm_inputs(tokens, ids, padding, drawn.neg_text_idx,
                                                             drawn.neg_image_idx)  # fmt: skip
    assert labels.tolist() == [1] * 4 + [0] * 8
    itm = F.cross_entropy(model.match_logits(pair_tokens, pair_ids, pair_padding), labels)
    assert_close(losses.itm, itm, 1e-10, "itm")
    lm_targets = ids[:, 1:].masked_fill(ids[:, 1:] == PAD, -100)
    lm = F.cross_entropy(out.lm_logits.reshape(-1, VOCAB), lm_targets.reshape(-1), ignore_index=-100)
    assert_close(losses.lm, lm, 1e-10, "lm")
    assert_close(losses.loss, itc + itm + lm, 1e-10, "loss")


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_text_embedding_and_match_do_not_depend_on_padding(pool):
    model = _model(itc_pool=pool)
    images, ids, padding = _batch(model, lengths=(5, 3))
    longer = torch.cat([ids, torch.full((2, 4), PAD)], dim=1)
    assert_close(model.encode_text(longer, longer == PAD), model.encode_text(ids, padding), 1e-12)
    assert_close(model.itm_logits(images, longer, longer == PAD), model.itm_logits(images, ids, padding), 1e-12)
    states, tokens = model.text_states(ids, padding), model.image_tokens(images)
    if pool == "cls":
        text_feature, image_feature = states[:, 0], tokens[:, 0]
    else:
        text_feature = torch.stack([states[i, : int((~padding[i]).sum())].mean(0) for i in range(2)])
        image_feature = tokens.mean(1)
    assert_close(model.encode_text(ids, padding), F.normalize(model.itc.text_proj(text_feature), dim=-1), 1e-12)
    assert_close(model.encode_image(images), F.normalize(model.itc.image_proj(image_feature), dim=-1), 1e-12)


# -- sharing, causality ----------------------------------------------------------------------------------------------
def test_encoder_and_decoder_share_exactly_all_but_self_attention():
    model = _model()
    encoder, decoder = model.text_encoder, model.text_decoder
    assert encoder.token_embed is decoder.token_embed and encoder.pos_embed is decoder.pos_embed
    assert encoder.norm is decoder.norm
    for enc_layer, dec_layer in zip(encoder.layers, decoder.layers, strict=True):
        for name in SHARED_LAYER_MODULES:
            assert getattr(enc_layer, name) is getattr(dec_layer, name), name
        own = {id(p) for m in (enc_layer.norm1, enc_layer.qkv, enc_layer.proj) for p in m.parameters()}
        theirs = {id(p) for m in (dec_layer.norm1, dec_layer.self_qkv, dec_layer.self_out) for p in m.parameters()}
        assert not own & theirs
    # the whole accounting: what both hold is the shared list, nothing more
    enc_params = {id(p): name for name, p in encoder.named_parameters()}
    dec_params = {id(p): name for name, p in decoder.named_parameters()}
    depth = len(encoder.layers)
    shared = sorted(enc_params[key] for key in enc_params.keys() & dec_params.keys())
    embeddings_and_norm = ["norm.bias", "norm.weight", "pos_embed", "token_embed.weight"]
    assert shared == sorted(embeddings_and_norm + _names(depth, SHARED_LAYER_MODULES))
    encoder_only = sorted(enc_params[key] for key in enc_params.keys() - dec_params.keys())
    assert encoder_only == ["cls_prompt", "enc_prompt", *_names(depth, ("norm1", "qkv", "proj"))]
    decoder_only = sorted(dec_params[key] for key in dec_params.keys() - enc_params.keys())
    assert decoder_only == sorted(["lm_head.bias", *_names(depth, ("norm1", "self_qkv", "self_out"))])


def _names(depth: int, modules) -> list[str]:
    """Sorted parameter names of ``modules`` (Linear / LayerNorm: weight and bias) in every layer."""
    return sorted(f"layers.{i}.{name}.{kind}" for i in range(depth) for name in modules for kind in ("weight", "bias"))


def test_decoder_is_causal_and_encoder_is_not():
    model = _model()
    images, ids, padding = _batch(model, lengths=(7, 7))
    tokens = model.image_tokens(images)
    changed = ids.clone()
    changed[:, 4:] = (ids[:, 4:] + 5) % VOCAB
    before, after = model.text_decoder(ids, tokens), model.text_decoder(changed, tokens)
    assert_close(after[:, :4], before[:, :4], 1e-12)
    assert (after[:, 4:] - before[:, 4:]).abs().amax() > 1e-6  # the later positions do read the change
    cls_before, cls_after = model.text_states(ids)[:, 0], model.text_states(changed)[:, 0]
    assert (cls_after - cls_before).abs().amax() > 1e-6  # the encoder's [CLS] reads every token


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
    assert_close(model.text_decoder(ids[:, :-1], model.image_tokens(images)), logits, 1e-10)


# -- CapFilt ---------------------------------------------------------------------------------------------------------
def _labelled_pairs(labels, shuffled, size=24):
    """Images of constant value ``label`` and captions ``[bos, 4 + label, eos]``, of another label where shuffled."""
    pairs = []
    for label, wrong in zip(labels, shuffled, strict=True):
        image = torch.full((3, size, size), float(label), dtype=torch.float64)
        word = 4 + (label + 1) % 4 if wrong else 4 + label
        pairs.append((image, torch.tensor([BOS, word, EOS])))
    return pairs


def _controlled_filter(monkeypatch) -> BLIP:
    """A BLIP whose ITM says "match" exactly when the caption's first word is 4 + the image's value."""
    model = _model(seed=2)
    monkeypatch.setattr(model, "image_tokens", lambda images: images[:, :1, :1, :1].reshape(-1, 1, 1))
    seen = []

    def match_logits(image_tokens, text_ids, text_padding_mask=None):
        seen.append((text_ids.clone(), text_padding_mask.clone()))
        match = text_ids[:, 1] == 4 + image_tokens[:, 0, 0].long()
        return torch.stack([torch.zeros(len(match)), torch.where(match, 5.0, -5.0)], dim=1).double()

    monkeypatch.setattr(model, "match_logits", match_logits)
    model.seen = seen
    return model


def test_capfilt_keeps_matching_pairs_and_drops_shuffled_ones(monkeypatch):
    captioner, filter_ = _model(seed=1).eval(), _controlled_filter(monkeypatch)
    labels, shuffled = [0, 1, 2, 3, 1], [False, True, False, True, False]
    pairs = _labelled_pairs(labels, shuffled)
    images = torch.stack([image for image, _ in pairs])
    written = captioner.generate(images, 4, BOS, EOS)
    kept = bootstrap(captioner, filter_, pairs, bos_id=BOS, eos_id=EOS, max_new_tokens=4, strategy="greedy",
                     batch_size=2)  # fmt: skip
    expected = []
    for row, (_, text) in enumerate(pairs):
        if not shuffled[row]:
            expected.append((row, text.tolist(), False))
        ids = written[row].tolist()
        ids = ids[: ids.index(EOS) + 1] if EOS in ids else [t for t in ids if t != PAD] or [BOS]
        if len(ids) > 1 and ids[1] == 4 + labels[row]:
            expected.append((row, ids, True))
    got = _rows(pairs, kept)
    assert got == expected
    assert [k for k in got if not k[2]] == [(0, [BOS, 4, EOS], False), (2, [BOS, 6, EOS], False),
                                          (4, [BOS, 5, EOS], False)]  # fmt: skip
    # the filter saw each chunk's originals then its synthetic captions, right-padded, padding marked
    ids, padding = filter_.seen[0]
    assert ids.shape[0] == 4 and torch.equal(padding, ids == PAD)
    at_once = bootstrap(captioner, filter_, pairs, bos_id=BOS, eos_id=EOS, max_new_tokens=4, strategy="greedy",
                        batch_size=32)  # fmt: skip
    assert _rows(pairs, at_once) == got


def _rows(pairs, kept) -> list[tuple[int, list[int], bool]]:
    """Each kept pair as (the row of its image among ``pairs``, its caption ids, synthetic)."""
    images = [id(image) for image, _ in pairs]
    return [(images.index(id(k.image)), k.text_ids.tolist(), k.synthetic) for k in kept]


def test_capfilt_with_a_captioner_that_is_right_keeps_its_captions(monkeypatch):
    filter_ = _controlled_filter(monkeypatch)
    captioner = _model(seed=1)

    def right_captions(images, max_new_tokens, bos_id, eos_id, **options):
        label = images[:, 0, 0, 0].long()
        return torch.stack([torch.full_like(label, bos_id), 4 + label, torch.full_like(label, eos_id),
                            torch.full_like(label, PAD)], dim=1)  # fmt: skip

    monkeypatch.setattr(captioner, "generate", right_captions)
    pairs = _labelled_pairs([3, 0, 2], [True, True, True])
    kept = bootstrap(captioner, filter_, pairs, bos_id=BOS, eos_id=EOS)
    assert [(k.text_ids.tolist(), k.synthetic) for k in kept] == [([BOS, 7, EOS], True), ([BOS, 4, EOS], True),
                                                                  ([BOS, 6, EOS], True)]  # fmt: skip
    assert all(k.image is p[0] for k, p in zip(kept, pairs, strict=True))


def test_capfilt_decisions_are_the_filters_itm_probabilities():
    captioner, filter_ = _model(seed=1).eval(), _model(seed=3).eval()
    images, ids, padding = _batch(filter_, lengths=(7, 4, 6, 5, 3))
    pairs = [(images[i], ids[i]) for i in range(5)]
    probs = filter_.itm_logits(images, ids, padding).softmax(-1)[:, 1]
    # an untrained head scores every pair near one value: cut between the 2nd and 3rd lowest, far from either
    low = probs.detach().sort().values
    assert low[2] - low[1] > 1e-9
    threshold = float(low[1] + low[2]) / 2
    originals = [i for i in range(5) if probs[i] > threshold]
    assert len(originals) == 3  # the case checks both kept and dropped pairs
    gen = torch.Generator().manual_seed(0)
    kept = bootstrap(captioner, filter_, pairs, bos_id=BOS, eos_id=EOS, max_new_tokens=5, generator=gen,
                     threshold=threshold)  # fmt: skip
    given = [id(text) for _, text in pairs]
    rows = [given.index(id(k.text_ids)) for k in kept if not k.synthetic]  # originals come back as given
    assert rows == originals
    everything = bootstrap(captioner, filter_, pairs, bos_id=BOS, eos_id=EOS, max_new_tokens=5, threshold=0.0)
    assert len(everything) == 10 and [k.synthetic for k in everything] == [False, True] * 5
    for pair in everything[1::2]:
        assert pair.text_ids[0] == BOS and pair.text_ids.shape[0] <= 6


def test_capfilt_bad_arguments_name_them():
    model = _model()
    images, ids, _ = _batch(model)
    pairs = [(images[0], ids[0])]
    cases = [
        (lambda: bootstrap("model", model, pairs, bos_id=BOS, eos_id=EOS), TypeError, "captioner and filter"),
        (lambda: bootstrap(model, model, pairs, bos_id=BOS, eos_id=EOS, batch_size=0), ValueError, "batch_size"),
        (lambda: bootstrap(model, model, pairs, bos_id=BOS, eos_id=EOS, threshold=1.0), ValueError, "threshold"),
        (lambda: bootstrap(model, model, [images[0]], bos_id=BOS, eos_id=EOS), TypeError, "pairs must yield"),
        (lambda: bootstrap(model, model, [(images, ids[0])], bos_id=BOS, eos_id=EOS), ValueError, "image must"),
        (lambda: bootstrap(model, model, [(images[0], ids)], bos_id=BOS, eos_id=EOS), ValueError, "text_ids must"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


# -- training, state_dict, compile -----------------------------------------------------------------------------------
def test_loss_decreases_on_the_demo_data():
    torch.manual_seed(0)
    data = ShapesCaptions(seed=0, image_size=24, jitter=0.03)
    model = BLIP(blip_tiny(image_size=24, vocab_size=data.tokenizer.vocab_size, max_text_len=data.max_len,
                           vision_depth=1, text_depth=1))  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    totals = []
    for _ in range(25):
        batch = data.train_batch(16)
        ids = batch.canonical_text_ids
        losses = model.loss(batch.images, ids, ids == 0, positive_ids=batch.caption_ids, generator=gen)
        optimizer.zero_grad()
        losses.loss.backward()
        optimizer.step()
        totals.append(losses.loss.item())
    first, last = sum(totals[:5]) / 5, sum(totals[-5:]) / 5
    # mostly the LM loss: ITC and ITM of a model this small take ~100 steps to leave ln(16) and ln(2) (see the demo)
    assert last < 0.85 * first, f"loss went from {first:.3f} to {last:.3f} over 25 steps"


def test_state_dict_round_trip_keeps_the_sharing():
    model = _model(seed=0)
    images, ids, padding = _batch(model)
    copy = _model(seed=1)
    assert not torch.equal(copy.itm.classifier.weight, model.itm.classifier.weight)
    copy.load_state_dict(model.state_dict())  # strict
    got = copy.loss(images, ids, padding, generator=torch.Generator().manual_seed(0))
    want = model.loss(images, ids, padding, generator=torch.Generator().manual_seed(0))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert copy.text_encoder.layers[0].fc1 is copy.text_decoder.layers[0].fc1
    keys = model.state_dict().keys()
    assert {"itc.temperature", "text_encoder.enc_prompt", "text_decoder.layers.0.self_qkv.weight"} <= set(keys)
    assert "patch_embed.mask_token" not in keys


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torch_compile_training_step_equals_eager():
    torch._dynamo.reset()
    model = _model(dtype=torch.float32, text_depth=1)
    images, ids, padding = _batch(model)
    named = list(model.named_parameters())
    params = [p for _, p in named]

    def step(images, ids, padding):
        return model.loss(images, ids, padding, generator=torch.Generator().manual_seed(4)).loss

    # not fullgraph: the hard-negative draw (a seed from the generator) and itm_inputs' data-dependent row selection
    # break the graph
    compiled = torch.compile(step, backend="inductor")
    got, want = compiled(images, ids, padding), step(images, ids, padding)
    assert_close(got, want, 1e-5, "loss")
    for (name, _), a, b in zip(named, _grads(got, params), _grads(want, params), strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(a, b, 1e-4, f"grad of {name}")
    torch._dynamo.reset()


def test_blip_base_is_blip_base():
    c = blip_base()
    assert (c.image_size, c.patch_size, c.vision_dim, c.vision_depth, c.vision_heads) == (224, 16, 768, 12, 12)
    assert (c.text_dim, c.text_depth, c.text_heads, c.embed_dim, c.label_smoothing) == (768, 12, 12, 256, 0.1)
    with torch.device("meta"):
        params = sum(p.numel() for p in BLIP(c).parameters())
    # ViT-B/16 86M + BERT-base 109M (35 positions, no token types) + cross-attention 28M + the decoder's own
    # self-attention 28M; parameters the encoder and decoder share count once
    assert 249e6 < params < 254e6


def test_train_blip_reports_the_demo_metrics():
    from mome.demo_blip import BLIPDemoOptions, train_blip

    metrics = train_blip(BLIPDemoOptions(steps=2, batch_size=8, eval_size=8, image_size=24, itm_pairs=4,
                                         capfilt_pairs=4, quiet=True))  # fmt: skip
    for direction in ("image_to_text", "text_to_image"):
        assert 0.0 <= metrics["retrieval"][direction]["R@1"] <= metrics["retrieval"][direction]["R@5"] <= 1.0
    for kind in ("random", "hard"):
        assert 0.0 <= metrics["itm"][f"{kind}_negatives"]["balanced_accuracy"] <= 1.0
    assert 0.0 <= metrics["caption_exact_match"] <= metrics["caption_word_accuracy"] <= 1.0
    assert metrics["capfilt"]["pairs"] == 4
    assert len(metrics["history"]["itc"]) == len(metrics["history"]["itm"]) == len(metrics["history"]["lm"]) == 2


# -- argument checks -------------------------------------------------------------------------------------------------
_BAD_CONFIGS = [
    (dict(vision_dim=65), "vision_dim"),
    (dict(text_depth=0), "text_depth"),
    (dict(max_text_len=1), "max_text_len"),
    (dict(pad_id=99, vocab_size=32), "pad_id"),
    (dict(itm_weight=-1.0), "itm_weight"),
    (dict(image_size=50), "image_size"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(itm_class_balance=1), "itm_class_balance"),
    (dict(itc_pool="max"), "itc_pool"),
]


@pytest.mark.parametrize("overrides, name", _BAD_CONFIGS)
def test_bad_config_names_the_field(overrides, name):
    with pytest.raises(ValueError, match=name):
        blip_tiny(**overrides)


def test_bad_model_inputs_name_the_argument():
    model = _model()
    images, ids, padding = _batch(model)
    cases = [
        (lambda: BLIP("tiny"), TypeError, "config must be a BLIPConfig"),
        (lambda: model.loss(images[:, :, :20], ids, padding), ValueError, "images must have shape"),
        (lambda: model.loss(images, ids.float(), padding), TypeError, "text_ids must be an int64"),
        (lambda: model.loss(images, ids[:, :1], padding[:, :1]), ValueError, "L >= 2"),
        (lambda: model.loss(images, torch.ones(3, 13, dtype=torch.long)), ValueError, "max_len"),
        (lambda: model.loss(images, ids.masked_fill(padding, VOCAB), padding), ValueError, "text_ids"),
        (lambda: model.loss(images, ids, padding.long()), TypeError, "text_padding_mask must be a bool"),
        (lambda: model.loss(images, ids, padding[:, :3]), ValueError, "text_padding_mask must have"),
        (lambda: model.loss(images[:2], ids, padding), ValueError, "same batch"),
        (lambda: model.itm_logits(images[:2], ids, padding), ValueError, "same batch"),
        (lambda: model.match_logits(torch.randn(3, 5, 7).double(), ids, padding), ValueError, "image_tokens must"),
        (lambda: model.generate(images, 12, BOS, EOS), ValueError, "max_new_tokens"),
        (lambda: model.generate(images, 3, VOCAB, EOS), ValueError, "bos_id"),
        (lambda: model.generate(images, 3, BOS, EOS, strategy="beam"), ValueError, "strategy"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_config_replace_keeps_checks():
    assert isinstance(blip_tiny().replace(text_depth=3), BLIPConfig)
    with pytest.raises(ValueError, match="text_heads"):
        blip_tiny().replace(text_heads=5)
