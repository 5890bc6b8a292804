"""Bad arguments of the ITC options (label smoothing, the sigmoid loss, query tokens, hard-negative sources,
detached columns, queue layouts): each error names the argument; and options a backend does not declare are
declined with that reason, never run without them."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

import mome.reference.itc as reference_itc
from mome.nn import ITCLoss
from mome.ops import BackendUnavailableError, itc_loss
from mome.ops.itc import BACKENDS, FAMILY, OPTION_SIZES, ITCOptions, _ITCBackends, _measure, itc_loss_rows
from tests.helpers import usable_backends

BATCH, DIM = 4, 8


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


IMAGE, TEXT, QUEUE = unit(BATCH, DIM), unit(BATCH, DIM), unit(6, DIM)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(label_smoothing="0.1"), TypeError, "label_smoothing"),
        (dict(label_smoothing=torch.tensor(0.1)), TypeError, "label_smoothing"),
        (dict(loss="hinge"), ValueError, "loss"),
        (dict(loss=1), TypeError, "loss"),
        (dict(loss="sigmoid", label_smoothing=0.1), ValueError, "label_smoothing"),
        (dict(loss="sigmoid", image_feats_m=IMAGE, text_feats_m=TEXT, alpha=0.4), ValueError, "alpha"),
        (dict(logit_bias=-10.0), ValueError, "logit_bias"),
        (dict(loss="sigmoid", logit_bias="-10"), TypeError, "logit_bias"),
        (dict(loss="sigmoid", logit_bias=torch.ones(2)), ValueError, "logit_bias"),
        (dict(loss="sigmoid", logit_bias=torch.tensor(1)), TypeError, "logit_bias"),
        (dict(hard_negative_source="online"), ValueError, "hard_negative_source"),
        (dict(hard_negative_source=None), ValueError, "hard_negative_source"),
        (dict(detach_columns="yes"), TypeError, "detach_columns"),
        (dict(queue_layout="auto", image_queue=QUEUE, text_queue=QUEUE), ValueError, "queue_layout"),
        (dict(image_queue=QUEUE.T, text_queue=QUEUE.T), ValueError, "queue_layout='columns'"),
        (dict(image_queue=QUEUE, text_queue=QUEUE, queue_layout="columns"), ValueError, "image_queue"),
        (dict(image_queue=QUEUE.T, text_queue=unit(5, DIM).T, queue_layout="columns"), ValueError, "text_queue"),
        (dict(image_feats=unit(BATCH, 2, 3, DIM)), ValueError, "image_feats"),
        (dict(image_feats=unit(BATCH, 0, DIM)), ValueError, "image_feats"),
        (dict(text_feats=unit(BATCH, 2, DIM)), ValueError, "text_feats"),
        (dict(image_feats=unit(BATCH, 3, DIM), image_feats_m=unit(BATCH, 2, DIM)), ValueError, "image_feats_m"),
        (dict(image_feats=unit(BATCH, 3, DIM), image_queue=QUEUE, text_queue=QUEUE), ValueError, "image_queue"),
        (
            dict(image_feats=unit(BATCH, 3, DIM), image_queue=QUEUE.T, text_queue=QUEUE.T, queue_layout="columns"),
            ValueError,
            "queue_layout",
        ),  # fmt: skip
    ],
)
def test_itc_loss_option_errors_name_the_argument(kwargs, error, name):
    args = dict(image_feats=IMAGE, text_feats=TEXT) | kwargs
    with pytest.raises(error, match=name):
        itc_loss(args.pop("image_feats"), args.pop("text_feats"), 5.0, **args, backend="reference")


def test_the_queue_error_says_which_layout_it_expected():
    with pytest.raises(ValueError, match=r"image_queue must have shape \(\*, 8\).*queue_layout='columns'"):
        itc_loss(IMAGE, TEXT, 5.0, image_queue=QUEUE.T, text_queue=QUEUE.T)
    with pytest.raises(ValueError, match=r"image_queue must have shape \(8, \*\) \(d, Q\)"):
        itc_loss(IMAGE, TEXT, 5.0, image_queue=unit(6, 7), text_queue=unit(6, 7), queue_layout="columns")


ROWS = dict(image_rows=IMAGE[1:3], text_rows=TEXT[1:3], image_columns=IMAGE, text_columns=TEXT, scale=5.0, row_offset=1)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        # momentum rows: the columns are momentum features, so the online ones must be said
        (
            dict(
                options=ITCOptions(image_feats_m=IMAGE[1:3], text_feats_m=TEXT[1:3]),
                hard_negatives="hardest",
                hard_negative_source="similarity",
            ),
            "mining_image_columns",
        ),  # fmt: skip
        (
            dict(options=ITCOptions(mining_image_columns=IMAGE, mining_text_columns=TEXT), hard_negatives="hardest"),
            "hard_negative_source",
        ),  # fmt: skip
        (dict(options=ITCOptions(mining_image_columns=IMAGE)), "mining_text_columns"),
        (dict(options=ITCOptions(mining_image_columns=IMAGE[:3], mining_text_columns=TEXT)), "mining_image_columns"),
        (dict(options=ITCOptions(loss="sigmoid", label_smoothing=0.2)), "label_smoothing"),
        (dict(logit_bias=1.0), "logit_bias"),
        (dict(detach_columns=1), "detach_columns"),
    ],
)
def test_itc_loss_rows_option_errors_name_the_argument(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        itc_loss_rows(**ROWS, **kwargs, backend="reference")


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(loss="contrastive"), "loss"),
        (dict(hard_negative_source="momentum"), "hard_negative_source"),
        (dict(label_smoothing=1.5), "label_smoothing"),
    ],
)
def test_module_option_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ITCLoss(**kwargs)


# --- declared options: a backend that does not name one is never given it ---

OPTION_INPUTS = {
    "query_tokens": dict(image_rows=unit(BATCH, 3, DIM), image_columns=unit(BATCH, 3, DIM), options=ITCOptions()),
    "sigmoid_loss": dict(image_rows=IMAGE, image_columns=IMAGE, options=ITCOptions(loss="sigmoid")),
    "label_smoothing": dict(image_rows=IMAGE, image_columns=IMAGE, options=ITCOptions(label_smoothing=0.1)),
    "mining_columns": dict(
        image_rows=IMAGE, image_columns=IMAGE, options=ITCOptions(mining_image_columns=IMAGE, mining_text_columns=TEXT)
    ),  # fmt: skip
}


@pytest.fixture
def undeclaring_backend(monkeypatch):
    """The reference's launchers in a module whose LIMITS name no option: a backend written before they existed."""
    module = types.ModuleType("itc_without_options")
    module.itc_loss_fwd, module.itc_loss_bwd = reference_itc.itc_loss_fwd, reference_itc.itc_loss_bwd
    module.LIMITS = {"dtypes": (torch.float32, torch.float64)}
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return _ITCBackends("itc_loss", FAMILY, {"reference": module.__name__}, _measure)


@pytest.mark.parametrize("option", list(OPTION_SIZES))
def test_an_option_a_backend_does_not_declare_is_declined_with_its_name(undeclaring_backend, option):
    assert OPTION_INPUTS.keys() == OPTION_SIZES.keys()
    why = undeclaring_backend.reason("reference", OPTION_INPUTS[option])
    assert why is not None and option in why and "does not declare" in why
    assert (
        undeclaring_backend.reason("reference", dict(image_rows=IMAGE, image_columns=IMAGE, options=ITCOptions()))
        is None
    )
    assert BACKENDS.reason("reference", OPTION_INPUTS[option]) is None  # the spec runs every option


@pytest.mark.skipif("triton" not in usable_backends(BACKENDS), reason="triton cannot run here")
def test_query_tokens_are_declined_by_triton_and_run_on_the_reference():
    image = unit(BATCH, 3, DIM)
    why = BACKENDS.reason("triton", dict(image_rows=image, image_columns=image, options=ITCOptions()))
    assert "query_tokens" in why
    with pytest.raises(BackendUnavailableError, match="query_tokens"):
        itc_loss(image, TEXT, 5.0, backend="triton")
    auto = itc_loss(image, TEXT, 5.0, backend="auto")
    assert torch.allclose(auto.loss, itc_loss(image, TEXT, 5.0, backend="reference").loss)
    # one query token is a plain vector: triton runs it
    assert (
        BACKENDS.reason("triton", dict(image_rows=image[:, 0], image_columns=image[:, 0], options=ITCOptions())) is None
    )
    itc_loss(image[:, :1], TEXT, 5.0, backend="triton")
