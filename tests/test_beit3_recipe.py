"""The BEiT-3 recipe (mome.models.beit3): masked data modelling over image-only, text-only and image-text input
(shapes, definitions, which expert each input trains, masks that hide what they mask), retrieval fine-tuning,
training on the demo's data, state_dict, torch.compile and the argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mome.models.beit3 import BEiT3, BEiT3Config, beit3_base_recipe, beit3_tiny_recipe
from mome.models.config import beit3_tiny, vlmo_tiny
from mome.models.masked_data import patch_colour_codes
from mome.nn import LANGUAGE, VISION, MultiwayLayerNorm, MultiwayLinear
from mome.shapes_data import ShapesCaptions
from tests.helpers import assert_close

VOCAB, PAD, BOS, EOS, MASK = 31, 0, 1, 2, 3


def _model(dtype=torch.float64, seed=0, depth=2, **overrides) -> BEiT3:
    torch.manual_seed(seed)
    encoder = beit3_tiny(depth=depth, image_size=16, patch_size=8, vocab_size=VOCAB, max_text_len=9)
    return BEiT3(beit3_tiny_recipe(encoder=encoder, **overrides)).to(dtype)


def _batch(model: BEiT3, lengths=(7, 4, 6), seed=1):
    gen = torch.Generator().manual_seed(seed)
    c, dtype = model.config.encoder, model.mim.weight.dtype
    images = torch.randn(len(lengths), c.in_chans, c.image_size, c.image_size, generator=gen, dtype=dtype)
    width = max(lengths)
    ids = torch.randint(4, VOCAB, (len(lengths), width), generator=gen)
    padding = torch.arange(width)[None, :] >= torch.tensor(lengths)[:, None]
    ids[:, 0] = BOS
    ids[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = EOS
    return images, ids.masked_fill(padding, PAD), padding


def _gen(seed=5):
    return torch.Generator().manual_seed(seed)


def test_forward_shapes():
    model = _model()
    images, ids, padding = _batch(model)
    mask = model.mask_patches(3, _gen())
    assert mask.shape == (3, 4) and (mask.sum(1) == 2).all()  # 40% of 4 patches
    logits, codes = model.image_logits(images, mask)
    assert logits.shape == (6, 64) and codes.shape == (6,)
    masked, labels = model.mask_text(ids, padding, 0.5, _gen())
    logits, targets = model.text_logits(masked, labels, padding)
    assert logits.shape == (int((labels != -100).sum()), VOCAB) and targets.shape == logits.shape[:1]
    patch_logits, patch_codes, token_logits, token_labels = model.pair_logits(images, mask, masked, labels, padding)
    assert patch_logits.shape == (6, 64) and token_logits.shape == logits.shape
    image_embed, text_embed = model.embed(images, ids, padding)
    assert image_embed.shape == text_embed.shape == (3, model.config.embed_dim)
    assert_close(text_embed.norm(dim=-1), torch.ones(3, dtype=torch.float64), 1e-12)


def test_loss_is_the_sum_of_its_definitions():
    model = _model()
    images, ids, padding = _batch(model)
    c = model.config
    losses = model.loss(images, ids, padding, generator=_gen())
    gen = _gen()  # the masks in the order the loss draws them: image, text, then the pair's patches and text
    image_mask = model.mask_patches(3, gen)
    text_masked, text_labels = model.mask_text(ids, padding, c.text_mask_prob, gen)
    pair_mask = model.mask_patches(3, gen)
    pair_masked, pair_labels = model.mask_text(ids, padding, c.pair_text_mask_prob, gen)
    codes = patch_colour_codes(images, 8, c.colour_levels, c.colour_range)  # [B, P]
    patches = model.encoder.encode_image(images, image_mask).hidden[:, 1:]
    image = F.cross_entropy(model.mim(patches[image_mask]), codes[image_mask])
    tokens = model.encoder.encode_text(text_masked, padding).hidden
    text = F.cross_entropy(model.mlm(tokens).flatten(0, 1), text_labels.flatten(), ignore_index=-100)
    fused = model.encoder.encode_pair(images, pair_masked, padding, pair_mask).hidden  # [image, text]
    pair_image = F.cross_entropy(model.mim(fused[:, 1:5][pair_mask]), codes[pair_mask])
    pair_text = F.cross_entropy(model.mlm(fused[:, 5:]).flatten(0, 1), pair_labels.flatten(), ignore_index=-100)
    for got, want in zip(losses[1:], (image, text, pair_image, pair_text), strict=True):
        assert_close(got, want, 1e-10)
    assert_close(losses.loss, image + text + pair_image + pair_text, 1e-12)
    only = model.loss(images, ids, padding, inputs=("text",), generator=_gen())
    assert only.image is None and only.pair_text is None and torch.isfinite(only.loss)


@pytest.mark.parametrize("fused", [False, True])
def test_a_masked_patch_is_hidden_and_its_target_is_its_own(fused):
    """Changing the pixels of a masked patch changes no prediction, only that patch's target; changing a seen patch
    changes the predictions (so the mask and the targets index the same patches, in the same order)."""
    model = _model()
    images, ids, padding = _batch(model)
    mask = torch.tensor([[True, False, False, True], [False, True, False, False], [False, False, True, True]])
    masked, labels = model.mask_text(ids, padding, 0.5, _gen())

    def predict(pictures):
        if fused:
            return model.pair_logits(pictures, mask, masked, labels, padding)[:2]
        return model.image_logits(pictures, mask)

    logits, codes = predict(images)
    hidden_patch = images.clone()
    hidden_patch[1, :, :8, 8:] = 3.0  # patch 1 (row 0, column 1) of image 1: masked
    new_logits, new_codes = predict(hidden_patch)
    assert torch.equal(new_logits, logits)
    # rows of codes: image 0's patches 0 and 3, image 1's patch 1, image 2's patches 2 and 3
    assert new_codes[2] != codes[2] and torch.equal(new_codes[[0, 1, 3, 4]], codes[[0, 1, 3, 4]])
    seen_patch = images.clone()
    seen_patch[1, :, 8:, :8] = 3.0  # patch 2 of image 1: seen
    assert not torch.allclose(predict(seen_patch)[0][2], logits[2])


def _expert_grads(model: BEiT3, loss) -> dict[int, float]:
    """Gradient norm reaching each expert's rows of the encoder's multiway weights."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    norms = {VISION: 0.0, LANGUAGE: 0.0}
    for module in model.encoder.modules():
        if isinstance(module, (MultiwayLinear, MultiwayLayerNorm)):
            for param in module.parameters(recurse=False):
                for expert in norms:
                    norms[expert] += float(param.grad[expert].norm()) if param.grad is not None else 0.0
    return norms


def test_each_input_trains_its_own_experts():
    model = _model()
    images, ids, padding = _batch(model)
    image_only = _expert_grads(model, model.loss(images, inputs=("image",), generator=_gen()).loss)
    text_only = _expert_grads(model, model.loss(None, ids, padding, inputs=("text",), generator=_gen()).loss)
    pair = _expert_grads(model, model.loss(images, ids, padding, inputs=("pair",), generator=_gen()).loss)
    assert image_only[VISION] > 0 and image_only[LANGUAGE] == 0
    assert text_only[LANGUAGE] > 0 and text_only[VISION] == 0
    assert pair[VISION] > 0 and pair[LANGUAGE] > 0


def test_retrieval_loss_is_clips():
    model = _model()
    images, ids, padding = _batch(model)
    image_embed, text_embed = model.embed(images, ids, padding)
    logits = model.itc.scale * image_embed @ text_embed.T
    labels = torch.arange(3)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert_close(model.retrieval_loss(images, ids, padding).loss, want, 1e-10)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_text_embedding_does_not_depend_on_padding(pool):
    model = _model(retrieval_pool=pool)
    images, ids, padding = _batch(model)
    longer_ids = torch.cat([ids, torch.randint(4, VOCAB, (3, 2))], dim=1)  # two more padded positions, any ids
    longer_padding = torch.cat([padding, torch.ones(3, 2, dtype=torch.bool)], dim=1)
    assert_close(model.embed(images, longer_ids, longer_padding)[1], model.embed(images, ids, padding)[1], 1e-10)


def test_loss_decreases_on_the_demo_data():
    torch.manual_seed(0)
    data = ShapesCaptions(seed=0, image_size=24, jitter=0.03)
    encoder = beit3_tiny(image_size=24, patch_size=6, vocab_size=data.tokenizer.vocab_size, max_text_len=data.max_len)
    model = BEiT3(beit3_tiny_recipe(encoder=encoder))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen, totals = _gen(), []
    for _ in range(15):
        batch = data.train_batch(16)
        loss = model.loss(batch.images, batch.text_ids, batch.padding_mask, generator=gen).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
    first, last = sum(totals[:5]) / 5, sum(totals[-5:]) / 5
    assert last < 0.8 * first, f"loss went from {first:.3f} to {last:.3f} over 15 steps"


def test_state_dict_round_trip():
    model = _model(seed=0)
    images, ids, padding = _batch(model)
    copy = _model(seed=1)
    assert not torch.equal(copy.mim.weight, model.mim.weight)
    copy.load_state_dict(model.state_dict())  # strict
    got, want = copy.loss(images, ids, padding, generator=_gen()), model.loss(images, ids, padding, generator=_gen())
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    keys = set(model.state_dict())
    assert {"mim.weight", "mlm.decoder.weight", "itc.temperature", "encoder.vision_embed.mask_token"} <= keys


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torch_compile_training_step_equals_eager():
    """A masked data modelling step on image-text input (both experts, the mask token, both heads) in one inductor
    graph, with its gradients (masks drawn outside; the unmasked positions' targets ignored instead of the masked
    ones gathered). Image-only and text-only input run the same modules on fewer tokens."""
    torch._dynamo.reset()
    model = _model(dtype=torch.float32, depth=1)
    images, ids, padding = _batch(model)
    mask = model.mask_patches(3, _gen())
    masked, labels = model.mask_text(ids, padding, 0.5, _gen())
    codes = patch_colour_codes(images, 8).masked_fill(~mask, -100)
    named = list(model.named_parameters())

    def step(images, masked, padding, mask, labels, codes):
        fused = model.encoder.encode_pair(images, masked, padding, mask).hidden  # [image, text]
        patches = F.cross_entropy(model.mim(fused[:, 1:5]).flatten(0, 1), codes.flatten(), ignore_index=-100)
        tokens = F.cross_entropy(model.mlm(fused[:, 5:]).flatten(0, 1), labels.flatten(), ignore_index=-100)
        return patches + tokens

    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    args = (images, masked, padding, mask, labels, codes)
    got, want = compiled(*args), step(*args)
    assert_close(got, want, 1e-5, "loss")
    params = [p for _, p in named]
    got_grads = torch.autograd.grad(got, params, allow_unused=True)
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    for (name, param), a, b in zip(named, got_grads, want_grads, strict=True):
        zeros = torch.zeros_like(param)
        assert_close(zeros if a is None else a, zeros if b is None else b, 5e-4, f"grad of {name}")
    torch._dynamo.reset()


def test_beit3_base_recipe_sizes():
    c = beit3_base_recipe()
    assert (c.encoder.layout, c.encoder.dim, c.encoder.depth, c.encoder.num_experts) == ("beit3", 768, 12, 2)
    assert (c.text_mask_prob, c.pair_text_mask_prob, c.mim_ratio) == (0.15, 0.5, 0.4)


def test_train_beit3_reports_the_demo_metrics():
    from mome.demo_beit3 import BEiT3DemoOptions, train_beit3

    options = BEiT3DemoOptions(mdm_steps=2, retrieval_steps=2, batch_size=8, eval_size=8, image_size=24, quiet=True)
    metrics = train_beit3(options)
    for direction in ("image_to_text", "text_to_image"):
        assert 0.0 <= metrics["retrieval"][direction]["R@1"] <= metrics["retrieval"][direction]["R@5"] <= 1.0
    for kind in ("image", "text", "pair_image", "pair_text"):
        score = metrics["masked_prediction"][kind]
        assert 0.0 <= score["accuracy"] <= 1.0 and 0.0 < score["majority"] <= 1.0 and score["count"] > 0
    assert len(metrics["history"]["mdm"]) == len(metrics["history"]["retrieval"]) == 2


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        (dict(mask_id=VOCAB), "mask_id"),
        (dict(text_mask_prob=0.0), "text_mask_prob"),
        (dict(pair_text_mask_prob=1.5), "pair_text_mask_prob"),
        (dict(mim_ratio=0.0), "mim_ratio"),
        (dict(colour_levels=1), "colour_levels"),
        (dict(embed_dim=0), "embed_dim"),
        (dict(encoder=vlmo_tiny()), "layout='beit3'"),
    ],
)
def test_bad_config_names_the_field(overrides, name):
    with pytest.raises(ValueError, match=name):
        beit3_tiny_recipe(**{"encoder": beit3_tiny(vocab_size=VOCAB), **overrides})


def test_bad_inputs_name_the_argument():
    model = _model()
    images, ids, padding = _batch(model)
    with pytest.raises(ValueError, match="inputs"):
        model.loss(images, ids, padding, inputs=("video",))
    with pytest.raises(ValueError, match="inputs"):
        model.loss(images, ids, padding, inputs=())
    with pytest.raises(ValueError, match="need images"):
        model.loss(None, ids, padding)
    with pytest.raises(ValueError, match="need text_ids"):
        model.loss(images, inputs=("pair",))
    with pytest.raises(TypeError, match="BEiT3Config"):
        BEiT3(beit3_tiny())
    with pytest.raises(ValueError, match="masked_position"):
        model.image_logits(images, torch.zeros(3, 5, dtype=torch.bool))
    assert isinstance(BEiT3Config(encoder=beit3_tiny()), BEiT3Config)
