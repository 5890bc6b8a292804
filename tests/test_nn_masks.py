"""Dense masks and their structure (mome/nn/masks.py), and MultiheadAttention reading an attached structure."""

import pytest
import torch
from torch import nn

import mome.nn.masks as masks
from mome.nn import MaskStructure, MultiheadAttention, attach_structure
from tests.helpers import assert_close

NEG = float("-inf")


def _keep(batch, nq, nk, causal, lengths):
    """sdpa-style bool mask (True = take part) [B, 1, Nq, Nk] and its padding [B, Nk] (True = ignore)."""
    padding = torch.arange(nk)[None, :] >= torch.tensor(lengths)[:, None]
    visible = ~padding[:, None, None, :].expand(batch, 1, nq, nk)
    if causal:
        visible = visible & torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
    return visible, padding


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("as_float", [False, True])
@pytest.mark.parametrize("nq,nk", [(7, 7), (3, 9), (1, 5)])
def test_recognise_padding_and_causal(causal, as_float, nq, nk):
    visible, padding = _keep(3, nq, nk, causal, [nk, nk - 2, 1])
    mask = visible
    if as_float:
        mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    structure = masks.recognise(mask, nq, nk)
    assert structure is not None
    assert structure.causal == (causal and nq > 1)  # one query sees every earlier key: causal changes nothing
    assert torch.equal(structure.key_padding_mask, padding)


def test_recognise_no_padding_gives_none_padding():
    visible, _ = _keep(2, 5, 5, True, [5, 5])
    assert masks.recognise(visible, 5, 5) == MaskStructure(True, None)


@pytest.mark.parametrize(
    "mask",
    [
        torch.randn(2, 1, 4, 4),  # an additive bias
        torch.ones(4, 4, dtype=torch.bool).tril(-1)[None, None].expand(2, 1, 4, 4),  # not causal: shifted
        torch.stack([torch.ones(4, 4, dtype=torch.bool), torch.ones(4, 4, dtype=torch.bool).tril()])[None],  # per head
        torch.ones(4, 4, dtype=torch.bool).tril() & torch.ones(4, 4, dtype=torch.bool).triu(-1),  # a window
    ],
    ids=["bias", "shifted", "per-head", "window"],
)
def test_recognise_refuses_other_patterns(mask):
    assert masks.recognise(mask, 4, 4) is None


def test_structure_of_reads_the_values_once_per_tensor(monkeypatch):
    visible, padding = _keep(2, 4, 4, True, [4, 2])
    calls = []
    recognise = masks.recognise
    monkeypatch.setattr(masks, "recognise", lambda *args: calls.append(1) or recognise(*args))
    for _ in range(3):
        assert masks.structure_of(visible, 4, 4).causal
    assert len(calls) == 1
    visible[0, 0, 0, 1] = True  # an in-place change invalidates what was attached
    assert masks.structure_of(visible, 4, 4) is None
    assert len(calls) == 2


def test_attached_structure_follows_causal_slices_and_reshapes():
    causal = attach_structure(torch.full((8, 8), NEG).triu(1), MaskStructure(causal=True))
    assert masks.attached_structure(causal[:5, :5]) == (True, MaskStructure(causal=True))
    assert masks.attached_structure(causal[1:, 1:])[0] is False  # not a leading slice
    padded = attach_structure(torch.zeros(6, 3, 3), MaskStructure(True, torch.zeros(2, 3, dtype=torch.bool)))
    assert masks.attached_structure(padded.reshape(2, 3, 3, 3))[1] is masks.attached_structure(padded)[1]
    with pytest.raises(TypeError, match="structure must be a MaskStructure"):
        attach_structure(torch.zeros(2, 2), (True, None))


def test_multihead_attention_takes_an_attached_3d_mask_as_structure(monkeypatch):
    torch.manual_seed(0)
    batch, heads, length, dim = 3, 2, 6, 8
    torch_mha = nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    ours = MultiheadAttention.from_torch(torch_mha)
    x = torch.randn(batch, length, dim)
    padding = torch.arange(length)[None, :] >= torch.tensor([6, 4, 2])[:, None]
    additive = torch.full((length, length), NEG).triu(1) + torch.zeros(batch, 1, length).masked_fill(
        padding[:, None], NEG
    )
    additive = additive.repeat_interleave(heads, 0)  # [B·H, L, L], open_clip CoCa's text mask
    expected = torch_mha(x, x, x, attn_mask=additive, need_weights=False)[0]
    attach_structure(additive, MaskStructure(True, padding))
    parent = []
    monkeypatch.setattr(nn.MultiheadAttention, "forward", lambda *a, **k: parent.append(1))
    actual = ours(x, x, x, attn_mask=additive, need_weights=False)[0]
    assert not parent, "the fused path did not run"
    assert_close(actual, expected, 1e-6)


def test_recognitions_keep_to_their_convention():
    """A bool mask means "masked" to nn.MultiheadAttention and "take part" to sdpa: neither reads the other's answer."""
    blocked = torch.ones(4, 4, dtype=torch.bool).triu(1)
    assert masks.mha_structure_of(blocked, 2, 3, 4, 4) == MaskStructure(True, None)
    assert masks.structure_of(blocked, 4, 4) is None  # only the future visible: no structure
    assert masks.mha_structure_of(blocked, 2, 3, 4, 4) == MaskStructure(True, None)
    attach_structure(blocked, None)  # what a caller attaches holds for every reader
    assert masks.mha_structure_of(blocked, 2, 3, 4, 4) is None and masks.structure_of(blocked, 4, 4) is None


def test_recognise_mha_shapes_and_values():
    padding = torch.tensor([[False, False, True], [True, False, False]])
    per_head = padding[:, None, None, :].expand(2, 3, 3, 3).reshape(6, 3, 3)  # [B·H, L, S], H = 3
    structure = masks.recognise_mha(per_head, 2, 3, 3, 3)
    assert not structure.causal and torch.equal(structure.key_padding_mask, padding)
    assert masks.recognise_mha(per_head, 3, 2, 3, 3) is None  # as B 3, H 2 the heads of one element differ
    assert masks.recognise_mha(per_head[:4], 2, 3, 3, 3) is None  # not (B·H, L, S)
    causal = torch.full((3, 3), NEG).triu(1)
    assert masks.recognise_mha(causal, 1, 1, 3, 3) == MaskStructure(True, None)
    assert masks.recognise_mha(causal.clamp_min(torch.finfo(torch.float32).min), 1, 1, 3, 3) is None  # a bias
    assert masks.recognise_mha(causal + 0.5, 1, 1, 3, 3) is None
    assert masks.recognise_mha(causal.to(torch.int64).clamp(0, 1), 1, 1, 3, 3) is None


def test_float_key_padding_read_once(monkeypatch):
    kpm = torch.zeros(2, 5).masked_fill(torch.tensor([[False] * 4 + [True], [True] + [False] * 4]), NEG)
    first = masks.key_padding_of(kpm)
    assert torch.equal(first, torch.isneginf(kpm))
    monkeypatch.setattr(torch, "isneginf", lambda *a: pytest.fail("read again"))
    assert masks.key_padding_of(kpm) is first
    monkeypatch.undo()
    assert masks.key_padding_of(kpm + 1.0) is None  # a bias
    assert masks.key_padding_of(torch.zeros(2, 5, requires_grad=True)) is None  # learned: never read
