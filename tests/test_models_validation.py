"""Module entry points on edge inputs (issue 12, point 10): MoMETransformer's text / image checks and
CaptionDecoder.generate on an empty batch, max_new_tokens=0 and bad arguments."""

from __future__ import annotations

import pytest
import torch

from mome import settings
from mome.models import MoMETransformer, beit3_tiny, vlmo_tiny
from mome.nn.decoder import CaptionDecoder

CONFIGS = [vlmo_tiny, beit3_tiny]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(make_config) -> MoMETransformer:
    torch.manual_seed(0)
    return MoMETransformer(make_config(depth=1)).eval()


def images(config, batch: int) -> torch.Tensor:
    return torch.randn(batch, config.in_chans, config.image_size, config.image_size)


# --- MoMETransformer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_config", CONFIGS)
@pytest.mark.parametrize("bad_id", ["vocab_size", "negative"])
def test_out_of_vocabulary_ids_raise_a_value_error_naming_text_ids_and_the_range(make_config, bad_id):
    model = tiny_model(make_config)
    vocab = model.config.vocab_size
    text = torch.tensor([[1, 2, 3], [4, 5, 6]])
    text[1, 2] = vocab if bad_id == "vocab_size" else -1
    pattern = rf"text_ids must lie in \[0, {vocab - 1}\].*vocab_size = {vocab}"
    with pytest.raises(ValueError, match=pattern):
        model.encode_text(text)
    with pytest.raises(ValueError, match=pattern):
        model.encode_pair(images(model.config, 2), text)
    with pytest.raises(ValueError, match=pattern):
        model(text_ids=text)


@pytest.mark.parametrize("make_config", CONFIGS)
def test_empty_text_raises_a_value_error(make_config):
    """Length 0 has no [CLS] for text_cls (VLMo's fused CLS would silently be an image token)."""
    model = tiny_model(make_config)
    empty = torch.zeros(2, 0, dtype=torch.int64)
    with pytest.raises(ValueError, match="text_ids must hold at least one token"):
        model.encode_text(empty)
    with pytest.raises(ValueError, match="text_ids must hold at least one token"):
        model.encode_pair(images(model.config, 2), empty)


@pytest.mark.parametrize("make_config", CONFIGS)
def test_empty_batch_encodes_to_empty_outputs(make_config):
    model = tiny_model(make_config)
    config, text = model.config, torch.zeros(0, 5, dtype=torch.int64)
    tokens = config.num_patches + 1
    out = model.encode_text(text, torch.zeros(0, 5, dtype=torch.bool))
    assert out.hidden.shape == (0, 5, config.dim) and out.text_cls.shape == (0, config.dim)
    out = model.encode_image(images(config, 0))
    assert out.hidden.shape == (0, tokens, config.dim) and out.image_cls.shape == (0, config.dim)
    out = model.encode_pair(images(config, 0), text)
    assert out.hidden.shape == (0, tokens + 5, config.dim) and model.fused_cls(out).shape == (0, config.dim)


def test_narrow_integer_ids_are_accepted_and_bool_or_float_ids_are_not():
    model = tiny_model(vlmo_tiny)
    text = torch.tensor([[1, 7, 30, 2]])
    expected = model.encode_text(text).hidden
    for dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        torch.testing.assert_close(model.encode_text(text.to(dtype)).hidden, expected, rtol=0, atol=0)
    for dtype in (torch.bool, torch.float32):
        with pytest.raises(ValueError, match=r"text_ids must be a \(B, L\) integer tensor"):
            model.encode_text(text.to(dtype))


def test_id_range_check_respects_mome_check_ids():
    """MOME_CHECK_IDS=0 skips the host sync (and hands out-of-range ids to the embedding, as documented)."""
    model = tiny_model(vlmo_tiny)
    text = torch.tensor([[1, model.config.vocab_size]])
    with settings.override(check_ids=False), pytest.raises(IndexError):
        model.encode_text(text)


def test_encode_text_compiles_without_graph_breaks():
    """The range check reads values back to the host: it must be skipped while torch.compile traces."""
    torch._dynamo.reset()
    model = tiny_model(vlmo_tiny)
    text = torch.tensor([[1, 7, 30, 2], [3, 4, 5, 6]])
    compiled = torch.compile(lambda ids: model.encode_text(ids).text_cls, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(text), model.encode_text(text).text_cls)


@pytest.mark.parametrize("make_config", CONFIGS)
def test_masked_position_of_the_wrong_shape_is_named(make_config):
    model = tiny_model(make_config)
    config = model.config
    with pytest.raises(ValueError, match=rf"masked_position must be a \(B, P\) = \(1, {config.num_patches}\)"):
        model.encode_image(images(config, 1), torch.zeros(1, 3, dtype=torch.bool))
    masked = torch.zeros(1, config.num_patches, dtype=torch.bool)
    masked[0, :2] = True
    assert model.encode_image(images(config, 1), masked).hidden.shape == (1, config.num_patches + 1, config.dim)


# --- CaptionDecoder.generate --------------------------------------------------------------------------------

VOCAB, BOS, EOS, PAD = 13, 1, 2, 0


def tiny_decoder(dtype=torch.float64) -> CaptionDecoder:
    torch.manual_seed(0)
    return CaptionDecoder(VOCAB, 24, 2, 3, max_len=12, image_dim=20, pad_id=PAD).to(dtype).eval()


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_generate_on_an_empty_batch_returns_the_empty_bos_column(use_cache, strategy):
    decoder = tiny_decoder()
    image = torch.randn(0, 5, 20, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0) if strategy == "sample" else None
    ids, logits = decoder.generate(
        image, 4, BOS, EOS, strategy=strategy, generator=gen, use_cache=use_cache, return_logits=True
    )
    assert ids.shape == (0, 1) and ids.dtype == torch.int64
    assert logits.shape == (0, 0, VOCAB) and logits.dtype == torch.float64
    assert decoder.generate(image, 4, BOS, EOS, use_cache=use_cache).shape == (0, 1)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_with_max_new_tokens_zero_returns_bos_only(use_cache):
    decoder = tiny_decoder(torch.float32)
    image = torch.randn(3, 5, 20)
    ids, logits = decoder.generate(image, 0, BOS, EOS, use_cache=use_cache, return_logits=True)
    assert torch.equal(ids, torch.full((3, 1), BOS)) and logits.shape == (3, 0, VOCAB)
    assert logits.dtype == torch.float32


def test_generate_results_do_not_change_for_a_nonempty_batch():
    """Moving the 'every sequence ended' check to the top of the loop keeps the steps of a real batch."""
    decoder = tiny_decoder()
    image = torch.randn(2, 5, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cached, cached_logits = decoder.generate(image, 6, BOS, EOS, return_logits=True)
    fresh, fresh_logits = decoder.generate(image, 6, BOS, EOS, return_logits=True, use_cache=False)
    assert torch.equal(cached, fresh) and 2 <= cached.shape[1] <= 7
    assert cached_logits.shape == (2, cached.shape[1] - 1, VOCAB)
    torch.testing.assert_close(cached_logits, fresh_logits)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(max_new_tokens=True), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
        (dict(bos_id=True), ValueError, "bos_id"),
        (dict(eos_id=2.0), ValueError, "eos_id"),
        (dict(strategy="sample", temperature=float("inf")), ValueError, "temperature"),
        (dict(strategy="sample", temperature=float("nan")), ValueError, "temperature"),
        (dict(strategy="sample", top_k=True), ValueError, "top_k"),
        (dict(strategy="sample", top_p=float("nan")), ValueError, "top_p"),
        (dict(strategy="sample", generator=5), TypeError, "generator"),
    ],
)
def test_generate_arguments_are_named(kwargs, error, pattern):
    decoder = tiny_decoder()
    args = {**dict(max_new_tokens=3, bos_id=BOS, eos_id=EOS), **kwargs}
    with pytest.raises(error, match=pattern):
        decoder.generate(torch.randn(2, 5, 20, dtype=torch.float64), **args)


def test_image_tokens_of_another_dtype_are_named():
    decoder = tiny_decoder(torch.float64)
    text = torch.full((2, 3), BOS)
    with pytest.raises(TypeError, match="image_tokens must have the decoder's dtype torch.float64"):
        decoder(text, torch.randn(2, 5, 20))
    with pytest.raises(TypeError, match="image_tokens"):
        decoder.generate(torch.randn(2, 5, 20), 3, BOS, EOS)


def test_decoder_text_id_check_respects_mome_check_ids_and_names_the_range():
    decoder = tiny_decoder()
    image = torch.randn(2, 5, 20, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"text_ids must lie in \[0, {VOCAB - 1}\]"):
        decoder(torch.tensor([[BOS, -1], [BOS, 3]]), image)
    with settings.override(check_ids=False), pytest.raises(IndexError):
        decoder(torch.tensor([[BOS, VOCAB], [BOS, 3]]), image)
