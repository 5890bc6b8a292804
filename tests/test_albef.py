"""ALBEF (mome.models.albef): shapes, the three losses against their definitions, the momentum encoders and the
queue, ITM's hard negatives, padding, retrieval, state_dict, torch.compile, training on the demo's data and the
argument checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import mome.models.albef as albef_module
from mome.demo_metrics import recall_at
from mome.models.albef import ALBEF, ALBEFConfig, FusionLayer, albef_base, albef_tiny
from mome.nn.heads import IGNORE_INDEX
from mome.shapes_data import ShapesCaptions
from tests.helpers import assert_close

VOCAB, CLS, SEP, PAD, MASK = 23, 1, 2, 0, 3


def _model(dtype=torch.float64, seed=0, **overrides) -> ALBEF:
    torch.manual_seed(seed)
    overrides = {"image_size": 24, "vision_depth": 1, "vocab_size": VOCAB, "pad_id": PAD, "mask_id": MASK,
                 "special_ids": (PAD, CLS, SEP, MASK), "queue_size": 11, "embed_dim": 16, "mlm_prob": 0.5,
                 **overrides}  # fmt: skip
    return ALBEF(albef_tiny(**overrides)).to(dtype)


def _batch(model: ALBEF, lengths=(7, 4, 6, 5), seed=1):
    """Random images and right-padded texts ``[CLS] words [SEP] pad...``, one of each length."""
    gen = torch.Generator().manual_seed(seed)
    c, dtype = model.config, model.vision_proj.weight.dtype
    images = torch.randn(len(lengths), c.in_chans, c.image_size, c.image_size, generator=gen, dtype=dtype)
    width = max(lengths)
    ids = torch.randint(4, VOCAB, (len(lengths), width), generator=gen)
    padding = torch.arange(width)[None, :] >= torch.tensor(lengths)[:, None]
    ids[:, 0] = CLS
    ids[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = SEP
    return images, ids.masked_fill(padding, PAD), padding


def _online_params(model: ALBEF) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


class _Spy:
    """Records what ``loss`` passed to and got from a helper of mome.models.albef."""

    def __init__(self, monkeypatch, name: str) -> None:
        self.calls, real = [], getattr(albef_module, name)

        def recording(*args):
            out = real(*args)
            self.calls.append((args, out))
            return out

        monkeypatch.setattr(albef_module, name, recording)


# -- shapes ----------------------------------------------------------------------------------------------------------
def test_forward_shapes_and_unit_embeddings():
    model = _model()
    images, ids, padding = _batch(model)
    c, batch, length = model.config, ids.shape[0], ids.shape[1]
    image = model.image_states(images)
    text = model.text_states(ids, padding)
    assert image.shape == (batch, c.num_patches + 1, c.vision_dim)
    assert text.shape == (batch, length, c.text_dim)
    assert model.fused_states(text, padding, image).shape == (batch, length, c.text_dim)
    ones = torch.ones(batch, dtype=torch.float64)
    assert_close(model.encode_image(images).norm(dim=-1), ones, 1e-12)
    assert_close(model.encode_text(ids, padding).norm(dim=-1), ones, 1e-12)
    assert model.itm_logits(images, ids, padding).shape == (batch, 2)
    losses = model.loss(images, ids, padding)
    assert set(losses) == {"itc", "itm", "mlm", "total"}
    assert all(value.dim() == 0 and torch.isfinite(value) for value in losses.values())


def _attention(q, k, v, padding):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if padding is not None:
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v


def _fusion_reference(layer: FusionLayer, x, padding, image):
    """One fusion layer written out in float64: bidirectional self-attention, cross-attention, GELU FFN."""
    heads = layer.heads

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    def merge(t):
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)

    q, k, v = layer.self_qkv(layer.norm1(x)).chunk(3, dim=-1)
    x = x + layer.self_out(merge(_attention(split(q), split(k), split(v), padding)))
    k, v = layer.cross_kv(image).chunk(2, dim=-1)
    x = x + layer.cross_out(merge(_attention(split(layer.cross_q(layer.norm2(x))), split(k), split(v), None)))
    return x + layer.fc2(F.gelu(layer.fc1(layer.norm3(x))))


def test_fusion_layer_matches_reference_with_gradients():
    torch.manual_seed(3)
    layer = FusionLayer(12, 3, 20, 10).double()
    x = torch.randn(3, 7, 12, dtype=torch.float64, requires_grad=True)
    image = torch.randn(3, 5, 10, dtype=torch.float64, requires_grad=True)
    padding = torch.arange(7)[None, :] >= torch.tensor([7, 3, 5])[:, None]
    out = layer(x, padding, *layer.image_kv(image))
    expected = _fusion_reference(layer, x, padding, image)
    assert_close(out, expected, 1e-10)
    weight = torch.randn_like(out)
    leaves = [x, image, *layer.parameters()]
    got = torch.autograd.grad((out * weight).sum(), leaves)
    want = torch.autograd.grad((expected * weight).sum(), leaves)
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        assert_close(a, b, 1e-9, f"gradient {index}")
    with pytest.raises(TypeError, match="no one-token decoding step"):
        layer.step(x[:, 0], None, None, 0, None, None, None)


def test_states_do_not_depend_on_padding():
    """The unpadded tokens' unimodal and fused states, the embedding and the ITM logits stay the same with more
    padding and junk ids under it."""
    model = _model()
    images, ids, padding = _batch(model, lengths=(5, 3))
    longer = torch.cat([ids, torch.full((2, 3), PAD)], dim=1).masked_fill(
        torch.cat([padding, torch.ones(2, 3, dtype=torch.bool)], dim=1), 9
    )
    long_padding = torch.cat([padding, torch.ones(2, 3, dtype=torch.bool)], dim=1)
    image = model.image_states(images)
    short_text, long_text = model.text_states(ids, padding), model.text_states(longer, long_padding)
    keep = ~padding
    assert_close(long_text[:, :5][keep], short_text[keep], 1e-12)
    short_fused = model.fused_states(short_text, padding, image)
    long_fused = model.fused_states(long_text, long_padding, image)
    assert_close(long_fused[:, :5][keep], short_fused[keep], 1e-12)
    assert_close(model.encode_text(longer, long_padding), model.encode_text(ids, padding), 1e-12)
    assert_close(model.itm_logits(images, longer, long_padding), model.itm_logits(images, ids, padding), 1e-12)


# -- the losses against their definitions -------------------------------------------------------------------------
def _momentum_feats(model: ALBEF, images, ids, padding):
    with torch.no_grad():
        image = F.normalize(model.vision_proj_m(model.visual_encoder_m(images)[:, 0]), dim=-1)
        text = F.normalize(model.text_proj_m(model.text_encoder_m(ids, padding)[:, 0]), dim=-1)
    return image, text


def _perturb_momentum(model: ALBEF, seed=7):
    """Momentum weights unlike the online ones, as after training: the distilled targets then differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, momentum in model.momentum_pairs():
            for p in momentum.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_itc_is_albefs_distilled_contrastive_loss_with_the_queue():
    model = _model()
    _perturb_momentum(model)
    images, ids, padding = _batch(model)
    positive_ids = torch.tensor([5, 8, 5, 6])  # pairs 0 and 2 are each other's positives
    queue = model.itc.queue
    image_queue, text_queue = queue.image_queue.clone(), queue.text_queue.clone()
    losses = model.loss(images, ids, padding, positive_ids=positive_ids)
    alpha, scale = model.config.alpha, model.itc.scale
    image_feat, text_feat = model.encode_image(images), model.encode_text(ids, padding)
    image_m, text_m = _momentum_feats(model, images, ids, padding)
    text_columns, image_columns = torch.cat([text_m, text_queue]), torch.cat([image_m, image_queue])
    same = (positive_ids[:, None] == positive_ids[None, :]).double()
    hard = torch.cat([same, torch.zeros(4, queue.size, dtype=torch.float64)], dim=1)  # queue ids are -1: negatives
    hard = hard / hard.sum(1, keepdim=True)

    def direction(rows, rows_m, columns):
        targets = alpha * (scale.detach() * rows_m @ columns.T).softmax(1) + (1 - alpha) * hard  # constants
        return -(targets * (scale * rows @ columns.T).log_softmax(1)).sum(1).mean()

    expected = (direction(image_feat, image_m, text_columns) + direction(text_feat, text_m, image_columns)) / 2
    assert_close(losses["itc"], expected, 1e-10)
    named = _online_params(model)
    got = torch.autograd.grad(losses["itc"], [p for _, p in named], allow_unused=True)
    want = torch.autograd.grad(expected, [p for _, p in named], allow_unused=True)
    for (name, param), a, b in zip(named, got, want, strict=True):
        zeros = torch.zeros_like(param)
        assert_close(zeros if a is None else a, zeros if b is None else b, 1e-9, f"grad of {name}")


@pytest.mark.parametrize("balanced", [False, True])
def test_itm_loss_is_the_cross_entropy_of_the_pairs_itc_picked(monkeypatch, balanced):
    spy = _Spy(monkeypatch, "itm_inputs")
    model = _model(itm_balanced=balanced)
    images, ids, padding = _batch(model)
    losses = model.loss(images, ids, padding, generator=torch.Generator().manual_seed(2))
    (_, _, _, neg_text, neg_image), _ = spy.calls[0]
    rows = torch.arange(4)
    pair_images = torch.cat([rows, rows, neg_image])
    pair_texts = torch.cat([rows, neg_text, rows])
    labels = torch.tensor([1] * 4 + [0] * 8)
    logits = model.itm_logits(images[pair_images], ids[pair_texts], padding[pair_texts])
    per_pair = F.cross_entropy(logits, labels, reduction="none")
    # balanced: the 4 matches and the 8 non-matches each weigh half
    expected = per_pair[:4].mean() / 2 + per_pair[4:].mean() / 2 if balanced else per_pair.mean()
    assert_close(losses["itm"], expected, 1e-10)


@pytest.mark.parametrize("distill", [False, True])
def test_mlm_loss_is_the_masked_cross_entropy(monkeypatch, distill):
    spy = _Spy(monkeypatch, "mask_tokens")
    model = _model(mlm_distill=distill)
    _perturb_momentum(model)
    images, ids, padding = _batch(model)
    losses = model.loss(images, ids, padding, generator=torch.Generator().manual_seed(4))
    (_, (masked, labels)) = spy.calls[0]
    chosen = labels != IGNORE_INDEX
    assert chosen.any() and not chosen[padding].any() and not chosen[:, 0].any()  # never pad, never the [CLS]
    assert torch.equal(labels[chosen], ids[chosen])

    def logits(text_encoder, fusion_encoder, head, visual_encoder):
        hidden = fusion_encoder(text_encoder(masked, padding), padding, visual_encoder(images))
        return head(hidden)[chosen]

    online = logits(model.text_encoder, model.fusion_encoder, model.mlm_head, model.visual_encoder)
    expected = F.cross_entropy(online, labels[chosen])
    if distill:
        with torch.no_grad():
            soft = logits(model.text_encoder_m, model.fusion_encoder_m, model.mlm_head_m, model.visual_encoder_m)
        distilled = -(soft.softmax(1) * online.log_softmax(1)).sum(1).mean()
        alpha = model.config.alpha
        assert distilled.item() > expected.item() + 1e-6 or distilled.item() < expected.item() - 1e-6
        expected = (1 - alpha) * expected + alpha * distilled
    assert_close(losses["mlm"], expected, 1e-10)
    c = model.config
    total = c.itc_weight * losses["itc"] + c.itm_weight * losses["itm"] + c.mlm_weight * losses["mlm"]
    assert_close(losses["total"], total, 1e-12)


def test_mlm_without_a_masked_token_is_zero_and_keeps_the_graph():
    model = _model(mlm_prob=0.0)
    images, ids, padding = _batch(model)
    losses = model.loss(images, ids, padding)
    assert losses["mlm"].item() == 0.0 and losses["mlm"].requires_grad
    losses["total"].backward()


# -- momentum encoders and the queue --------------------------------------------------------------------------------
def test_momentum_encoders_have_no_gradients_and_move_by_ema():
    model = _model()
    momentum_params = [p for _, m in model.momentum_pairs() for p in m.parameters()]
    assert momentum_params and not any(p.requires_grad for p in momentum_params)
    assert model.mlm_head_m.decoder.weight is model.text_encoder_m.token_embed.weight  # tied like the online pair
    for online, momentum in model.momentum_pairs():  # start as exact copies
        for p, p_m in zip(online.parameters(), momentum.parameters(), strict=True):
            assert torch.equal(p, p_m)
    images, ids, padding = _batch(model)
    model.loss(images, ids, padding)["total"].backward()
    assert all(p.grad is None for p in momentum_params)
    before = [p.detach().clone() for p in momentum_params]
    optimizer = torch.optim.SGD([p for _, p in _online_params(model)], lr=0.5)
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(momentum_params, before, strict=True))  # the optimizer never moves
    model.update_momentum()
    rate = model.config.momentum
    online_params = [p for online, _ in model.momentum_pairs() for p in online.parameters()]
    moved = 0
    for p, p_m, b in zip(online_params, momentum_params, before, strict=True):
        assert_close(p_m, rate * b + (1 - rate) * p.detach(), 1e-14)
        moved += not torch.equal(p_m, b)
    assert moved > len(momentum_params) // 2


def test_queue_takes_the_momentum_features_in_training_only():
    model = _model()
    _perturb_momentum(model)
    queue = model.itc.queue
    images, ids, padding = _batch(model)
    start = queue.image_queue.clone()
    model.eval()
    model.loss(images, ids, padding, positive_ids=torch.tensor([3, 4, 5, 6]))
    assert torch.equal(queue.image_queue, start) and int(queue.ptr) == 0
    model.train()
    for step in range(3):  # 4 rows a step into 11: the third wraps around
        positive_ids = torch.tensor([10, 11, 12, 13]) + 4 * step
        model.loss(images, ids, padding, positive_ids=positive_ids)
    image_m, text_m = _momentum_feats(model, images, ids, padding)
    rows = torch.arange(8, 12) % 11
    assert_close(queue.image_queue[rows], image_m, 1e-14)
    assert_close(queue.text_queue[rows], text_m, 1e-14)
    assert torch.equal(queue.ids[rows], torch.tensor([18, 19, 20, 21]))
    assert int(queue.ptr) == 1
    assert not torch.allclose(image_m, model.encode_image(images))  # the momentum features, not the online ones


# -- ITM negatives ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("random_share", [0.0, 0.5, 1.0])
def test_itm_negatives_are_never_a_positive_pair(monkeypatch, random_share):
    """ITC's hard negatives, and those drawn uniformly among other ids in their place, are never a pair of the
    positive's id."""
    spy = _Spy(monkeypatch, "itm_inputs")
    model = _model(itm_random_negatives=random_share)
    images, ids, padding = _batch(model, lengths=(7, 4, 6, 5, 3, 6))
    positive_ids = torch.tensor([0, 1, 0, 2, 1, 3])  # repeated scenes: 0 and 2, 1 and 4
    for seed in range(8):
        model.loss(images, ids, padding, positive_ids=positive_ids, generator=torch.Generator().manual_seed(seed))
    picked = set()
    for (_, _, _, neg_text, neg_image), (_, _, _, labels) in spy.calls:
        assert (neg_text >= 0).all() and (neg_image >= 0).all()
        assert (positive_ids[neg_text] != positive_ids).all()
        assert (positive_ids[neg_image] != positive_ids).all()
        assert torch.equal(labels, torch.tensor([1] * 6 + [0] * 12))
        picked |= set(neg_text.tolist())
    assert len(picked) > 2  # drawn, not one fixed answer


def test_a_batch_of_one_scene_has_no_itm_negatives():
    model = _model()
    images, ids, padding = _batch(model, lengths=(7, 4))
    losses = model.loss(images, ids, padding, positive_ids=torch.tensor([2, 2]))
    assert_close(losses["itm"], F.cross_entropy(model.itm_logits(images, ids, padding), torch.ones(2).long()), 1e-10)


# -- retrieval -------------------------------------------------------------------------------------------------------
def test_retrieval_metrics_come_from_encode_image_and_encode_text():
    from mome.demo_albef import evaluate
    from mome.shapes_data import CaptionBatch

    model = _model()
    images, ids, padding = _batch(model, lengths=(7, 4, 6, 5, 3, 6, 2))
    batch = CaptionBatch(images, ids, padding, torch.arange(7), ["x"] * 7, [("x",)] * 7, ids)
    metrics = evaluate(model, batch, seed=0, device=torch.device("cpu"))
    image_embed = torch.cat([model.encode_image(images[i : i + 1]) for i in range(7)])  # one at a time
    text_embed = torch.cat([model.encode_text(ids[i : i + 1, : int((~padding[i]).sum())]) for i in range(7)])
    similarity = image_embed @ text_embed.T
    retrieval = metrics["retrieval"]
    for k in (1, 5):
        assert retrieval["image_to_text"][f"R@{k}"] == recall_at(similarity, k)
        assert retrieval["text_to_image"][f"R@{k}"] == recall_at(similarity.T, k)
    itm = metrics["itm"]["hard_negatives"]
    assert itm["pairs"] == 14 and 0.0 <= itm["balanced_accuracy"] <= 1.0


# -- training, state_dict, compile -----------------------------------------------------------------------------------
def test_loss_decreases_on_the_demo_data():
    torch.manual_seed(0)
    data = ShapesCaptions(seed=0, image_size=24, jitter=0.03)
    tokenizer = data.tokenizer
    model = ALBEF(albef_tiny(image_size=24, vocab_size=tokenizer.vocab_size, max_text_len=data.max_len,
                             mask_id=tokenizer.mask_id, special_ids=tokenizer.special_ids, queue_size=0,
                             momentum=0.9))  # fmt: skip  # the demo's settings: a queue stalls ITC from scratch
    optimizer = torch.optim.AdamW([p for _, p in _online_params(model)], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    history = {"itc": [], "mlm": [], "total": []}
    for _ in range(40):
        batch = data.train_batch(16)
        losses = model.loss(batch.images, batch.text_ids, batch.padding_mask, positive_ids=batch.caption_ids,
                            generator=generator)  # fmt: skip
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        model.update_momentum()
        for name, values in history.items():
            values.append(losses[name].item())
    for name, bound in (("total", 0.9), ("itc", 0.99), ("mlm", 0.85)):
        first, last = sum(history[name][:5]) / 5, sum(history[name][-5:]) / 5
        assert last < bound * first, f"{name} loss went from {first:.3f} to {last:.3f} over 40 steps"


def test_state_dict_round_trip():
    model = _model(seed=0)
    model.loss(*_batch(model))  # fill part of the queue
    images, ids, padding = _batch(model, seed=5)
    other = _model(seed=1)
    assert not torch.equal(other.itm_head.classifier.weight, model.itm_head.classifier.weight)
    other.load_state_dict(model.state_dict())  # strict
    got = other.loss(images, ids, padding, generator=torch.Generator().manual_seed(3))
    want = model.loss(images, ids, padding, generator=torch.Generator().manual_seed(3))
    for name in want:
        assert torch.equal(got[name], want[name]), name
    keys = set(model.state_dict())
    assert {"itc.logit_scale", "itc.queue.image_queue", "itc.queue.ptr", "visual_encoder_m.pos_embed",
            "fusion_encoder_m.layers.0.cross_kv.weight", "mlm_head_m.dense.weight"} <= keys  # fmt: skip
    assert not any("mask_token" in key for key in keys)  # no masked-image-modelling token
    assert other.mlm_head.decoder.weight is other.text_encoder.token_embed.weight  # still tied after loading


@pytest.mark.slow  # inductor's C++ builds: ~1-2 min on a loaded 2-core machine
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("queue_size", [0, 11])
def test_torch_compile_training_step_equals_eager(queue_size):
    """One graph (fullgraph): the random draws come from torch's global RNG, which inductor's fallback_random draws
    as eager does; ITM's pairs have data-dependent counts, which dynamo captures as such."""
    torch._dynamo.reset()
    eager_model = _model(dtype=torch.float32, queue_size=queue_size)
    compiled_model = copy.deepcopy(eager_model)  # each its own queue: both steps see the same one
    images, ids, padding = _batch(eager_model)

    def step(model):
        def run(images, ids, padding):
            return model.loss(images, ids, padding)["total"]

        return run

    dynamo = torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)
    with dynamo, torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(step(compiled_model), backend="inductor", fullgraph=True)
        torch.manual_seed(6)
        got = compiled(images, ids, padding)
        torch.manual_seed(6)
        want = step(eager_model)(images, ids, padding)
        assert_close(got, want, 1e-5, "loss")
        named = _online_params(eager_model)
        got_grads = torch.autograd.grad(got, [p for _, p in _online_params(compiled_model)])
        want_grads = torch.autograd.grad(want, [p for _, p in named])
    for (name, _), a, b in zip(named, got_grads, want_grads, strict=True):
        assert_close(a, b, 1e-4, f"grad of {name}")
    if queue_size:
        assert_close(compiled_model.itc.queue.image_queue, eager_model.itc.queue.image_queue, 1e-6, "queue")
    torch._dynamo.reset()


def test_albef_base_is_albef():
    c = albef_base()
    assert (c.image_size, c.patch_size, c.vision_dim, c.vision_depth, c.vision_heads) == (224, 16, 768, 12, 12)
    assert (c.text_dim, c.text_depth, c.fusion_depth, c.text_heads, c.vocab_size) == (768, 6, 6, 12, 30522)
    assert (c.embed_dim, c.queue_size, c.momentum, c.alpha, c.mlm_prob) == (256, 65536, 0.995, 0.4, 0.15)
    with torch.device("meta"):
        model = ALBEF(c)
    online = sum(p.numel() for _, p in _online_params(model))
    # ViT-B/16 (86M) + BERT-base (110M, its pooler and token types aside) + 6 cross-attentions (14M)
    assert 205e6 < online < 215e6
    momentum = {id(p): p.numel() for _, m in model.momentum_pairs() for p in m.parameters()}
    assert sum(momentum.values()) == online - sum(p.numel() for p in model.itm_head.parameters()) - 1  # not ITM, temp


def test_train_albef_reports_the_demo_metrics():
    from mome.demo_albef import ALBEFDemoOptions, train_albef

    metrics = train_albef(ALBEFDemoOptions(steps=2, batch_size=8, eval_size=8, image_size=24, queue_size=16,
                                           quiet=True))  # fmt: skip
    for direction in ("image_to_text", "text_to_image"):
        assert 0.0 <= metrics["retrieval"][direction]["R@1"] <= metrics["retrieval"][direction]["R@5"] <= 1.0
    for kind in ("hard_negatives", "random_negatives"):
        assert 0.0 <= metrics["itm"][kind]["balanced_accuracy"] <= 1.0
    assert len(metrics["history"]["itc"]) == len(metrics["history"]["itm"]) == len(metrics["history"]["mlm"]) == 2


# -- argument checks -------------------------------------------------------------------------------------------------
_BAD_CONFIGS = [
    (dict(vision_dim=65), "vision_dim"),
    (dict(fusion_depth=0), "fusion_depth"),
    (dict(queue_size=-1), "queue_size"),
    (dict(momentum=1.5), "momentum"),
    (dict(alpha=-0.1), "alpha"),
    (dict(mask_id=32, vocab_size=32), "mask_id"),
    (dict(special_ids=[0, 1]), "special_ids"),
    (dict(itm_weight=-1.0), "itm_weight"),
    (dict(image_size=50), "image_size"),
    (dict(mlm_distill=1), "mlm_distill"),
]


@pytest.mark.parametrize("overrides, name", _BAD_CONFIGS)
def test_bad_config_names_the_field(overrides, name):
    with pytest.raises(ValueError, match=name):
        albef_tiny(**overrides)


def test_bad_model_inputs_name_the_argument():
    model = _model()
    images, ids, padding = _batch(model)
    cases = [
        (lambda: ALBEF("tiny"), TypeError, "config must be an ALBEFConfig"),
        (lambda: model.loss(images, ids.double(), padding), TypeError, "text_ids must be an int64"),
        (lambda: model.loss(images, ids.masked_fill(padding, 99), padding), ValueError, "text_ids"),
        (lambda: model.loss(images, ids, padding.long()), TypeError, "text_padding_mask must be a bool"),
        (lambda: model.loss(images, ids, padding[:, :-1]), ValueError, "text_padding_mask must have"),
        (lambda: model.loss(images, ids, padding | True), ValueError, "must not mask the first token"),
        (lambda: model.loss(images[:, :2], ids, padding), ValueError, "images must have shape"),
        (lambda: model.loss(images[:3], ids, padding), ValueError, "same batch"),
        (lambda: model.loss(images, ids, padding, positive_ids=torch.arange(3)), ValueError, "positive_ids"),
        (lambda: model.loss(images, torch.cat([ids] * 3, 1), None), ValueError, "max_text_len"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert isinstance(model.config, ALBEFConfig)
