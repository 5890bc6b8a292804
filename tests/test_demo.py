"""The demo's data set and tokenizer, and a short training run that must retrieve far above chance."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch

from mome.demo import DemoOptions, History, Pretrainer, main, run_demo, write_plot
from mome.demo_metrics import caption_scores, itm_eval_pairs, other_scene, recall_at
from mome.demo_training import Progress
from mome.shapes_data import COLORS, CaptionTokenizer, Scene, ShapesCaptions, render, sample_scene


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core machine: one thread avoids OpenMP contention and keeps runs deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_batches_are_deterministic_from_the_seed():
    first, again, other = ShapesCaptions(3), ShapesCaptions(3), ShapesCaptions(4)
    a, b, c = first.train_batch(8), again.train_batch(8), other.train_batch(8)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert a.captions != c.captions
    assert first.train_batch(8).captions != a.captions, "successive batches should differ"
    assert a.images.shape == (8, 3, 32, 32) and a.images.dtype == torch.float32
    assert torch.equal(first.held_out(16).images, again.held_out(16).images)


def test_held_out_captions_are_distinct_and_ids_follow_scenes():
    data = ShapesCaptions(0)
    held_out = data.held_out(200)
    assert len(set(held_out.captions)) == 200
    assert len(set(held_out.caption_ids.tolist())) == 200
    described = [set(e) for e in held_out.equivalent_captions]
    assert all(a.isdisjoint(b) for i, a in enumerate(described) for b in described[:i]), "a mirror slipped in"
    batch = data.train_batch(400)
    by_scene = {}
    for truths, caption_id in zip(batch.equivalent_captions, batch.caption_ids.tolist(), strict=True):
        assert by_scene.setdefault(frozenset(truths), caption_id) == caption_id
    assert len(set(by_scene.values())) == len(by_scene), "different scenes must get different ids"


def test_a_caption_and_its_mirror_share_one_id():
    rng = np.random.default_rng(5)
    scenes = [sample_scene(rng) for _ in range(100)]
    pairs = [scene for scene in scenes if len(scene.shapes) == 2]
    assert pairs, "the sampler should draw two-shape scenes"
    for scene in pairs:
        mirror = scene.mirrored()
        assert mirror.caption != scene.caption and mirror.mirrored() == scene
        assert mirror.caption_id == scene.caption_id
        assert scene.equivalent_captions == (scene.caption, mirror.caption)
        other = Scene(scene.shapes, "above" if scene.relation in ("left of", "right of") else "left of")
        assert other.caption_id != scene.caption_id
    single = next(scene for scene in scenes if len(scene.shapes) == 1)
    assert single.mirrored() == single and single.equivalent_captions == (single.caption,)
    assert Scene(tuple(pairs[0].shapes[::-1]), pairs[0].relation).caption_id != pairs[0].caption_id


def test_decoder_targets_are_the_canonical_caption():
    data = ShapesCaptions(2)
    batch = data.train_batch(64)
    canonical = data.tokenizer.decode(batch.canonical_text_ids)
    for caption, truths in zip(canonical, batch.equivalent_captions, strict=True):
        assert caption in truths and "right of" not in caption and "below" not in caption
    assert any(c != t for c, t in zip(canonical, batch.captions, strict=True)), "some captions are told mirrored"


def test_caption_scores_accept_the_mirror_and_count_words_in_place():
    truths = [("a small red circle left of a large blue square", "a large blue square right of a small red circle")]
    assert caption_scores(["a large blue square right of a small red circle"], truths) == (1.0, 1.0)
    exact, words = caption_scores(["a small red cross left of a large blue square"], truths)
    assert exact == 0.0 and words == pytest.approx(9 / 10)
    exact, words = caption_scores(["a large blue square", "a small red circle"], [("a large blue cross",)] * 2)
    assert exact == 0.0 and words == pytest.approx((3 + 1) / 8)
    assert caption_scores([], []) == (0.0, 0.0)


@pytest.mark.parametrize("jitter", [None, 0.03])
def test_scenes_match_their_captions(jitter):
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng, jitter=jitter)
        image = render([scene], 32, np.random.default_rng(1))[0] * 0.3 + 0.4  # undo the normalisation
        for shape in scene.shapes:
            row, col = int(shape.y * 32), int(shape.x * 32)
            if shape.kind != "triangle":  # a triangle's centre row may fall on its thin apex
                assert torch.allclose(image[:, row, col], torch.tensor(COLORS[shape.color]), atol=1e-5), scene
        if jitter is not None:  # on the 3 x 3 grid of patch corners, moved by at most the jitter
            for shape in scene.shapes:
                for coordinate in (shape.x, shape.y):
                    assert min(abs(coordinate - point) for point in (0.25, 0.5, 0.75)) <= jitter + 1e-9, scene
        if len(scene.shapes) == 2:
            first, second = scene.shapes
            delta = {"left of": second.x - first.x, "right of": first.x - second.x}
            delta.update({"above": second.y - first.y, "below": first.y - second.y})
            assert delta[scene.relation] > 0.3, scene
            assert first.code != second.code


def test_tokenizer_round_trip_and_errors():
    tokenizer = CaptionTokenizer()
    captions = ["a large red circle", "a small blue cross right of a large purple triangle"]
    ids, padding = tokenizer.encode(captions, 12)
    assert ids.dtype == torch.int64 and ids.shape == (2, 12)
    assert (ids[:, 0] == tokenizer.bos_id).all()
    assert ids[0, 5] == tokenizer.eos_id and padding[0, 6:].all() and not padding[0, :6].any()
    assert tokenizer.decode(ids) == captions
    assert len(set(tokenizer.vocab)) == tokenizer.vocab_size
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.encode(["a huge red circle"], 12)
    with pytest.raises(ValueError, match="max_len"):
        tokenizer.encode(captions, 6)


def test_recall_at_counts_the_diagonal():
    similarity = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.6, 0.5, 0.4]])  # diagonal ranks 1, 2, 3
    assert recall_at(similarity, 1) == pytest.approx(1 / 3)
    assert recall_at(similarity, 2) == pytest.approx(2 / 3)
    assert recall_at(similarity, 5) == 1.0


def test_short_run_retrieves_far_above_chance(tmp_path):
    options = DemoOptions(steps=100, encoder_fraction=0.8, batch_size=32, itm_pairs=8, eval_size=64, out=str(tmp_path))
    options.quiet = True
    metrics = run_demo(options)
    retrieval = metrics["retrieval"]
    chance = retrieval["chance"]["R@1"]
    assert chance == pytest.approx(1 / 64)
    for direction in ("image_to_text", "text_to_image"):
        assert retrieval[direction]["R@1"] >= 6 * chance, f"{direction}: {retrieval[direction]} vs chance {chance}"
        assert retrieval[direction]["R@5"] >= retrieval[direction]["R@1"]
    history = metrics["history"]
    assert len(history["itc"]) == 80 and len(history["caption"]) == 20
    assert np.mean(history["itc"][-10:]) < np.mean(history["itc"][:10]) - 0.5, "the ITC loss should fall"
    assert np.mean(history["caption"][-5:]) < np.mean(history["caption"][:5]), "the caption loss should fall"
    itm = metrics["itm"]
    assert itm["majority_rate"] == 0.5 and itm["chance_loss"] == pytest.approx(np.log(2))
    for kind in ("random_negatives", "hard_negatives"):
        scores = itm[kind]
        assert scores["pairs"] == 2 * 64, f"{kind}: each held-out pair and one non-match"
        balanced = (scores["match_accuracy"] + scores["no_match_accuracy"]) / 2
        assert scores["balanced_accuracy"] == pytest.approx(balanced)
        assert scores["accuracy"] == pytest.approx(balanced), "as many matches as non-matches"
        assert 0.0 <= balanced <= 1.0 and np.isfinite(scores["loss"])
    assert 0.0 <= metrics["caption_word_accuracy"] <= 1.0 and metrics["caption_exact_match"] <= 1.0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["retrieval"] == retrieval and saved["itm"] == itm
    assert saved["caption_exact_match"] == metrics["caption_exact_match"]
    assert all(set(example) == {"truth", "generated", "right"} for example in metrics["examples"])


def _batch_with_mirrors(size: int, mirrors: int):
    """Held-out-like pairs plus, for some two-shape scenes, a second pair captioned by the mirror: same image, other
    caption text, same id."""
    rng = np.random.default_rng(7)
    scenes = [sample_scene(rng, jitter=0.03) for _ in range(size)]
    twins = [scene.mirrored() for scene in scenes if len(scene.shapes) == 2][:mirrors]
    return ShapesCaptions(0)._batch(scenes + twins, rng)


def test_itm_eval_is_balanced_and_its_non_matches_are_true_ones():
    batch = _batch_with_mirrors(40, 8)
    ids, size = batch.caption_ids, batch.caption_ids.shape[0]
    assert len(set(ids.tolist())) < size, "the batch should hold a caption and its mirror"
    # similarity highest for pairs of the same scene (and, by the noise, arbitrary otherwise): a negative picked
    # by similarity alone would be a caption that describes the image
    same = ids[:, None] == ids[None, :]
    similarity = same.float() * 10 + torch.rand(size, size, generator=torch.Generator().manual_seed(0))
    pairs = itm_eval_pairs(ids, similarity, torch.Generator().manual_seed(0))
    assert set(pairs) == {"hard", "random"}
    rows = torch.arange(size)
    for kind, (images, texts) in pairs.items():
        assert images.shape == texts.shape == (size,), f"{kind}: one non-match per match"
        assert ((images == rows) != (texts == rows)).all(), f"{kind}: each non-match keeps one side of its pair"
        assert int((images == rows).sum()) == (size + 1) // 2, f"{kind}: half negative texts, half negative images"
        assert (ids[images] != ids[texts]).all(), f"{kind}: a non-match shows the same scene"
        for image, text in zip(images.tolist(), texts.tolist(), strict=True):
            assert batch.captions[text] not in batch.equivalent_captions[image], (kind, image, text)
    others = similarity.masked_fill(same, float("-inf"))
    hard_images, hard_texts = pairs["hard"]
    assert torch.equal(hard_texts[::2], others.argmax(1)[::2]), "even rows: each image with its hardest text"
    assert torch.equal(hard_images[1::2], others.argmax(0)[1::2]), "odd rows: each text with its hardest image"
    assert torch.equal(other_scene(torch.zeros(3, dtype=torch.int64)), torch.full((3,), -1))


def test_itm_training_negatives_are_true_non_matches_of_both_kinds():
    from mome import ops

    batch = _batch_with_mirrors(40, 8)
    ids, size = batch.caption_ids, batch.caption_ids.shape[0]
    # features equal for a caption and its mirror, so that by similarity alone the mirror is the hardest negative
    features = torch.nn.functional.normalize(torch.randn(int(ids.max()) + 1, 16), dim=1)[ids]
    generator = torch.Generator().manual_seed(0)
    itc = ops.itc_loss(features, features, 5.0, positive_ids=ids, hard_negatives="sample", generator=generator)
    for share in (0.0, 0.5, 1.0):
        neg_text, neg_image = Pretrainer.itm_negatives(batch, itc, share, generator)
        rows = range(size)
        for image, text in [*zip(rows, neg_text.tolist(), strict=True), *zip(neg_image.tolist(), rows, strict=True)]:
            assert ids[image] != ids[text] and batch.captions[text] not in batch.equivalent_captions[image], share
        hard = (neg_text == itc.neg_text_idx).float().mean(), (neg_image == itc.neg_image_idx).float().mean()
        if share == 0.0:
            assert hard == (1.0, 1.0)
        elif share == 0.5:  # random ones in both directions (a random pick may equal the hard one by chance)
            assert all(0.2 < fraction < 0.95 for fraction in hard), hard


def test_the_fused_cls_that_itm_reads_sees_both_modalities():
    options = DemoOptions()
    data = ShapesCaptions(0, options.image_size, jitter=options.jitter)
    model = Pretrainer(options, data.tokenizer.vocab_size, data.max_len)
    batch = data.held_out(4)
    images = batch.images.clone().requires_grad_(True)
    embedded = model.encoder.embed_text(batch.text_ids, batch.padding_mask).detach().requires_grad_(True)
    model.encoder.embed_text = lambda *args: embedded  # the text's embeddings as a leaf
    fused = model.encoder.fused_cls(model.encoder.encode_pair(images, batch.text_ids, batch.padding_mask))
    image_grad, text_grad = torch.autograd.grad(fused[0] @ torch.randn(fused.shape[1]), (images, embedded))
    assert image_grad[0].abs().sum() > 0 and text_grad[0, 1:].abs().sum() > 0, "ITM's [CLS] must attend to both"
    assert not image_grad[1:].any() and not text_grad[1:].any(), "pairs must not see each other"
    padded = batch.padding_mask[0]
    assert not text_grad[0, padded].any(), "padded text is masked out"


def test_cli_prints_the_report(tmp_path, capsys):
    assert main(["--steps", "4", "--eval-size", "16", "--batch-size", "8", "--out", str(tmp_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    expected_lines = ("image → text", "text → image", "chance", "image-text matching", "balanced accuracy", "truth:")
    for expected in (*expected_lines, str(tmp_path / "metrics.json")):
        assert expected in printed
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plot skipped" in printed
    else:
        assert (tmp_path / "demo.png").stat().st_size > 1000
        assert str(tmp_path / "demo.png") in printed
    with pytest.raises(ValueError, match="steps"):
        run_demo(DemoOptions(steps=1, out=str(tmp_path)))


def test_plot_is_skipped_with_a_reason_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    reason = write_plot(History(itc=[1.0, 0.5]), {}, tmp_path / "demo.png")
    assert reason is not None and "matplotlib" in reason
    assert not (tmp_path / "demo.png").exists()


def test_progress_prints_every_tenth_when_not_a_terminal():
    stream = io.StringIO()
    progress = Progress(20, "stage", stream=stream)
    for done in range(1, 21):
        progress.update(done, "loss 1.0")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("stage [########################] 20/20 loss 1.0")
    quiet = io.StringIO()
    Progress(5, "stage", quiet=True, stream=quiet).update(5)
    assert quiet.getvalue() == ""
