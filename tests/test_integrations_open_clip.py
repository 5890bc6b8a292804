"""mome.integrations.open_clip against the real library: small random-weight CLIP and CoCa models from configs.

open_clip imports torchvision when it loads; where no torchvision imports beside this torch (PyPI's does not beside
the CPU build), tests/torchvision_standin.py stands in for it. The distributed loss test loads open_clip's
``loss.py`` by file path in its worker processes, which need no model.
"""

import copy
import datetime
import importlib.util

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests import torchvision_standin

torchvision_standin.install_if_missing()
open_clip = pytest.importorskip("open_clip")

import mome.integrations.open_clip as moc  # noqa: E402
import mome.nn  # noqa: E402
import mome.nn.masks as masks  # noqa: E402
import mome.ops  # noqa: E402
from mome import settings  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.integration_helpers import assert_grads_close, spread_weights  # noqa: E402

VISION = dict(image_size=16, patch_size=4, width=32, layers=2, head_width=8)
TEXT = dict(context_length=12, vocab_size=99, width=32, heads=4, layers=2)


@pytest.fixture
def fused_calls(monkeypatch):
    """(mome.ops.attention calls, fallbacks of mome's MultiheadAttention to torch's) while the test runs."""
    calls = {"fused": 0, "fallback": 0}
    attention, parent = mome.ops.attention, nn.MultiheadAttention.forward

    def fused(*args, **kwargs):
        calls["fused"] += 1
        return attention(*args, **kwargs)

    def fallback(self, *args, **kwargs):
        calls["fallback"] += isinstance(self, mome.nn.MultiheadAttention)
        return parent(self, *args, **kwargs)

    monkeypatch.setattr(mome.ops, "attention", fused)
    monkeypatch.setattr(nn.MultiheadAttention, "forward", fallback)
    recognise = masks.recognise
    monkeypatch.setattr(masks, "recognise", lambda *a: calls.__setitem__("read back", True) or recognise(*a))
    moc.TALLY.reset()
    return calls


def _pair(model):
    torch.manual_seed(0)
    reference = spread_weights(model.eval())
    return reference, moc.patch(copy.deepcopy(reference))


def _batch(batch=3, lengths=(12, 7, 4)):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 16, 16, generator=generator)
    text = torch.randint(1, 98, (batch, 12), generator=generator)  # the context length
    for row, length in enumerate(lengths):
        text[row, length - 1] = 98  # the end-of-text token: the highest id, where argmax pooling looks
        text[row, length:] = 0  # pad_id
    return images, text


def test_clip_towers_and_loss(fused_calls):
    reference, ours = _pair(open_clip.CLIP(embed_dim=16, vision_cfg=VISION, text_cfg=TEXT, output_dict=True))
    images, text = _batch()
    losses = []
    for model, loss in ((reference, open_clip.ClipLoss()), (ours, moc.ClipLoss())):
        out = model(images, text)
        losses.append(loss(out["image_features"], out["text_features"], out["logit_scale"]))
        losses[-1].backward()
    assert_close(losses[1], losses[0], 1e-6, "loss")
    assert_grads_close(reference, ours, 1e-6)
    assert fused_calls == {"fused": 4, "fallback": 0}, "2 vision + 2 text layers, the causal buffer as structure"


def test_clip_on_the_triton_kernels():
    reference, ours = _pair(open_clip.CLIP(embed_dim=16, vision_cfg=VISION, text_cfg=TEXT, output_dict=True))
    images, text = _batch(2, (12, 6))
    with settings.override(backend="triton"):
        expected, actual = reference(images, text), ours(images, text)
        for name in ("image_features", "text_features"):
            assert_close(actual[name], expected[name], 1e-4, name)
        sum(expected[n].sum() for n in ("image_features", "text_features")).backward()
        sum(actual[n].sum() for n in ("image_features", "text_features")).backward()
    assert_grads_close(reference, ours, 1e-4)


def _coca():
    vision = dict(VISION, attentional_pool=True, attn_pooler_queries=5, attn_pooler_heads=4, output_tokens=True)
    text = dict(TEXT, embed_cls=True, output_tokens=True)
    decoder = dict(TEXT, attn_pooler_heads=4)
    model = open_clip.CoCa(embed_dim=32, multimodal_cfg=decoder, text_cfg=text, vision_cfg=vision)
    # open_clip allocates the decoder's projection with torch.empty and never initialises it: give it values
    torch.nn.init.normal_(model.text_decoder.text_projection, std=TEXT["width"] ** -0.5)
    return model


def test_coca_padding_cls_mask_pooler_and_decoder(fused_calls):
    reference, ours = _pair(_coca())
    images, text = _batch()
    losses = []
    for model, loss in ((reference, open_clip.CoCaLoss(2.0, 1.0)), (ours, moc.CoCaLoss(2.0, 1.0))):
        out = model(images, text)
        names = ("image_features", "text_features", "logits", "labels", "logit_scale")
        losses.append(loss(**{name: out[name] for name in names}, output_dict=True))
        sum(losses[-1].values()).backward()
    for name in ("contrastive_loss", "caption_loss"):
        assert_close(losses[1][name], losses[0][name], 1e-6, name)
    assert_grads_close(reference, ours, 1e-6)
    # vision 2 + pooler 1 + text 2 ((B·H, L, L) causal + padding + CLS mask) + decoder 2 self + 2 cross
    assert fused_calls == {"fused": 9, "fallback": 0}


def test_coca_text_tower_with_the_corrected_cls_mask(fused_calls):
    reference, ours = _pair(_coca())
    reference.text.correct_cls_mask = ours.text.correct_cls_mask = True
    _, text = _batch()
    assert_close(ours.encode_text(text), reference.encode_text(text), 1e-6, "text_features")
    assert fused_calls == {"fused": 2, "fallback": 0}


def test_custom_attention_blocks_run_their_sdpa_on_mome():
    text = dict(TEXT, block_type="custom", qk_norm=True)
    reference, ours = _pair(open_clip.CustomTextCLIP(embed_dim=16, vision_cfg=VISION, text_cfg=text))
    _, text_ids = _batch()
    assert_close(ours.encode_text(text_ids), reference.encode_text(text_ids), 1e-6, "text_features")
    assert moc.TALLY.fused == 2 and not moc.TALLY.fallbacks


def test_scaled_cosine_attention_is_left_as_it_is():
    text = dict(TEXT, block_type="custom", scaled_cosine_attn=True)
    _, ours = _pair(open_clip.CustomTextCLIP(embed_dim=16, vision_cfg=VISION, text_cfg=text))
    assert moc.TALLY.fallbacks == {
        "scaled cosine attention (an open_clip Attention with scaled_cosine=True) left as is": 2
    }
    attentions = [m for m in ours.text.modules() if isinstance(m, open_clip.transformer.Attention)]
    assert len(attentions) == 2 and all(type(m) is open_clip.transformer.Attention for m in attentions)


def test_a_timm_vision_trunk_goes_through_the_timm_patch():
    pytest.importorskip("timm")
    import mome.integrations.timm as mtimm

    vision = dict(timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=False, timm_pool="", image_size=224)
    reference, ours = _pair(open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=TEXT, output_dict=True))
    mtimm.TALLY.reset()
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    assert_close(ours.encode_image(images), reference.encode_image(images), 1e-6, "image_features")
    assert mtimm.TALLY.fused == 12 and not mtimm.TALLY.fallbacks


def test_clip_loss_options_and_errors():
    generator = torch.Generator().manual_seed(4)
    image, text = (torch.randn(6, 8, generator=generator).requires_grad_() for _ in range(2))
    scale, bias = torch.tensor(7.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
    expected = open_clip.ClipLoss()(image, text, scale, bias, output_dict=True)["contrastive_loss"]
    actual = moc.ClipLoss(cache_labels=True)(image, text, scale, bias, output_dict=True)["contrastive_loss"]
    assert_close(actual, expected, 1e-6, "loss")
    actual.backward()
    assert bias.grad == 0  # a shift of every logit: the softmax does not see it
    with pytest.raises(ValueError, match="use_horovod"):
        moc.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="rank must lie"):
        moc.ClipLoss(rank=2, world_size=2)


def test_siglip_loss_and_its_gradients():
    generator = torch.Generator().manual_seed(5)
    features = [torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1) for _ in range(2)]
    results = []
    for loss_fn in (open_clip.loss.SigLipLoss(), moc.SigLipLoss()):
        image, text = (f.clone().requires_grad_() for f in features)
        scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)
        loss = loss_fn(image, text, scale, bias, output_dict=True)["contrastive_loss"]
        loss.backward()
        results.append((loss, image.grad, text.grad, scale.grad, bias.grad))
    for what, expected, actual in zip(("loss", "d image", "d text", "d scale", "d bias"), *results, strict=True):
        assert_close(actual, expected, 1e-6, what)
    with pytest.raises(ValueError, match="dist_impl"):
        moc.SigLipLoss(dist_impl="ring")


# --- distributed: 2 gloo processes, ClipLoss with every (local_loss, gather_with_grad), and SigLipLoss ---

WORLD, LOCAL = 2, 5
COMBINATIONS = [(local, with_grad) for local in (False, True) for with_grad in (False, True)]


def _open_clip_loss_module():
    spec = importlib.util.find_spec("open_clip")
    path = spec.submodule_search_locations[0] + "/loss.py"
    loss_spec = importlib.util.spec_from_file_location("open_clip_loss_by_path", path)
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    return module


def _worker(rank, store, result_dir):
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        open_clip_loss = _open_clip_loss_module()
        generator = torch.Generator().manual_seed(9)
        images, texts = (
            torch.randn(WORLD * LOCAL, 8, generator=generator),
            torch.randn(WORLD * LOCAL, 8, generator=generator),
        )
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        results = {}
        for local, with_grad in COMBINATIONS:
            options = dict(local_loss=local, gather_with_grad=with_grad, rank=rank, world_size=WORLD)
            for name, loss_fn in (("open_clip", open_clip_loss.ClipLoss(**options)), ("mome", moc.ClipLoss(**options))):
                image, text = images[rows].clone().requires_grad_(), texts[rows].clone().requires_grad_()
                scale = torch.tensor(5.0, requires_grad=True)
                loss = loss_fn(image, text, scale)
                loss.backward()
                results[local, with_grad, name] = (loss.detach(), image.grad, text.grad, scale.grad)
        for name, loss_fn in (("open_clip", open_clip_loss.SigLipLoss), ("mome", moc.SigLipLoss)):
            image, text = images[rows].clone().requires_grad_(), texts[rows].clone().requires_grad_()
            scale, bias = torch.tensor(5.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
            loss = loss_fn(rank=rank, world_size=WORLD)(image, text, scale, bias)
            loss.backward()
            results["siglip", None, name] = (loss.detach(), image.grad, text.grad, scale.grad, bias.grad)
        torch.save(results, f"{result_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_clip_and_siglip_losses_equal_open_clip(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for local, with_grad in [*COMBINATIONS, ("siglip", None)]:
            expected, actual = results[local, with_grad, "open_clip"], results[local, with_grad, "mome"]
            names = ("loss", "d image", "d text", "d scale", "d bias")[: len(expected)]
            for what, e, a in zip(names, expected, actual, strict=True):
                assert_close(a, e, 1e-6, f"rank {rank}, local_loss={local}, gather_with_grad={with_grad}: {what}")
