"""itc_loss_local (one rank's rows against the global batch): the spec against the full spec, both backends against
the spec, sampled negatives independent of which slice computes a row."""

import pytest
import torch
import torch.nn.functional as F

from mome.ops import itc_loss
from mome.ops.itc import itc_loss_local
from mome.reference.itc import itc_loss_local_ref, itc_loss_ref, positive_mask
from tests.helpers import TOLERANCE, assert_close

GRAD_WEIGHTS = (0.7, 1.3)  # d loss_i2t, d loss_t2i: unequal, so a swapped direction fails
BATCH, DIM, QUEUE = 45, 24, 7


def features(rows, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1)


def make_batch(mode, batch=BATCH, seed=0):
    """The global batch in float64: online features, and in ALBEF mode momentum features, a queue and ids."""
    case = dict(image=features(batch, DIM, seed), text=features(batch, DIM, seed + 1), scale=11.0)
    if mode == "albef":
        gen = torch.Generator().manual_seed(seed + 2)
        case.update(
            image_m=features(batch, DIM, seed + 3),
            text_m=features(batch, DIM, seed + 4),
            image_queue=features(QUEUE, DIM, seed + 5),
            text_queue=features(QUEUE, DIM, seed + 6),
            positive_ids=torch.randint(0, 15, (batch,), generator=gen),
            queue_ids=torch.randint(0, 15, (QUEUE,), generator=gen),
            alpha=0.4,
        )
    return case


def local_args(case, start, stop, dtype):
    """itc_loss_local arguments for rows [start, stop): online rows, and columns online (CLIP) or momentum (ALBEF)."""
    cast = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()}
    image, text = cast["image"], cast["text"]
    albef = "image_m" in cast
    args = dict(
        image_rows=image[start:stop].clone().requires_grad_(),
        text_rows=text[start:stop].clone().requires_grad_(),
        image_columns=cast["image_m"] if albef else image.clone().requires_grad_(),
        text_columns=cast["text_m"] if albef else text.clone().requires_grad_(),
        scale=torch.tensor(
            case["scale"],
            dtype=torch.float64 if dtype == torch.float64 else torch.float32,
            device=image.device,
            requires_grad=True,
        ),
        row_offset=start,
    )
    if albef:
        args.update(image_rows_m=cast["image_m"][start:stop], text_rows_m=cast["text_m"][start:stop])
        args.update({k: cast[k] for k in ("image_queue", "text_queue", "positive_ids", "queue_ids", "alpha")})
    return args


DIFFERENTIABLE = ("image_rows", "text_rows", "image_columns", "text_columns", "scale")


def losses_and_grads(args, run):
    out = run(args)
    wrt = [args[name] for name in DIFFERENTIABLE if args[name].requires_grad]
    grads = torch.autograd.grad(GRAD_WEIGHTS[0] * out.loss_i2t + GRAD_WEIGHTS[1] * out.loss_t2i, wrt)
    return out, grads


@pytest.mark.parametrize("mode", ["clip", "albef"])
def test_spec_slices_make_up_the_full_spec(mode):
    """Equal-weighted slices: Σ (b_k / B) · local loss_k is the full loss, for the value and every gradient."""
    case = make_batch(mode)
    image = case["image"].clone().requires_grad_()
    text = case["text"].clone().requires_grad_()
    scale = torch.tensor(case["scale"], dtype=torch.float64, requires_grad=True)
    albef = mode == "albef"
    shared = {k: case[k] for k in ("image_queue", "text_queue", "positive_ids", "queue_ids", "alpha") if k in case}
    full = itc_loss_ref(image, text, scale, image_feats_m=case.get("image_m"), text_feats_m=case.get("text_m"),
                        hard_negatives="hardest", **shared)  # fmt: skip
    total, picks_text, picks_image = 0.0, [], []
    for start, stop in ((0, 4), (4, 31), (31, 32), (32, BATCH)):
        local = itc_loss_local_ref(
            image[start:stop], text[start:stop], case["image_m"] if albef else image,
            case["text_m"] if albef else text, scale, row_offset=start,
            image_rows_m=case["image_m"][start:stop] if albef else None,
            text_rows_m=case["text_m"][start:stop] if albef else None, hard_negatives="hardest", **shared,
        )  # fmt: skip
        total = total + (stop - start) / BATCH * local.loss
        picks_text.append(local.neg_text_idx)
        picks_image.append(local.neg_image_idx)
    assert_close(total, full.loss, 1e-13, "loss")
    for name, a, e in zip(("d image", "d text", "d scale"), torch.autograd.grad(total, [image, text, scale]),
                          torch.autograd.grad(full.loss, [image, text, scale]), strict=True):  # fmt: skip
        assert_close(a, e, 1e-12, name)
    assert torch.equal(torch.cat(picks_text), full.neg_text_idx)
    assert torch.equal(torch.cat(picks_image), full.neg_image_idx)


SLICES = {"start": (0, 37), "middle": (13, 32), "end": (BATCH - 1, BATCH), "whole": (0, BATCH)}


@pytest.mark.parametrize("where", list(SLICES))
@pytest.mark.parametrize("mode", ["clip", "albef"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_op_matches_the_spec(backend, dtype, mode, where, poisoned_allocations):
    """Local losses, per-row lse, every gradient (rows, online columns, scale) and the hardest picks."""
    start, stop = SLICES[where]
    case = make_batch(mode)
    rounded = {
        k: (v.to(dtype).double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()
    }
    expected_args = local_args(rounded, start, stop, torch.float64)
    expected, expected_grads = losses_and_grads(
        expected_args, lambda a: itc_loss_local_ref(**a, hard_negatives="hardest")
    )
    actual_args = local_args(case, start, stop, dtype)
    actual, actual_grads = losses_and_grads(
        actual_args, lambda a: itc_loss_local(**a, hard_negatives="hardest", backend=backend)
    )
    tol = TOLERANCE[dtype] if dtype != torch.float64 else 1e-10
    assert actual.lse_i2t.shape == (stop - start,) and actual.neg_text_idx.shape == (stop - start,)
    assert_close(actual.loss_i2t, expected.loss_i2t, tol, "loss_i2t")
    assert_close(actual.loss_t2i, expected.loss_t2i, tol, "loss_t2i")
    names = [name for name in DIFFERENTIABLE if expected_args[name].requires_grad]
    assert len(names) == (5 if mode == "clip" else 3)
    for name, a, e in zip(names, actual_grads, expected_grads, strict=True):
        assert_close(a, e, tol, f"d {name}")
    r = expected_args
    text_all = torch.cat([t for t in (r["text_columns"], r.get("text_queue")) if t is not None])
    lse = torch.logsumexp(r["scale"] * r["image_rows"] @ text_all.T, dim=1).detach()
    assert_close(actual.lse_i2t.double(), lse, max(tol, 1e-7), "lse_i2t")  # saved in fp32
    if dtype == torch.float64:  # fp32 rounding may flip near-ties of the arg-max
        assert torch.equal(actual.neg_text_idx, expected.neg_text_idx)
        assert torch.equal(actual.neg_image_idx, expected.neg_image_idx)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])  # bf16: upcast in-kernel when interpreting
@pytest.mark.parametrize("mode", ["clip", "albef"])
def test_half_features_match_the_spec(dtype, mode):
    start, stop = SLICES["middle"]
    case = make_batch(mode)
    rounded = {
        k: (v.to(dtype).double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()
    }
    expected_args = local_args(rounded, start, stop, torch.float64)
    expected, expected_grads = losses_and_grads(expected_args, lambda a: itc_loss_local_ref(**a))
    actual, actual_grads = losses_and_grads(local_args(case, start, stop, dtype),
                                            lambda a: itc_loss_local(**a, backend="triton"))  # fmt: skip
    assert_close(actual.loss, expected.loss, TOLERANCE[dtype], "loss")
    names = [name for name in DIFFERENTIABLE if expected_args[name].requires_grad]
    for name, a, e in zip(names, actual_grads, expected_grads, strict=True):
        assert a.dtype == (torch.float32 if name == "scale" else dtype), f"d {name}: {a.dtype}"
        assert_close(a, e, TOLERANCE[dtype], f"d {name}")


def sampled(case, start, stop, seed, backend):
    args = {
        k: (v.detach() if torch.is_tensor(v) else v) for k, v in local_args(case, start, stop, torch.float64).items()
    }
    out = itc_loss_local(**args, hard_negatives="sample", seed=seed, backend=backend)
    return out.neg_text_idx, out.neg_image_idx


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sampled_negatives_do_not_depend_on_the_slicing(backend):
    """A row's draw is keyed by (seed, global row, direction): slices reproduce the whole batch's picks."""
    case = make_batch("albef")
    whole = sampled(case, 0, BATCH, 1234, backend)
    parts = [sampled(case, start, stop, 1234, backend) for start, stop in ((0, 20), (20, 21), (21, BATCH))]
    positives = positive_mask(case["positive_ids"], None, BATCH, 0, "cpu")
    for direction in range(2):
        assert torch.equal(torch.cat([p[direction] for p in parts]), whole[direction])
        keep = whole[direction] >= 0
        assert not positives[torch.arange(BATCH)[keep], whole[direction][keep]].any()
    assert not torch.equal(torch.cat(sampled(case, 0, BATCH, 1235, backend)), torch.cat(whole))


def test_triton_samples_equal_the_full_op_with_the_same_seed():
    """itc_loss draws its seed from the generator; itc_loss_local given that seed picks the same negatives."""
    case = make_batch("clip")
    full = itc_loss(case["image"], case["text"], case["scale"], hard_negatives="sample",
                    generator=torch.Generator().manual_seed(9), backend="triton")  # fmt: skip
    seed = int(torch.randint(2**62, (), generator=torch.Generator().manual_seed(9)))
    parts = [sampled(case, start, stop, seed, "triton") for start, stop in ((0, 22), (22, BATCH))]
    assert torch.equal(torch.cat([p[0] for p in parts]), full.neg_text_idx)
    assert torch.equal(torch.cat([p[1] for p in parts]), full.neg_image_idx)


def test_momentum_columns_without_alpha_get_no_gradient():
    """alpha = 0 with momentum columns (constants): the op differentiates only rows and scale."""
    case = make_batch("albef")
    args = local_args(case, 5, 17, torch.float64)
    args["alpha"] = 0.0
    out, grads = losses_and_grads(args, lambda a: itc_loss_local(**a, backend="triton"))
    expected, expected_grads = losses_and_grads(args, lambda a: itc_loss_local_ref(**a))
    assert_close(out.loss, expected.loss, 1e-10, "loss")
    for name, a, e in zip(("d image_rows", "d text_rows", "d scale"), grads, expected_grads, strict=True):
        assert_close(a, e, 1e-10, name)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(row_offset=40), "row_offset"),
        (dict(row_offset=-1), "row_offset"),
        (dict(text_rows=torch.zeros(3, DIM, dtype=torch.float64)), "text_rows"),
        (dict(image_columns=torch.zeros(BATCH, DIM + 1, dtype=torch.float64)), "image_columns"),
        (dict(positive_ids=torch.zeros(12, dtype=torch.int64)), "positive_ids"),
        (dict(alpha=0.5), "image_rows_m"),
        (dict(seed=-3), "seed"),
    ],
)
def test_bad_arguments_name_the_argument(change, message):
    args = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in local_args(make_batch("clip"), 10, 22,
                                                                                  torch.float64).items()}  # fmt: skip
    args.update(change)
    with pytest.raises(ValueError, match=message):
        itc_loss_local(**args, backend="reference")


def test_distillation_rejects_differentiable_columns():
    case = make_batch("albef")
    args = local_args(case, 0, 10, torch.float64)
    args["image_columns"] = args["image_columns"].clone().requires_grad_()
    with pytest.raises(ValueError, match="detached"):
        itc_loss_local(**args, backend="reference")


def test_compiles_without_graph_breaks():
    """Fake implementations and the registered autograd: torch.compile traces the op whole, gradients included."""
    case = make_batch("clip", batch=9)

    def loss_fn(image_rows, text_rows, image_columns, text_columns, scale):
        out = itc_loss_local(image_rows, text_rows, image_columns, text_columns, scale, row_offset=3,
                             hard_negatives="hardest", backend="reference")  # fmt: skip
        return out.loss, out.neg_text_idx

    def inputs():
        image, text = case["image"].clone().requires_grad_(), case["text"].clone().requires_grad_()
        return image[3:7], text[3:7], image, text, torch.tensor(11.0, dtype=torch.float64, requires_grad=True)

    compiled_args, eager_args = inputs(), inputs()
    loss, picks = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*compiled_args)
    expected_loss, expected_picks = loss_fn(*eager_args)
    assert_close(loss, expected_loss, 1e-12, "loss")
    assert torch.equal(picks, expected_picks)
    wrt = [compiled_args[2], compiled_args[3], compiled_args[4]]
    expected_wrt = [eager_args[2], eager_args[3], eager_args[4]]
    for name, a, e in zip(("d image", "d text", "d scale"), torch.autograd.grad(loss, wrt),
                          torch.autograd.grad(expected_loss, expected_wrt), strict=True):  # fmt: skip
        assert_close(a, e, 1e-12, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["clip", "albef"])
def test_gpu_second_half_of_the_batch_matches_the_spec(dtype, mode):
    """Rank 1 of 2 at a real size: b = 300 rows from offset 300 against B = 600 columns (ALBEF: + 1000 queue)."""
    batch, dim, queue = 600, 256, 1000
    gen = torch.Generator().manual_seed(0)

    def unit(rows):
        return F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1).cuda()

    case = dict(image=unit(batch), text=unit(batch), scale=100.0 if mode == "clip" else 1 / 0.07)
    if mode == "albef":
        case.update(image_m=unit(batch), text_m=unit(batch), image_queue=unit(queue), text_queue=unit(queue),
                    positive_ids=torch.randint(0, 200, (batch,), generator=gen).cuda(),
                    queue_ids=torch.randint(0, 200, (queue,), generator=gen).cuda(), alpha=0.4)  # fmt: skip
    rounded = {
        k: (v.to(dtype).double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()
    }
    expected_args = local_args(rounded, 300, batch, torch.float64)
    expected, expected_grads = losses_and_grads(expected_args, lambda a: itc_loss_local_ref(**a))
    actual, actual_grads = losses_and_grads(local_args(case, 300, batch, dtype),
                                            lambda a: itc_loss_local(**a, backend="triton"))  # fmt: skip
    tol = TOLERANCE[dtype] if dtype != torch.float32 else 1e-4
    assert_close(actual.loss_i2t, expected.loss_i2t, tol, "loss_i2t")
    assert_close(actual.loss_t2i, expected.loss_t2i, tol, "loss_t2i")
    names = [name for name in DIFFERENTIABLE if expected_args[name].requires_grad]
    for name, a, e in zip(names, actual_grads, expected_grads, strict=True):
        assert_close(a, e, tol, f"d {name}")
