"""mome.integrations.transformers against the real library: small random-weight models built from configs.

Each model runs once as transformers' own sdpa (or BLIP's eager code) and once on mome: outputs and losses agree
to 1e-6 (fp32, reference backend; gradients to 2e-6, tests/integration_helpers.py says why) and to 1e-4 with the
Triton kernels under the interpreter; greedy generation gives the same ids; ``TALLY`` shows the fused path ran, and
the fallbacks' reasons.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mome.integrations.transformers as mt  # noqa: E402
import mome.nn.masks as masks  # noqa: E402
import mome.ops  # noqa: E402
from mome import settings  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.integration_helpers import assert_grads_close, spread_weights  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
VISION = dict(TINY, image_size=16, patch_size=4)
TEXT = dict(TINY, vocab_size=99, max_position_embeddings=40)


@pytest.fixture(autouse=True)
def registered():
    mt.register()
    mt.TALLY.reset()
    yield
    mt.TALLY.reset()


@pytest.fixture
def recognitions(monkeypatch):
    """How often a dense mask was read back to recognise it (0: every structure came from the mask builder)."""
    calls = []
    recognise = masks.recognise
    monkeypatch.setattr(masks, "recognise", lambda *args: calls.append(args[1:]) or recognise(*args))
    return calls


def _pair(model_cls, config, implementation="sdpa"):
    """The library's model (sdpa) and a copy on mome."""
    torch.manual_seed(0)
    reference = spread_weights(model_cls(config).eval())
    reference.set_attn_implementation(implementation)
    ours = copy.deepcopy(reference)
    ours.set_attn_implementation("mome")
    return reference, ours


def _text(batch=3, length=9, lengths=(9, 6, 4), left=False):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (batch, length), generator=generator)
    positions = torch.arange(length)
    keep = torch.stack([(positions >= length - n) if left else (positions < n) for n in lengths]).long()
    return ids.masked_fill(keep == 0, 0), keep


def _images(batch=3):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def _check_step(reference, ours, inputs, outputs, tol):
    """Forward both, compare ``outputs`` (names), then the gradients of a weighted sum of them."""
    expected, actual = reference(**inputs), ours(**inputs)
    weights = {name: torch.randn(expected[name].shape, generator=torch.Generator().manual_seed(3)) for name in outputs}
    for name in outputs:
        assert_close(actual[name], expected[name], tol, name)
    sum((expected[name] * weights[name]).sum() for name in outputs).backward()
    sum((actual[name] * weights[name]).sum() for name in outputs).backward()
    assert_grads_close(reference, ours, tol)


def _clip():
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    config.text_config.eos_token_id = 98  # the argmax pooling of token ids picks the last real token
    return _pair(transformers.CLIPModel, config)


def test_clip_runs_fused_with_padding_as_structure(recognitions):
    reference, ours = _clip()
    ids, keep = _text()
    inputs = dict(input_ids=ids, attention_mask=keep, pixel_values=_images())
    _check_step(reference, ours, inputs, ["logits_per_image", "text_embeds", "image_embeds"], 1e-6)
    assert mt.TALLY.fused == 4 and not mt.TALLY.fallbacks  # 2 text + 2 vision layers
    assert recognitions == [], "the text mask was read back instead of carrying its structure"


def test_clip_on_the_triton_kernels():
    reference, ours = _clip()
    ids, keep = _text(batch=2, lengths=(9, 5))
    inputs = dict(input_ids=ids, attention_mask=keep, pixel_values=_images(2))
    with settings.override(backend="triton"):
        _check_step(reference, ours, inputs, ["logits_per_image", "text_embeds"], 1e-4)
    assert mt.TALLY.fused == 4


def test_siglip_and_from_pretrained(tmp_path):
    config = transformers.SiglipConfig(text_config=TEXT, vision_config=VISION)
    reference, _ = _pair(transformers.SiglipModel, config)
    reference.save_pretrained(tmp_path)
    ours = transformers.SiglipModel.from_pretrained(tmp_path, attn_implementation="mome").eval()
    ids, _ = _text(lengths=(9, 9, 9))
    _check_step(reference, ours, dict(input_ids=ids, pixel_values=_images()), ["logits_per_image"], 1e-6)
    assert mt.TALLY.fused == 4 and not mt.TALLY.fallbacks


@pytest.mark.parametrize("matching_head", [True, False], ids=["itm", "itc"])
def test_blip2_vision_tower_and_qformer(matching_head):
    qformer = dict(TEXT, encoder_hidden_size=32, use_qformer_text_input=True)
    text = dict(TEXT, model_type="opt", ffn_dim=37, word_embed_proj_dim=32)
    config = transformers.Blip2Config(
        vision_config=VISION, qformer_config=qformer, text_config=text, num_query_tokens=5
    )
    reference, ours = _pair(transformers.Blip2ForImageTextRetrieval, config)
    ids, keep = _text()
    inputs = dict(
        pixel_values=_images(), input_ids=ids, attention_mask=keep, use_image_text_matching_head=matching_head
    )
    _check_step(reference, ours, inputs, ["logits_per_image"], 1e-6)
    # vision 2 + Q-Former self 2 + cross 1 (every second layer); ITC adds the text-only Q-Former pass (2)
    assert mt.TALLY.fused == (5 if matching_head else 7) and not mt.TALLY.fallbacks


def _llama(**extra):
    config = transformers.LlamaConfig(
        **TEXT, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra
    )
    return _pair(transformers.LlamaForCausalLM, config)


def test_llama_grouped_query_left_padding_and_generate(recognitions):
    reference, ours = _llama()
    ids, keep = _text(left=True)
    _check_step(reference, ours, dict(input_ids=ids, attention_mask=keep), ["logits"], 1e-6)
    assert mt.TALLY.fused == 2
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, attention_mask=keep, max_new_tokens=5, do_sample=False)
        mt.TALLY.reset()
        actual = ours.generate(input_ids=ids, attention_mask=keep, max_new_tokens=5, do_sample=False)
    assert actual.tolist() == expected.tolist()
    assert mt.TALLY.fused == 2 * 5 and not mt.TALLY.fallbacks  # prefill + 4 cached one-token steps, 2 layers
    assert recognitions == []


def test_output_attentions_falls_back_to_eager_with_the_reason():
    reference, ours = _clip()
    ids, keep = _text()
    inputs = dict(input_ids=ids, attention_mask=keep, pixel_values=_images())
    expected, actual = reference(**inputs), ours(**inputs, output_attentions=True)
    assert_close(actual.logits_per_image, expected.logits_per_image, 1e-6, "logits_per_image")
    assert actual.text_model_output.attentions[0].shape == (3, 4, 9, 9)
    assert mt.TALLY.fused == 0
    assert list(mt.TALLY.fallbacks) == ["output_attentions (only eager returns attention weights)"]


def test_attention_dropout_while_training_runs_fused():
    config = transformers.CLIPConfig(text_config=dict(TEXT, attention_dropout=0.5), vision_config=VISION)
    _, ours = _pair(transformers.CLIPModel, config)
    ours.train()
    ids, keep = _text()
    ours(input_ids=ids, attention_mask=keep, pixel_values=_images())
    assert mt.TALLY.fused == 4 and not mt.TALLY.fallbacks


def test_bert_trains_with_attention_dropout_on_mome(recognitions):
    config = transformers.BertConfig(**TEXT, attention_probs_dropout_prob=0.3, hidden_dropout_prob=0.0)
    reference, ours = _pair(transformers.BertModel, config)
    ids, keep = _text()
    inputs = dict(input_ids=ids, attention_mask=keep)
    _check_step(reference, ours, inputs, ["last_hidden_state"], 1e-6)  # eval: no dropout, sdpa's own result
    ours.train()

    def step(seed):
        torch.manual_seed(seed)
        return ours(**inputs).last_hidden_state

    mt.TALLY.reset()
    first = step(4)
    assert mt.TALLY.fused == 2 and not mt.TALLY.fallbacks, "the training forward did not run on mome"
    assert torch.equal(step(4), first) and not torch.allclose(step(5), first)
    assert not torch.allclose(first, ours.eval()(**inputs).last_hidden_state)
    ours.zero_grad()
    first.square().mean().backward()
    assert ours.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert recognitions == [], "BERT's mask carries its structure"


def test_t5_position_bias_runs_as_a_bias(monkeypatch):
    config = transformers.T5Config(
        vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    reference, ours = _pair(transformers.T5ForConditionalGeneration, config)
    with torch.no_grad():  # T5's init gives a near-zero position bias: make it matter
        for model in (reference, ours):
            for name, p in model.named_parameters():
                if name.endswith("relative_attention_bias.weight"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(6)))
    biases = []
    attention = mome.ops.attention
    monkeypatch.setattr(mome.ops, "attention", lambda *a, **k: biases.append(k["attn_bias"]) or attention(*a, **k))
    ids, keep = _text()
    labels, _ = _text(lengths=(9, 9, 9))
    _check_step(reference, ours, dict(input_ids=ids, attention_mask=keep, labels=labels), ["loss", "logits"], 1e-6)
    assert mt.TALLY.fused == 2 + 2 * 2 and not mt.TALLY.fallbacks  # encoder self; decoder self + cross
    assert all(bias is not None for bias in biases)


def test_a_sliding_window_mask_runs_as_a_bias(recognitions, monkeypatch):
    config = transformers.MistralConfig(**TEXT, num_key_value_heads=2, sliding_window=3, pad_token_id=0)
    reference, ours = _pair(transformers.MistralForCausalLM, config)
    ids, keep = _text()
    biases = []
    attention = mome.ops.attention
    monkeypatch.setattr(mome.ops, "attention", lambda *a, **k: biases.append(k["attn_bias"]) or attention(*a, **k))
    _check_step(reference, ours, dict(input_ids=ids, attention_mask=keep), ["logits"], 1e-6)
    assert mt.TALLY.fused == 2 and not mt.TALLY.fallbacks
    assert all(bias is not None and bias.shape == (3, 1, 9, 9) for bias in biases)
    assert len(recognitions) == 1, "one read of the mask per forward, shared by the layers"


# --- BLIP: its attentions ignore the interface; apply_mome_to_blip patches them ---


def _blip():
    text = dict(TEXT, encoder_hidden_size=32, bos_token_id=1, pad_token_id=0, sep_token_id=2, eos_token_id=2)
    config = transformers.BlipConfig(text_config=text, vision_config=VISION, projection_dim=16)
    torch.manual_seed(0)
    reference = spread_weights(transformers.BlipForConditionalGeneration(config).eval())
    return reference, mt.apply_mome_to_blip(copy.deepcopy(reference))


def test_blip_captioning_step_and_generate(monkeypatch, recognitions):
    reference, ours = _blip()
    ids, keep = _text()
    ids[:, 0] = 1
    inputs = dict(input_ids=ids, attention_mask=keep, pixel_values=_images(), labels=ids)
    _check_step(reference, ours, inputs, ["loss", "logits"], 1e-6)
    assert mt.TALLY.fused == 2 + 2 * 2  # vision 2, text decoder self + cross per layer
    query_lengths = []
    attention = mome.ops.attention
    monkeypatch.setattr(
        mome.ops, "attention", lambda q, *a, **k: query_lengths.append(q.shape[2]) or attention(q, *a, **k)
    )
    with torch.no_grad():
        expected = reference.generate(pixel_values=_images(), max_new_tokens=6, do_sample=False)
        actual = ours.generate(pixel_values=_images(), max_new_tokens=6, do_sample=False)
    assert actual.tolist() == expected.tolist()
    assert query_lengths.count(1) >= 2 * 2 * 4, "the cached steps (one query each) did not run on mome"
    assert recognitions == [], "BLIP's layers read their dense masks back"


def test_blip_trains_with_attention_dropout_on_mome():
    reference, ours = _blip()
    ours.config.text_config.attention_probs_dropout_prob = 0.3
    for module in ours.modules():
        if type(module).__name__ in ("MomeBlipAttention", "MomeBlipTextSelfAttention"):
            module.dropout.p = 0.3
    ids, keep = _text()
    ids[:, 0] = 1
    inputs = dict(input_ids=ids, attention_mask=keep, pixel_values=_images(), labels=ids)
    ours.train()

    def loss(seed):
        torch.manual_seed(seed)
        return ours(**inputs).loss

    first = loss(2)
    assert mt.TALLY.fused == 6 and not mt.TALLY.fallbacks
    assert torch.equal(loss(2), first) and not torch.equal(loss(3), first)
    first.backward()
    assert ours.vision_model.encoder.layers[0].self_attn.qkv.weight.grad.abs().sum() > 0


def test_blip_text_mask_that_is_not_structure_runs_as_a_bias(monkeypatch):
    reference, ours = _blip()
    biases = []
    attention = mome.ops.attention
    monkeypatch.setattr(mome.ops, "attention", lambda *a, **k: biases.append(k["attn_bias"]) or attention(*a, **k))
    ids, _ = _text()
    keep = torch.rand(3, 1, 9, 9, generator=torch.Generator().manual_seed(4)) < 0.6  # a model's own 4-D mask
    keep[..., 0] = True
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    image = torch.randn(3, 17, 32, generator=torch.Generator().manual_seed(5))
    kwargs = dict(input_ids=ids, attention_mask=additive, encoder_hidden_states=image)
    expected, actual = reference.text_decoder(**kwargs).logits, ours.text_decoder(**kwargs).logits
    assert_close(actual, expected, 1e-6, "logits")
    assert mt.TALLY.fused == 2 * 2 and not mt.TALLY.fallbacks
    assert [b is not None for b in biases] == [True, False] * 2  # self-attention: the bias; cross: no mask


def test_blip_on_the_triton_kernels():
    reference, ours = _blip()
    ids, keep = _text(batch=2, lengths=(9, 5))
    ids[:, 0] = 1
    inputs = dict(input_ids=ids, attention_mask=keep, pixel_values=_images(2), labels=ids)
    with settings.override(backend="triton"):
        _check_step(reference, ours, inputs, ["loss", "logits"], 1e-4)


def test_blip_class_patch_and_fallbacks(monkeypatch):
    reference, _ = _blip()
    ids, keep = _text()
    expected = reference(input_ids=ids, attention_mask=keep, pixel_values=_images())
    from transformers.models.blip import modeling_blip, modeling_blip_text

    for cls in (
        modeling_blip.BlipAttention,
        modeling_blip_text.BlipTextSelfAttention,
        modeling_blip_text.BlipTextModel,
    ):
        monkeypatch.setattr(cls, "forward", cls.forward)  # restored after the test
    assert mt.apply_mome_to_blip() is None  # every BLIP model, through its classes: `reference` too now
    actual = reference(input_ids=ids, attention_mask=keep, pixel_values=_images())
    assert_close(actual.logits, expected.logits, 1e-6, "logits")
    assert mt.TALLY.fused == 6
    mt.TALLY.reset()
    reference(input_ids=ids, attention_mask=keep, pixel_values=_images(), output_attentions=True)
    assert mt.TALLY.fused == 0 and list(mt.TALLY.fallbacks) == [
        "output_attentions (BLIP's own attention returns the weights)"
    ]
