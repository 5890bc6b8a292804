"""The VLMo recipe (mome.models.vlmo): shapes, the objectives against their definitions, stagewise pre-training with
frozen parts bit-identical, training on the demo's data, state_dict, torch.compile and the argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mome.models.config import vlmo_tiny
from mome.models.masked_data import patch_colour_codes, random_patch_mask
from mome.models.vlmo import STAGES, VLMo, VLMoConfig, _mix_random, start_stage, vlmo_base_recipe, vlmo_tiny_recipe
from mome.nn import LANGUAGE, VISION, VISION_LANGUAGE, MultiwayLayerNorm, MultiwayLinear
from mome.shapes_data import ShapesCaptions
from tests.helpers import assert_close

VOCAB, PAD, BOS, EOS, MASK = 29, 0, 1, 2, 3


def _model(dtype=torch.float64, seed=0, **overrides) -> VLMo:
    torch.manual_seed(seed)
    encoder = vlmo_tiny(depth=2, vl_layers=1, image_size=16, patch_size=8, vocab_size=VOCAB, max_text_len=9)
    return VLMo(vlmo_tiny_recipe(encoder=encoder, **overrides)).to(dtype)


def _batch(model: VLMo, lengths=(7, 4, 6, 5), seed=1):
    """Random images and right-padded texts ``[bos] words [eos] pad...``, one of each length."""
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


# -- shapes and definitions ----------------------------------------------------------------------------------------
def test_forward_shapes():
    model = _model()
    images, ids, padding = _batch(model)
    image_embed, text_embed = model.embed(images, ids, padding)
    assert image_embed.shape == text_embed.shape == (4, model.config.embed_dim)
    assert_close(image_embed.norm(dim=-1), torch.ones(4, dtype=torch.float64), 1e-12)
    assert model.match_logits(images, ids, padding).shape == (4, 2)
    mask = random_patch_mask(4, 4, 0.4, generator=_gen())
    logits, codes = model.mim_logits(images, mask)
    assert logits.shape == (int(mask.sum()), 64) and codes.shape == (int(mask.sum()),)
    masked, labels = model.mask_text(ids, padding, _gen())
    for fused in (None, images):
        logits, targets = model.mlm_logits(masked, labels, padding, fused)
        assert logits.shape == (int((labels != -100).sum()), VOCAB) and targets.shape == logits.shape[:1]
    for stage in STAGES:
        losses = model.loss(stage, images, ids, padding, generator=_gen())
        assert losses.loss.dim() == 0 and torch.isfinite(losses.loss)


def test_patch_codes_equal_a_loop_over_patches():
    images = torch.randn(2, 3, 12, 18, dtype=torch.float64) * 1.5 + 0.5
    codes = patch_colour_codes(images, 6, levels=3, value_range=(-1.0, 2.0))
    assert codes.shape == (2, 6) and codes.dtype == torch.int64
    for b in range(2):
        for row in range(2):
            for col in range(3):
                mean = images[b, :, row * 6 : row * 6 + 6, col * 6 : col * 6 + 6].mean(dim=(1, 2))
                digits = [min(max(math.floor((m.item() + 1.0) / 3.0 * 3), 0), 2) for m in mean]
                assert codes[b, row * 3 + col] == digits[0] * 9 + digits[1] * 3 + digits[2]


def test_patch_mask_masks_the_ratio_of_each_image():
    mask = random_patch_mask(5, 16, 0.4, generator=_gen())
    assert mask.dtype == torch.bool and (mask.sum(1) == 6).all()
    assert not torch.equal(mask[0], mask[1])  # drawn per image


def test_losses_equal_their_definitions():
    model = _model(itm_random_share=0.0)
    images, ids, padding = _batch(model)
    # image stage: cross-entropy of the masked patches' logits against their quantised colours
    mask = model.mask_patches(4, _gen())
    hidden = model.encoder.encode_image(images, mask).hidden[:, 1:]
    codes = patch_colour_codes(images, 8, 4, model.config.colour_range)
    want = F.cross_entropy(model.mim(hidden)[mask], codes[mask])
    assert_close(model.loss("image", images, generator=_gen()).loss, want, 1e-10)
    # image-text stage: the ITC term is CLIP's symmetric cross-entropy on the pooled [CLS] embeddings
    losses = model.loss("image-text", images, ids, padding, generator=_gen())
    image_embed, text_embed = model.embed(images, ids, padding)
    logits = model.itc.scale * image_embed @ text_embed.T
    labels = torch.arange(4)
    assert_close(losses.itc, (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2, 1e-10)
    assert_close(losses.loss, losses.itc + losses.itm + losses.mlm, 1e-12)
    assert 0 < losses.itm.item() and 0 < losses.mlm.item()


@pytest.mark.parametrize("itm_pairs", [None, 2])
def test_itm_runs_on_positives_and_hard_negatives(itm_pairs):
    """ITM's rows: the pairs as matches, each image with the hard negative text ITC drew, each text with its hard
    negative image; ``itm_pairs`` keeps the first of each group."""
    model = _model(itm_pairs=itm_pairs)
    kept = 4 if itm_pairs is None else itm_pairs
    images, ids, padding = _batch(model)
    seen = []
    original = model.match_logits

    def spy(pair_images, pair_ids, pair_padding):
        seen.append((pair_images, pair_ids))
        return original(pair_images, pair_ids, pair_padding)

    model.match_logits = spy
    model.loss("image-text", images, ids, padding, generator=_gen())
    pair_images, pair_ids = seen[0]
    assert pair_images.shape[0] == 3 * kept  # matches, negative texts, negative images
    assert torch.equal(pair_images[:kept], images[:kept]) and torch.equal(pair_ids[:kept], ids[:kept])
    assert torch.equal(pair_images[kept : 2 * kept], images[:kept])  # images 0.. with their negative texts
    assert torch.equal(pair_ids[2 * kept :], ids[:kept])  # texts 0.. with their negative images
    for row in range(kept, 3 * kept):  # every negative pairs an image with another pair's text
        image_row = [i for i in range(4) if torch.equal(pair_images[row], images[i])]
        text_row = [i for i in range(4) if torch.equal(pair_ids[row], ids[i])]
        assert image_row != text_row


def test_random_negatives_are_of_another_id():
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    hard = torch.full((7,), -1)
    for seed in range(5):
        picked = _mix_random(hard, ids, 1.0, _gen(seed))
        assert (picked >= 0).all() and (ids[picked] != ids).all()
    assert torch.equal(_mix_random(torch.full((3,), -1), torch.zeros(3, dtype=torch.int64), 1.0, _gen()),
                       torch.full((3,), -1))  # fmt: skip


# -- stagewise pre-training ----------------------------------------------------------------------------------------
def _expert_rows(model: VLMo) -> dict[tuple[str, int], torch.Tensor]:
    rows = {}
    for prefix, module in model.encoder.named_modules():
        if isinstance(module, (MultiwayLinear, MultiwayLayerNorm)):
            for name, param in module.named_parameters(recurse=False):
                for expert in range(param.shape[0]):
                    rows[(f"{prefix}.{name}", expert)] = param[expert]
    return rows


def _snapshot(model: VLMo) -> tuple[dict, dict]:
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return params, {key: row.detach().clone() for key, row in _expert_rows(model).items()}


def _train(model, stage, steps=3, seed=0):
    optimizer = start_stage(model, stage, lr=1e-2, weight_decay=0.1)
    images, ids, padding = _batch(model, seed=seed)
    gen = _gen(seed)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model.loss(stage, images, ids, padding, generator=gen).loss.backward()
        optimizer.step()


def _moved(before: dict, after: dict) -> set:
    return {key for key in before if not torch.equal(before[key], after[key])}


def test_text_stage_freezes_attention_and_the_vision_expert_bit_for_bit():
    model = _model(dtype=torch.float32)
    _train(model, "image")  # the frozen parts have trained (and built optimizer state) before
    params, rows = _snapshot(model)
    _train(model, "text", steps=4)
    new_params, new_rows = _snapshot(model)
    moved_rows = _moved(rows, new_rows)
    assert moved_rows and all(expert == LANGUAGE for _, expert in moved_rows), sorted(moved_rows)
    assert {name for name, _ in moved_rows} == {name for name, _ in rows}  # every L expert weight learns
    moved = _moved(params, new_params)
    for name in moved:
        assert not any(part in name for part in (".attn.", ".norm1.", ".gamma_", "vision_embed", "encoder.norm."))
    assert {"encoder.text_embed.weight", "mlm.decoder.weight"} <= moved
    table = model.encoder.relative_position.relative_position_bias_table
    image_rows = model.encoder.relative_position.index(0, 5).unique()  # the rows image-only input reads
    assert torch.equal(table[image_rows], params["encoder.relative_position.relative_position_bias_table"][image_rows])
    assert not torch.equal(table, params["encoder.relative_position.relative_position_bias_table"])


def test_image_stage_trains_only_the_vision_path():
    model = _model(dtype=torch.float32)
    params, rows = _snapshot(model)
    _train(model, "image")
    new_params, new_rows = _snapshot(model)
    moved_rows = _moved(rows, new_rows)
    assert moved_rows and all(expert == VISION for _, expert in moved_rows)
    moved = _moved(params, new_params)
    assert any(".attn." in name for name in moved) and "mim.weight" in moved
    assert not any(name.startswith(("encoder.text_embed", "mlm.", "itc.", "itm.")) for name in moved)


def test_image_text_stage_trains_every_expert():
    model = _model(dtype=torch.float32)
    _train(model, "text")  # leaves frozen experts behind: the last stage must undo them
    params, rows = _snapshot(model)
    _train(model, "image-text")
    moved_rows = _moved(rows, _snapshot(model)[1])
    assert {expert for _, expert in moved_rows} == {VISION, LANGUAGE, VISION_LANGUAGE}
    assert all(p.requires_grad for name, p in model.named_parameters() if not name.startswith("mim."))


# -- training, state_dict, compile ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("stage", "steps", "drop"), [("image", 15, 0.6), ("text", 15, 0.95), ("image-text", 30, 0.92)])
def test_each_stage_loss_decreases_on_the_demo_data(stage, steps, drop):
    torch.manual_seed(0)
    data = ShapesCaptions(seed=0, image_size=24, jitter=0.03)
    encoder = vlmo_tiny(depth=2, vl_layers=1, image_size=24, patch_size=6, vocab_size=data.tokenizer.vocab_size,
                        max_text_len=data.max_len)  # fmt: skip
    model = VLMo(vlmo_tiny_recipe(encoder=encoder, itc_pool="mean", itm_random_share=0.5, itm_pairs=8, mlm_pairs=8))
    optimizer = start_stage(model, stage, lr=2e-3)
    gen, totals = _gen(), []
    for _ in range(steps):
        batch = data.train_batch(16)
        losses = model.loss(stage, batch.images, batch.text_ids, batch.padding_mask, positive_ids=batch.caption_ids,
                            generator=gen)  # fmt: skip
        optimizer.zero_grad()
        losses.loss.backward()
        optimizer.step()
        totals.append(losses.loss.item())
    first, last = sum(totals[:5]) / 5, sum(totals[-5:]) / 5
    assert last < drop * first, f"{stage} loss went from {first:.3f} to {last:.3f} over {steps} steps"


def test_state_dict_round_trip():
    model = _model(seed=0)
    images, ids, padding = _batch(model)
    copy = _model(seed=1)
    assert not torch.equal(copy.itm.classifier.weight, model.itm.classifier.weight)
    copy.load_state_dict(model.state_dict())  # strict
    for stage in STAGES:
        got = copy.loss(stage, images, ids, padding, generator=_gen())
        want = model.loss(stage, images, ids, padding, generator=_gen())
        assert torch.equal(got.loss, want.loss)
    keys = set(model.state_dict())
    assert {"itc.temperature", "mim.weight", "encoder.relative_position.relative_position_bias_table"} <= keys


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torch_compile_training_step_equals_eager():
    """The image-text stage's step (ITC; ITM and MLM read one fused pass over the masked texts with their images and
    shifted, as non-matches) in one inductor graph, with its gradients; one layer keeps the compile short."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    encoder = vlmo_tiny(depth=1, vl_layers=1, image_size=16, patch_size=8, vocab_size=VOCAB, max_text_len=9)
    model = VLMo(vlmo_tiny_recipe(encoder=encoder))
    images, ids, padding = _batch(model)
    masked, labels = model.mask_text(ids, padding, _gen())
    named = list(model.named_parameters())

    def step(images, ids, padding, masked, labels):
        itc = model.itc.loss(*model.embed(images, ids, padding)).loss
        pair_ids, pair_padding = torch.cat([masked, masked.roll(1, 0)]), torch.cat([padding, padding.roll(1, 0)])
        fused = model.encoder.encode_pair(images.repeat(2, 1, 1, 1), pair_ids, pair_padding)
        match = torch.cat([torch.ones(4), torch.zeros(4)]).long()
        itm = F.cross_entropy(model.itm(model.encoder.fused_cls(fused)), match)
        hidden = fused.hidden[:4, : ids.shape[1]]  # the matching pairs' text states
        mlm = F.cross_entropy(model.mlm(hidden).flatten(0, 1), labels.flatten(), ignore_index=-100)
        return itc + itm + mlm

    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    got, want = compiled(images, ids, padding, masked, labels), step(images, ids, padding, masked, labels)
    assert_close(got, want, 1e-5, "loss")
    params = [p for _, p in named]
    got_grads = torch.autograd.grad(got, params, allow_unused=True)
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    for (name, param), a, b in zip(named, got_grads, want_grads, strict=True):
        zeros = torch.zeros_like(param)
        assert_close(zeros if a is None else a, zeros if b is None else b, 5e-4, f"grad of {name}")
    torch._dynamo.reset()


def test_vlmo_base_recipe_sizes():
    c = vlmo_base_recipe()
    assert (c.encoder.dim, c.encoder.depth, c.encoder.vl_layers, c.encoder.relative_position) == (768, 12, 2, "vlmo")
    with torch.device("meta"):
        params = sum(p.numel() for p in VLMo(c).encoder.parameters())
    assert 172e6 < params < 178e6  # VLMo-Base: 175M


def test_train_vlmo_reports_the_demo_metrics():
    from mome.demo_vlmo import VLMoDemoOptions, train_vlmo

    options = VLMoDemoOptions(image_steps=1, text_steps=1, pair_steps=2, batch_size=8, eval_size=8, image_size=24,
                              quiet=True)  # fmt: skip
    metrics = train_vlmo(options)
    for direction in ("image_to_text", "text_to_image"):
        assert 0.0 <= metrics["retrieval"][direction]["R@1"] <= metrics["retrieval"][direction]["R@5"] <= 1.0
    assert 0.0 <= metrics["itm"]["random_negatives"]["balanced_accuracy"] <= 1.0
    assert 0.0 <= metrics["masked_patches"]["accuracy"] <= 1.0 and metrics["masked_patches"]["count"] > 0
    history = metrics["history"]
    assert len(history["mim"]) == len(history["text_mlm"]) == 1 and len(history["itc"]) == 2


# -- argument checks -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        (dict(mask_id=29), "mask_id"),
        (dict(mlm_prob=0.0), "mlm_prob"),
        (dict(mim_ratio=1.0), "mim_ratio"),
        (dict(itc_pool="max"), "itc_pool"),
        (dict(itm_pairs=0), "itm_pairs"),
        (dict(itm_random_share=1.5), "itm_random_share"),
        (dict(colour_levels=1), "colour_levels"),
    ],
)
def test_bad_config_names_the_field(overrides, name):
    with pytest.raises(ValueError, match=name):
        vlmo_tiny_recipe(encoder=vlmo_tiny(vocab_size=VOCAB), **overrides)


def test_bad_inputs_name_the_argument():
    model = _model()
    images, ids, padding = _batch(model)
    with pytest.raises(ValueError, match="stage"):
        model.loss("video", images, ids, padding)
    with pytest.raises(ValueError, match="needs images"):
        model.loss("image-text", None, ids, padding)
    with pytest.raises(ValueError, match="needs text_ids"):
        model.loss("text", images)
    with pytest.raises(ValueError, match="stage"):
        start_stage(model, "pairs", lr=1e-3)
    with pytest.raises(TypeError, match="VLMoConfig"):
        VLMo(vlmo_tiny())
    with pytest.raises(ValueError, match="layout='vlmo'"):
        VLMoConfig(encoder=vlmo_tiny().replace(layout="beit3", relative_position=None))
    with pytest.raises(ValueError, match="patch_size"):
        patch_colour_codes(images, 5)
    with pytest.raises(ValueError, match="ratio"):
        random_patch_mask(2, 4, 0.0)
    assert isinstance(model.mim, nn.Linear)
