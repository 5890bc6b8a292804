"""Every validation path raises a ValueError/TypeError that names the offending argument."""

import re

import pytest
import torch

from mome.ops import attention, decode_attention, itc_loss, modality_ffn, modality_layer_norm, modality_linear


def raises_naming(error, name, fn):
    with pytest.raises(error, match=re.escape(name)):
        fn()


Q = torch.randn(2, 4, 5, 8)
K = torch.randn(2, 2, 6, 8)


@pytest.mark.parametrize(
    "error, name, kwargs",
    [
        (TypeError, "q", dict(q=[1.0])),
        (ValueError, "q", dict(q=torch.randn(4, 5, 8))),
        (TypeError, "q", dict(q=torch.randint(0, 3, (2, 4, 5, 8)))),
        (TypeError, "k", dict(k=K.double())),
        (ValueError, "k", dict(k=torch.randn(2, 2, 6, 9), v=torch.randn(2, 2, 6, 9))),
        (ValueError, "v", dict(v=torch.randn(2, 2, 7, 8))),
        (ValueError, "multiple of k's heads", dict(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8))),
        (TypeError, "key_padding_mask", dict(key_padding_mask=torch.zeros(2, 6))),
        (ValueError, "key_padding_mask", dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))),
        (ValueError, "prefix_len", dict(prefix_len=3)),
        (ValueError, "prefix_len", dict(causal=True, prefix_len=torch.tensor([1, 2, 3]))),
        (TypeError, "prefix_len", dict(causal=True, prefix_len=2.5)),
        (ValueError, "modality_mask", dict(modality=torch.zeros(2, 6, dtype=torch.long))),
        (
            ValueError,
            "modality",
            dict(modality=torch.full((2, 6), 3), modality_mask=torch.ones(2, 2, dtype=torch.bool)),
        ),
        (
            ValueError,
            "modality",
            dict(modality=torch.zeros(2, 5, dtype=torch.long), modality_mask=torch.ones(2, 2, dtype=torch.bool)),
        ),  # fmt: skip
        (
            TypeError,
            "modality_mask",
            dict(modality=torch.zeros(2, 6, dtype=torch.long), modality_mask=torch.ones(2, 2)),
        ),
        (ValueError, "backend", dict(backend="fastest")),
    ],
)
def test_attention_errors(error, name, kwargs):
    args = dict(q=Q, k=K, v=K) | kwargs
    raises_naming(error, name, lambda: attention(args.pop("q"), args.pop("k"), args.pop("v"), **args))


def test_forcing_an_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton.*(CUDA tensors|not installed)"):
        attention(Q, K, K, backend="triton")
    with pytest.raises(RuntimeError, match="no cuda implementation of attention"):
        attention(Q, K, K, backend="cuda")


def test_decode_errors():
    q, cache, lengths = torch.randn(2, 4, 8), torch.randn(2, 2, 5, 8), torch.tensor([1, 5])
    raises_naming(ValueError, "k_cache", lambda: decode_attention(q, torch.randn(2, 2, 5, 7), cache, lengths))
    raises_naming(ValueError, "cache_seqlens", lambda: decode_attention(q, cache, cache, torch.tensor([1, 6])))
    raises_naming(ValueError, "cache_seqlens", lambda: decode_attention(q, cache, cache, torch.tensor([1])))
    raises_naming(TypeError, "cache_seqlens", lambda: decode_attention(q, cache, cache, torch.tensor([1.0, 2.0])))
    raises_naming(ValueError, "multiple", lambda: decode_attention(torch.randn(2, 3, 8), cache, cache, lengths))


X = torch.randn(7, 4)
IDS = torch.tensor([0, 1, 2, 1, 0, 2, 2])
W = torch.randn(3, 5, 4)


@pytest.mark.parametrize(
    "error, name, call",
    [
        (ValueError, "x", lambda: modality_linear(torch.randn(7), IDS, W)),
        (ValueError, "modality", lambda: modality_linear(X, IDS[:5], W)),
        (ValueError, "modality", lambda: modality_linear(X, IDS + 1, W)),
        (TypeError, "modality", lambda: modality_linear(X, IDS.float(), W)),
        (ValueError, "weight", lambda: modality_linear(X, IDS, torch.randn(3, 5, 6))),
        (TypeError, "weight", lambda: modality_linear(X, IDS, W.double())),
        (ValueError, "bias", lambda: modality_linear(X, IDS, W, torch.randn(3, 4))),
        (ValueError, "activation", lambda: modality_linear(X, IDS, W, activation="swish")),
        (ValueError, "w2", lambda: modality_ffn(X, IDS, W, None, torch.randn(2, 4, 5), None)),
        (ValueError, "b2", lambda: modality_ffn(X, IDS, W, None, torch.randn(3, 4, 5), torch.randn(3, 5))),
        (ValueError, "weight", lambda: modality_layer_norm(X, IDS, torch.randn(3, 5), None)),
        (ValueError, "bias", lambda: modality_layer_norm(X, IDS, torch.randn(3, 4), torch.randn(2, 4))),
        (ValueError, "eps", lambda: modality_layer_norm(X, IDS, torch.randn(3, 4), None, eps=0.0)),
    ],
)
def test_modality_errors(error, name, call):
    raises_naming(error, name, call)


F_IMG, F_TXT = torch.randn(4, 8), torch.randn(4, 8)


@pytest.mark.parametrize(
    "error, name, kwargs",
    [
        (ValueError, "text_feats", dict(text_feats=torch.randn(3, 8))),
        (TypeError, "text_feats", dict(text_feats=F_TXT.half())),
        (ValueError, "image_feats", dict(image_feats=torch.randn(0, 8), text_feats=torch.randn(0, 8))),
        (ValueError, "text_queue", dict(image_queue=torch.randn(5, 8))),
        (ValueError, "text_queue", dict(image_queue=torch.randn(5, 8), text_queue=torch.randn(6, 8))),
        (ValueError, "image_queue", dict(image_queue=torch.randn(5, 7), text_queue=torch.randn(5, 7))),
        (ValueError, "image_feats_m", dict(alpha=0.4)),
        (ValueError, "alpha", dict(alpha=1.5)),
        (ValueError, "positive_ids", dict(positive_ids=torch.tensor([0, 1, 2]))),
        (ValueError, "queue_ids", dict(queue_ids=torch.tensor([0, 1]))),
        (ValueError, "hard_negatives", dict(hard_negatives="easiest")),
        (ValueError, "scale", dict(scale=torch.ones(2))),
        (TypeError, "scale", dict(scale="10")),
    ],
)
def test_itc_errors(error, name, kwargs):
    args = dict(image_feats=F_IMG, text_feats=F_TXT, scale=10.0) | kwargs
    raises_naming(error, name, lambda: itc_loss(args.pop("image_feats"), args.pop("text_feats"), args.pop("scale"),
                                                **args))  # fmt: skip
