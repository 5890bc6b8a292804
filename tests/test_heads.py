"""ITC / ITM / MLM heads, BERT masking, the momentum helpers and the feature queue."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mome import ops
from mome.nn import FeatureQueue, ITCHead, ITMHead, MLMHead, copy_params, itm_inputs, mask_tokens, momentum_update
from tests.helpers import assert_close


def test_itc_head_normalises_and_scale_is_clamped_inverse_temperature():
    torch.manual_seed(0)
    head = ITCHead(16, 8, init_temperature=0.07)
    image, text = head(torch.randn(5, 16), torch.randn(5, 16))
    assert image.shape == text.shape == (5, 8)
    assert_close(image.norm(dim=-1), torch.ones(5), 1e-6, "image norms")
    assert_close(text.norm(dim=-1), torch.ones(5), 1e-6, "text norms")
    assert head.scale.dim() == 0 and abs(head.scale.item() - 1 / 0.07) < 1e-3
    with torch.no_grad():
        head.temperature.fill_(1e-5)
    assert abs(head.scale.item() - 1000.0) < 1e-3  # clamped to 0.001 like ALBEF
    assert head(None, torch.randn(2, 16))[0] is None
    frozen = ITCHead(16, 8, learnable=False)
    assert "temperature" not in dict(frozen.named_parameters()) and "temperature" in frozen.state_dict()
    with pytest.raises(ValueError, match="init_temperature"):
        ITCHead(16, 8, init_temperature=2.0)


def test_itc_head_loss_is_itc_loss_at_its_scale_and_trains_the_temperature():
    torch.manual_seed(1)
    head = ITCHead(16, 8).double()
    image, text = head(torch.randn(6, 16, dtype=torch.float64), torch.randn(6, 16, dtype=torch.float64))
    out = head.loss(image, text)
    expected = ops.itc_loss(image, text, head.scale.detach())
    assert_close(out.loss, expected.loss, 1e-10, "loss")
    logits = head.scale * image @ text.T  # the CLIP formula, written out
    labels = torch.arange(6)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    got = torch.autograd.grad(out.loss, [head.temperature, head.image_proj.weight], retain_graph=True)
    want = torch.autograd.grad(clip, [head.temperature, head.image_proj.weight])
    assert_close(out.loss, clip, 1e-10, "loss vs formula")
    for name, a, b in zip(("temperature", "image_proj.weight"), got, want, strict=True):
        assert_close(a, b, 1e-8, f"d{name}")


def test_itm_head_and_batch_from_hard_negatives():
    head = ITMHead(12)
    assert head(torch.randn(7, 12)).shape == (7, 2)
    images = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 3, 2, 2)
    text = torch.arange(4).reshape(4, 1).expand(4, 5) * 10
    padding = torch.zeros(4, 5, dtype=torch.bool)
    padding[2, 3:] = True
    neg_text = torch.tensor([1, 0, -1, 2])  # image 2 has no negative text
    neg_image = torch.tensor([3, 2, 0, 1])
    pair_images, pair_text, pair_padding, labels = itm_inputs(images, text, padding, neg_text, neg_image)
    assert pair_images[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 0, 1, 3, 3, 2, 0, 1]
    assert (pair_text[:, 0] // 10).tolist() == [0, 1, 2, 3, 1, 0, 2, 0, 1, 2, 3]
    assert labels.tolist() == [1] * 4 + [0] * 7
    assert torch.equal(pair_padding, padding[pair_text[:, 0] // 10])


def test_mlm_head_loss_only_reads_masked_positions():
    torch.manual_seed(2)
    head = MLMHead(10, 23).double()
    hidden = torch.randn(3, 6, 10, dtype=torch.float64, requires_grad=True)
    labels = torch.full((3, 6), -100)
    labels[0, 1], labels[2, 4], labels[2, 5] = 5, 0, 22
    assert head(hidden).shape == (3, 6, 23)
    loss = head.loss(hidden, labels)
    expected = F.cross_entropy(head(hidden).reshape(-1, 23), labels.reshape(-1), ignore_index=-100)
    assert_close(loss, expected, 1e-10)
    (got,) = torch.autograd.grad(loss, hidden)
    (want,) = torch.autograd.grad(expected, hidden)
    assert_close(got, want, 1e-10, "dhidden")
    none_masked = head.loss(hidden, torch.full((3, 6), -100))
    assert none_masked.item() == 0.0 and none_masked.requires_grad


def test_mask_tokens_follows_bert_80_10_10():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 1000, (400, 500), generator=generator)
    ids[:, 0] = 1  # [CLS], special
    padding = torch.zeros_like(ids, dtype=torch.bool)
    padding[:, 400:] = True
    masked, labels = mask_tokens(ids, padding, mask_id=3, vocab_size=1000, generator=generator, special_ids=(1,))
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[padding].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    rate = chosen.sum().item() / (400 * 399)
    assert abs(rate - 0.15) < 0.005, rate
    became_mask = (masked[chosen] == 3).float().mean().item()
    kept = (masked[chosen] == ids[chosen]).float().mean().item()
    assert abs(became_mask - 0.8) < 0.01 and abs(kept - 0.1 - 0.001) < 0.01, (became_mask, kept)
    again = mask_tokens(ids, padding, 3, 1000, generator=torch.Generator().manual_seed(9), special_ids=(1,))
    same = mask_tokens(ids, padding, 3, 1000, generator=torch.Generator().manual_seed(9), special_ids=(1,))
    assert torch.equal(again[0], same[0]) and torch.equal(again[1], same[1])
    with pytest.raises(ValueError, match="prob"):
        mask_tokens(ids, padding, 3, 1000, prob=1.5)


def test_momentum_update_and_copy_params():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    model_m = copy.deepcopy(model)
    with torch.no_grad():
        for p in model_m.parameters():
            p.normal_()
    copy_params(model_m, model)
    for p_m, p in zip(model_m.parameters(), model.parameters(), strict=True):
        assert torch.equal(p_m, p) and not p_m.requires_grad
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model_m.parameters()]
    momentum_update(model_m, model, 0.995)
    for old, p_m, p in zip(before, model_m.parameters(), model.parameters(), strict=True):
        assert_close(p_m, 0.995 * old + 0.005 * p, 1e-6)
    with pytest.raises(ValueError, match="parameters"):
        momentum_update(nn.Linear(4, 3), model, 0.9)
    with pytest.raises(ValueError, match="momentum"):
        momentum_update(model_m, model, 1.5)


def test_feature_queue_wraps_around():
    queue = FeatureQueue(dim=3, size=5)
    assert queue.image_queue.shape == (5, 3) and (queue.ids == -1).all()
    assert_close(queue.text_queue.norm(dim=1), torch.ones(5), 1e-6, "initial unit rows")
    first = torch.arange(9.0).reshape(3, 3)
    queue.enqueue(first, -first, torch.tensor([10, 11, 12]))
    second = 100 + torch.arange(9.0).reshape(3, 3)
    queue.enqueue(second, -second)
    assert torch.equal(queue.image_queue, torch.cat([second[2:], first[1:], second[:2]]))
    assert torch.equal(queue.text_queue, -queue.image_queue)
    assert queue.ids.tolist() == [-1, 11, 12, -1, -1] and int(queue.ptr) == 1
    assert set(queue.state_dict()) == {"image_queue", "text_queue", "ids", "ptr"}
    with pytest.raises(ValueError, match="does not fit"):
        queue.enqueue(torch.zeros(6, 3), torch.zeros(6, 3))
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        queue.enqueue(torch.zeros(2, 4), torch.zeros(2, 4))
