"""mome.integrations.open_clip.generate: KV-cached CoCa captioning against open_clip's own CoCa.generate, on small
random-weight CoCa models from configs.

open_clip 3.3's coca_model imports transformers' BeamSearchScorer, which transformers 5 no longer has, and then
switches generate off altogether (``_has_transformers = False``). Its top-k / top-p path needs nothing of it: the
``open_clip_generate`` fixture switches that path back on, so the comparison is with open_clip's own loop. Its beam
search needs the scorer: the ``beam_scorer`` fixture gives open_clip (and so mome, which takes it from there)
transformers' own where it imports, else tests/beam_scorer_standin.py. Where torchvision does not import,
tests/torchvision_standin.py stands in for it (see test_integrations_open_clip.py).
"""

import copy

import pytest
import torch

from tests import beam_scorer_standin, torchvision_standin

torchvision_standin.install_if_missing()
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

import mome.integrations.open_clip as moc  # noqa: E402
import mome.ops  # noqa: E402
from mome import settings  # noqa: E402
from mome.integrations.open_clip._decoding import CocaSteps  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.integration_helpers import spread_weights  # noqa: E402

VISION = dict(image_size=16, patch_size=4, width=32, layers=2, head_width=8)
TEXT = dict(context_length=12, vocab_size=99, width=32, heads=4, layers=2)
SOT, EOS = 97, 98
GREEDY = dict(generation_type="top_k", top_k=1, sot_token_id=SOT, eos_token_id=EOS, min_seq_len=2)


@pytest.fixture
def open_clip_generate(monkeypatch):
    from open_clip import coca_model

    monkeypatch.setattr(coca_model, "_has_transformers", True)
    monkeypatch.setitem(coca_model.GENERATION_TYPES, "top_k", transformers.TopKLogitsWarper)
    monkeypatch.setitem(coca_model.GENERATION_TYPES, "top_p", transformers.TopPLogitsWarper)


@pytest.fixture
def beam_scorer(monkeypatch, open_clip_generate):
    """open_clip's beam search switched on, with transformers' BeamSearchScorer where it has one."""
    from open_clip import coca_model

    scorer = getattr(transformers, "BeamSearchScorer", None) or getattr(
        transformers.generation, "BeamSearchScorer", None
    )
    monkeypatch.setattr(coca_model, "BeamSearchScorer", scorer or beam_scorer_standin.BeamSearchScorer, raising=False)


@pytest.fixture
def calls(monkeypatch):
    """How often mome.ops.decode_attention and mome.ops.attention ran while the test runs."""
    counts = {"decode_attention": 0, "attention": 0}
    for name in counts:
        op = getattr(mome.ops, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            counts[_name] += 1
            return _op(*args, **kwargs)

        monkeypatch.setattr(mome.ops, name, counted)
    moc.TALLY.reset()
    return counts


def _coca(seed=0, correct_cls_mask=False, **text_options):
    vision = dict(VISION, attentional_pool=True, attn_pooler_queries=5, attn_pooler_heads=4, output_tokens=True)
    text = dict(TEXT, embed_cls=True, output_tokens=True, **text_options)
    torch.manual_seed(seed)
    model = open_clip.CoCa(
        embed_dim=32, multimodal_cfg=dict(TEXT, attn_pooler_heads=4), text_cfg=text, vision_cfg=vision
    )
    spread_weights(model.eval(), seed)
    model.text.correct_cls_mask = correct_cls_mask  # an attribute, not a config field
    # open_clip never initialises it (MultimodalTransformer.init_parameters is not called): torch.empty
    torch.nn.init.normal_(model.text_decoder.text_projection, std=TEXT["width"] ** -0.5)
    return model


def _images(batch, seed=1):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _assert_same_ids(actual, expected):
    assert actual.shape == expected.shape and torch.equal(actual, expected), (
        f"ids\n{actual}\n!= open_clip's\n{expected}"
    )


@pytest.mark.usefixtures("open_clip_generate")
@pytest.mark.parametrize("seq_len", [4, 11])
def test_greedy_ids_equal_open_clip(calls, seq_len):
    model, images = _coca(), _images(4)
    expected = model.generate(images, seq_len=seq_len, **GREEDY)
    actual = moc.generate(model, images, seq_len=seq_len, **GREEDY)
    _assert_same_ids(actual, expected)
    steps = seq_len - 1  # from the start token alone; the last token is the forced end-of-text
    assert calls == {"decode_attention": 6 * steps, "attention": 0}, "2 text + 2 decoder self + 2 cross per step"
    assert moc.TALLY.fused == 6 * steps and not moc.TALLY.fallbacks


@pytest.mark.usefixtures("open_clip_generate")
@pytest.mark.parametrize("fixed_output_length", [False, True])
def test_rows_that_end_early_are_padded_as_open_clip_pads_them(fixed_output_length):
    model, images = _coca(), _images(5, seed=2)
    # an end-of-text id greedy decoding reaches in some rows, not in others
    options = dict(GREEDY, eos_token_id=86, seq_len=11, fixed_output_length=fixed_output_length)
    expected = model.generate(images, **options)
    assert (expected == 0).any() and (expected[:, -1] != 0).any(), "want rows that end early and rows that do not"
    _assert_same_ids(moc.generate(model, images, **options), expected)


PROMPT = torch.tensor([[SOT, 5, 0, 7], [SOT, 0, 0, 9], [SOT, 3, 4, 5]])  # 0: the text tower's pad_id


@pytest.mark.usefixtures("open_clip_generate")
@pytest.mark.parametrize("correct_cls_mask", [False, True])
def test_a_prompt_with_pad_tokens_hides_the_keys_open_clip_hides(calls, correct_cls_mask):
    model, images = _coca(correct_cls_mask=correct_cls_mask), _images(3)
    expected = model.generate(images, PROMPT, seq_len=9, **GREEDY)
    _assert_same_ids(moc.generate(model, images, PROMPT, seq_len=9, **GREEDY), expected)
    assert calls == {"decode_attention": 6 * 4, "attention": 6}, "the prompt at once, then one token per step"


@pytest.mark.parametrize("correct_cls_mask", [False, True])
@torch.no_grad()
def test_cached_logits_equal_open_clip_s_forward(correct_cls_mask):
    """Stricter than the ids: the logits of the last position, step by step, where pads hide keys."""
    model, images = _coca(correct_cls_mask=correct_cls_mask), _images(3)
    image_latent, image_embs = model._encode_image(images)
    steps = CocaSteps(model, image_embs, capacity=12, tally=moc.TALLY)
    text = PROMPT
    for _ in range(3):
        expected = model(images, text, image_latent=image_latent, image_embs=image_embs, output_labels=False)["logits"]
        assert_close(steps.feed(text), expected[:, -1], 1e-5, f"logits after {text.shape[1]} tokens")
        text = torch.cat([text, torch.tensor([[0], [8], [0]])], 1)  # more pads, in two rows


@pytest.mark.usefixtures("open_clip_generate")
def test_each_step_feeds_one_token_to_the_text_tower():
    model, images = _coca(), _images(2)
    fed = []
    model.text.token_embedding.register_forward_hook(lambda module, args, out: fed.append(args[0].shape[1]))
    prompt = torch.tensor([[SOT, 4, 5], [SOT, 6, 7]])
    moc.generate(model, images, prompt, seq_len=8, **GREEDY)
    assert fed == [3, 1, 1, 1, 1]
    fed.clear()
    model.generate(images, prompt, seq_len=8, **GREEDY)
    assert fed == [3, 4, 5, 6, 7], "open_clip feeds the whole text again each step"


@pytest.mark.usefixtures("open_clip_generate")
def test_a_window_shorter_than_the_caption_slides_as_open_clip_slides_it():
    model, images = _coca(), _images(2)
    options = dict(GREEDY, seq_len=10, max_seq_len=4)
    _assert_same_ids(moc.generate(model, images, **options), model.generate(images, **options))


@pytest.mark.usefixtures("open_clip_generate")
@pytest.mark.parametrize(
    "options",
    [
        dict(generation_type="top_p", top_p=0.9, temperature=0.7),
        dict(generation_type="top_k", top_k=5, repetition_penalty=1.3, temperature=1.5),
    ],
    ids=["top_p", "top_k"],
)
def test_sampling_draws_the_same_tokens_from_the_same_seed(options):
    model, images = _coca(), _images(4)
    options = dict(GREEDY, seq_len=11, **options)
    torch.manual_seed(5)
    expected = model.generate(images, **options)
    torch.manual_seed(5)
    _assert_same_ids(moc.generate(model, images, **options), expected)


@pytest.mark.usefixtures("open_clip_generate")
def test_patch_installs_the_cached_generate(calls):
    model, images = _coca(), _images(3)
    expected = model.generate(images, seq_len=7, **GREEDY)
    patched = moc.patch(copy.deepcopy(model))
    calls["decode_attention"] = 0
    _assert_same_ids(patched.generate(images, None, 7, **GREEDY), expected)
    assert calls["decode_attention"] == 6 * 6


@pytest.mark.usefixtures("open_clip_generate")
def test_greedy_ids_on_the_triton_kernels(calls):
    model, images = _coca(), _images(2)
    expected = model.generate(images, seq_len=5, **GREEDY)
    with settings.override(backend="triton"):
        actual = moc.generate(model, images, seq_len=5, **GREEDY)
    _assert_same_ids(actual, expected)
    assert calls["decode_attention"] == 6 * 4


def test_a_model_in_training_mode_and_a_bidirectional_text_tower_run_open_clip_s_generate(monkeypatch):
    seen = []
    monkeypatch.setattr(open_clip.CoCa, "generate", lambda self, image, text=None, **kw: seen.append(kw) or "theirs")
    moc.TALLY.reset()
    model, images = _coca(), _images(1)
    assert moc.generate(model.train(), images, num_beams=2) == "theirs"
    assert isinstance(moc.patch(copy.deepcopy(model)).generate(images, None, 9, **GREEDY), torch.Tensor)
    bidirectional = _coca(no_causal_mask=True)
    assert moc.generate(bidirectional, images, seq_len=9, **GREEDY) == "theirs"
    assert seen == [dict(num_beams=2), dict(seq_len=9, **GREEDY)], "the caller's arguments, as given"
    assert set(moc.TALLY.fallbacks) == {
        "beam_search on a model in training mode: open_clip's beam search stays in it (dropout live)",
        "a bidirectional text tower (no_causal_mask=True): each new token changes the earlier ones",
    }


def test_errors_name_the_argument():
    model, images = _coca(), _images(2)
    with pytest.raises(ValueError, match="generation_type must be one of"):
        moc.generate(model, images, generation_type="greedy")
    with pytest.raises(ValueError, match=r"seq_len \(5\) must be larger than min_seq_len \(5\)"):
        moc.generate(model, images, seq_len=5, generation_type="top_k")
    with pytest.raises(TypeError, match=r"unknown arguments \['beams'\]"):
        moc.generate(model, images, beams=3)
    with pytest.raises(TypeError, match="model must be an open_clip CoCa"):
        moc.generate(torch.nn.Linear(2, 2), images)
    with pytest.raises(ValueError, match="text must be token ids"):
        moc.generate(model, images, torch.tensor([[SOT]] * 3), **GREEDY, seq_len=6)
    with pytest.raises(ValueError, match=r"the caption reached 13 tokens, more than this CoCa takes \(12"):
        moc.generate(model, images, **dict(GREEDY, eos_token_id=EOS), seq_len=20)
    with pytest.raises(ValueError, match="eos_token_id must be one token id"):
        moc.generate(model, images, **dict(GREEDY, eos_token_id=[1, 2]), seq_len=6)


BEAM = dict(sot_token_id=SOT, seq_len=11)
BEAM_CASES = {  # images _images(3, seed=4); open_clip's defaults: 6 beams in 3 groups, min_seq_len 5
    "defaults": dict(eos_token_id=EOS, seq_len=9),
    "2 beams": dict(eos_token_id=EOS, num_beams=2, num_beam_groups=1, min_seq_len=2),
    "4 beams in 2 groups, repetition penalty": dict(
        eos_token_id=69, num_beams=4, num_beam_groups=2, repetition_penalty=1.5
    ),
    "3 beams, min_seq_len 7": dict(eos_token_id=88, num_beams=3, num_beam_groups=1, min_seq_len=7),
    # groups of one beam, each done at its own step: some images finish while others go on
    "2 groups of 1": dict(eos_token_id=13, num_beams=2, num_beam_groups=2, min_seq_len=3),
    "3 groups of 1": dict(eos_token_id=88, num_beams=3, num_beam_groups=3, min_seq_len=2),
}


@pytest.mark.usefixtures("beam_scorer")
@pytest.mark.parametrize("case", list(BEAM_CASES))
def test_beam_search_ids_equal_open_clip(calls, case):
    model, images = _coca(), _images(3, seed=4)
    options = dict(BEAM, **BEAM_CASES[case])
    expected = model.generate(images, **options)
    fed = []
    model.text.token_embedding.register_forward_hook(lambda module, args, out: fed.append(args[0].shape))
    _assert_same_ids(moc.generate(model, images, **options), expected)
    beams = options.get("num_beams", 6)
    assert fed and all(shape == (3 * beams, 1) for shape in fed), "one token per beam per step"
    assert calls == {"decode_attention": 6 * len(fed), "attention": 0}, "2 text + 2 decoder self + 2 cross per step"
    assert moc.TALLY.fused == 6 * len(fed) and not moc.TALLY.fallbacks
    if case == "2 groups of 1":
        ended = (expected == 0).any(1)
        assert ended.any() and not ended.all(), "want images that finish while others go on"


@pytest.mark.usefixtures("beam_scorer")
@pytest.mark.parametrize("fixed_output_length", [False, True])
def test_beam_search_that_ends_before_seq_len_is_padded_as_open_clip_pads_it(calls, fixed_output_length):
    model, images = _coca(), _images(3, seed=86)
    options = dict(BEAM, eos_token_id=86, num_beams=4, num_beam_groups=4, min_seq_len=2)
    expected = model.generate(images, fixed_output_length=fixed_output_length, **options)
    assert (expected[:, -1] == 0).any(), "want captions shorter than others"
    if fixed_output_length:
        assert expected.shape[1] == options["seq_len"]
    else:
        assert expected.shape[1] < options["seq_len"], "want a beam search the scorer ends early"
    _assert_same_ids(moc.generate(model, images, fixed_output_length=fixed_output_length, **options), expected)
    assert calls["decode_attention"] < 6 * (options["seq_len"] - 1), "the caches stop when the scorer is done"


@pytest.mark.usefixtures("beam_scorer")
def test_beam_search_ignores_a_prompt_and_the_sampling_options_as_open_clip_does():
    model, images = _coca(), _images(3, seed=4)
    sampling = dict(max_seq_len=3, temperature=0.3, top_k=0, top_p=2.0)  # no window; no warper built
    options = dict(BEAM, eos_token_id=EOS, num_beams=2, num_beam_groups=1, **sampling)
    _assert_same_ids(moc.generate(model, images, PROMPT, **options), model.generate(images, PROMPT, **options))


@pytest.mark.usefixtures("beam_scorer")
def test_patch_installs_the_cached_beam_search(calls):
    model, images = _coca(), _images(2)
    expected = model.generate(images, None, 7, sot_token_id=SOT, eos_token_id=EOS)
    patched = moc.patch(copy.deepcopy(model))
    calls["decode_attention"] = 0
    _assert_same_ids(patched.generate(images, None, 7, sot_token_id=SOT, eos_token_id=EOS), expected)
    assert calls["decode_attention"] == 6 * 6 and not moc.TALLY.fallbacks


@pytest.mark.parametrize("correct_cls_mask", [False, True])
@torch.no_grad()
def test_reordered_caches_give_open_clip_s_logits_for_the_reordered_texts(correct_cls_mask):
    """Two beams per image trade places, one copied twice, where pads hide keys: the next token's logits are those
    of the texts moved (a beam only ever moves among its image's beams)."""
    model, images = _coca(correct_cls_mask=correct_cls_mask), _images(2).repeat_interleave(2, 0)
    image_latent, image_embs = model._encode_image(images)
    steps = CocaSteps(model, image_embs, capacity=12, tally=moc.TALLY)
    text = torch.tensor([[SOT, 5, 0, 7], [SOT, 0, 0, 9], [SOT, 3, 4, 5], [SOT, 6, 0, 0]])
    steps.feed(text)
    text = torch.cat([text, torch.tensor([[0], [8], [6], [2]])], 1)
    steps.feed(text)
    rows = torch.tensor([1, 1, 3, 2])
    steps.reorder(rows)
    text = torch.cat([text[rows], torch.tensor([[5], [0], [7], [0]])], 1)
    expected = model(images, text, image_latent=image_latent, image_embs=image_embs, output_labels=False)["logits"]
    assert_close(steps.feed(text), expected[:, -1], 1e-5, "logits after the reorder")


@pytest.mark.usefixtures("beam_scorer")
def test_beam_search_errors_name_the_argument():
    model, images = _coca(), _images(2)
    with pytest.raises(ValueError, match="num_beams"):
        moc.generate(model, images, num_beams=1, num_beam_groups=1, **BEAM)
    with pytest.raises(ValueError, match=r"the caption reached 13 tokens, more than this CoCa takes \(12"):
        moc.generate(model, images, **dict(BEAM, eos_token_id=EOS, seq_len=20, num_beams=2, num_beam_groups=1))


def test_beam_search_without_a_scorer_says_what_to_install(monkeypatch):
    from open_clip import coca_model

    monkeypatch.delattr(coca_model, "BeamSearchScorer", raising=False)
    for module in (transformers, transformers.generation):
        monkeypatch.setattr(module, "BeamSearchScorer", None, raising=False)
    with pytest.raises(ImportError, match=r"needs transformers' BeamSearchScorer.*transformers<5"):
        moc.generate(_coca(), _images(1), **BEAM)


@pytest.mark.usefixtures("beam_scorer")
def test_beam_search_on_the_triton_kernels(calls):
    model, images = _coca(), _images(2, seed=4)
    options = dict(BEAM, eos_token_id=EOS, seq_len=5, num_beams=2, num_beam_groups=1, min_seq_len=2)
    expected = model.generate(images, **options)
    with settings.override(backend="triton"):
        actual = moc.generate(model, images, **options)
    _assert_same_ids(actual, expected)
    assert calls["decode_attention"] == 6 * 4
