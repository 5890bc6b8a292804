"""mome.nn.relative_position: BEiT's and VLMo's index tables, the gather, caching, T5 buckets, errors."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from mome.nn import BucketedRelativePositionBias, RelativePositionBias
from mome.nn.relative_position import (
    beit_relative_position_index,
    image_table_size,
    relative_position_bucket,
    vlmo_relative_position_index,
)
from tests import torchvision_standin

GRIDS = [(1, 1), (2, 3), (3, 2), (4, 4), (5, 3)]


def _loop_beit_index(height: int, width: int) -> torch.Tensor:
    """BEiT's index written element by element: offsets (dy, dx) query minus key, [CLS] entries last."""
    rows = (2 * height - 1) * (2 * width - 1) + 3
    tokens = 1 + height * width
    index = torch.zeros(tokens, tokens, dtype=torch.int64)
    for i in range(tokens):
        for j in range(tokens):
            if i == 0 and j == 0:
                index[i, j] = rows - 1
            elif i == 0:
                index[i, j] = rows - 3
            elif j == 0:
                index[i, j] = rows - 2
            else:
                yi, xi = divmod(i - 1, width)
                yj, xj = divmod(j - 1, width)
                index[i, j] = (yi - yj + height - 1) * (2 * width - 1) + (xi - xj + width - 1)
    return index


def _loop_vlmo_index(height: int, width: int, table_len: int, text_len: int, image: bool) -> torch.Tensor:
    """VLMo's pair index element by element: [text (CLS first), image (CLS first)]."""
    image_rows = (2 * height - 1) * (2 * width - 1) + 3
    all_rows = image_rows + 2 * table_len + 2
    image_index = _loop_beit_index(height, width)
    n_image = image_index.shape[0] if image else 0
    index = torch.zeros(text_len + n_image, text_len + n_image, dtype=torch.int64)
    for i in range(text_len + n_image):
        for j in range(text_len + n_image):
            text_query, text_key = i < text_len, j < text_len
            if text_query and not text_key:
                index[i, j] = image_rows  # text -> image
            elif text_key and not text_query:
                index[i, j] = image_rows + 1  # image -> text
            elif not text_query:
                index[i, j] = image_index[i - text_len, j - text_len]
            elif i == 0 and j == 0:
                index[i, j] = all_rows - 1
            elif i == 0:
                index[i, j] = all_rows - 3
            elif j == 0:
                index[i, j] = all_rows - 2
            else:  # VLMo: key position minus query position, shifted past the image rows and the two cross entries
                index[i, j] = (j - 1) - (i - 1) - (2 - table_len) + image_rows + 2
    return index


@pytest.mark.parametrize("grid", GRIDS)
def test_beit_index_equals_loops_and_timm(grid):
    index = beit_relative_position_index(grid)
    assert index.dtype == torch.int64 and index.shape == (1 + grid[0] * grid[1],) * 2
    assert torch.equal(index, _loop_beit_index(*grid))
    assert int(index.max()) == image_table_size(grid) - 1 and int(index.min()) == 0
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed: compared with the loop construction only")
    torchvision_standin.install_if_missing()
    from timm.models.beit import gen_relative_position_index

    assert torch.equal(index, gen_relative_position_index(grid))


@pytest.mark.parametrize("grid,table_len", [((2, 3), 5), ((3, 3), 7), ((1, 1), 2)])
def test_vlmo_index_equals_loops(grid, table_len):
    rows = image_table_size(grid) + 2 + 2 * table_len
    for text_len in sorted({1, 2, table_len - 1, table_len} - {0}):
        for image in (False, True):
            index = vlmo_relative_position_index(grid, table_len, text_len, image)
            assert torch.equal(index, _loop_vlmo_index(*grid, table_len, text_len, image)), (text_len, image)
            assert 0 <= int(index.min()) and int(index.max()) < rows
    image_only = vlmo_relative_position_index(grid, table_len, 0, True)
    assert torch.equal(image_only, beit_relative_position_index(grid))


def test_vlmo_index_regions_use_disjoint_rows():
    """At the longest text, each kind of pair (image, text, cross, the [CLS] entries) owns its rows."""
    grid, table_len = (3, 2), 6
    index = vlmo_relative_position_index(grid, table_len, table_len, True)
    n_text = table_len
    text = index[:n_text, :n_text]
    regions = {
        "image": index[n_text:, n_text:].unique(),
        "text->image": index[:n_text, n_text:].unique(),
        "image->text": index[n_text:, :n_text].unique(),
        "text offsets": text[1:, 1:].unique(),
        "text cls": torch.stack([text[0, 1], text[1, 0], text[0, 0]]),
    }
    seen: dict[int, str] = {}
    for name, rows in regions.items():
        for row in rows.tolist():
            assert row not in seen, f"row {row} used by {name} and {seen[row]}"
            seen[row] = name
    assert regions["text offsets"].numel() == 2 * table_len - 3  # offsets -(L-2) .. L-2


@pytest.mark.parametrize("text_len,image_len", [(0, 7), (4, 0), (4, 7), (1, 7), (6, 7)])
def test_forward_gathers_each_layers_columns(text_len, image_len):
    heads, layers = 3, 2
    bias = RelativePositionBias(heads, (2, 3), text_table_len=6, layers=layers).double()
    with torch.no_grad():
        bias.relative_position_bias_table.normal_()
    table = bias.relative_position_bias_table
    index = _loop_vlmo_index(2, 3, 6, text_len, image_len > 0)
    per_layer = bias.per_layer(text_len, image_len)
    assert len(per_layer) == layers
    for layer in range(layers):
        expected = torch.stack([table[index, layer * heads + h] for h in range(heads)]).unsqueeze(0)
        got = bias(text_len, image_len, layer=layer)
        assert got.shape == (1, heads, text_len + image_len, text_len + image_len) and got.is_contiguous()
        assert torch.equal(got, expected) and torch.equal(per_layer[layer], expected)


def test_gradient_reaches_the_table():
    heads = 2
    bias = RelativePositionBias(heads, (2, 2), layers=3).double()  # BEiT's table, three layers' heads
    grad = torch.randn(1, heads, 5, 5, dtype=torch.float64)
    bias(0, 5, layer=1).backward(grad)
    index = _loop_beit_index(2, 2).flatten()
    expected = torch.zeros_like(bias.relative_position_bias_table)
    for h in range(heads):
        expected[:, heads + h] = torch.bincount(index, weights=grad[0, h].flatten(), minlength=expected.shape[0])
    torch.testing.assert_close(bias.relative_position_bias_table.grad, expected, rtol=0, atol=1e-12)


def test_index_is_cached_and_follows_dtype_moves():
    bias = RelativePositionBias(2, 3, text_table_len=4)
    first = bias.index(3, 10)
    assert bias.index(3, 10) is first
    assert bias.index(3, 0) is not first and bias.index(3, 0).shape == (3, 3)
    bias = bias.to(torch.float64)
    assert bias.index(3, 10) is not first and torch.equal(bias.index(3, 10), first)
    assert bias(3, 10).dtype == torch.float64


def test_bad_layouts_and_arguments_name_the_problem():
    vlmo = RelativePositionBias(2, (2, 3), text_table_len=4, layers=2)
    beit = RelativePositionBias(2, (2, 3))
    with pytest.raises(ValueError, match=r"text_len=5 is longer than the bias's text table.*text_table_len=4"):
        vlmo(5, 7)
    with pytest.raises(ValueError, match=r"image_len=10 does not match the bias's 2x3 patch grid.*7 tokens"):
        vlmo(2, 10)
    with pytest.raises(ValueError, match="no text table"):
        beit(2, 7)
    with pytest.raises(ValueError, match="no tokens"):
        vlmo(0, 0)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, layers=2\)"):
        vlmo(2, 7, layer=2)
    with pytest.raises(ValueError, match="text_len must be a non-negative int"):
        vlmo(-1, 7)
    with pytest.raises(ValueError, match="grid must be an int or a"):
        RelativePositionBias(2, (2, 3, 4))
    with pytest.raises(ValueError, match="heads must be a positive int"):
        RelativePositionBias(0, 3)
    with pytest.raises(ValueError, match="text_table_len must be a positive int"):
        RelativePositionBias(2, 3, text_table_len=0)
    with pytest.raises(ValueError, match="num_buckets must be an int >= 4"):
        BucketedRelativePositionBias(2, num_buckets=2)
    with pytest.raises(ValueError, match="max_distance must be an int above"):
        BucketedRelativePositionBias(2, num_buckets=32, max_distance=8)
    with pytest.raises(ValueError, match="length must be a positive int"):
        BucketedRelativePositionBias(2)(0)


def _loop_bucket(relative: int, num_buckets: int, max_distance: int) -> int:
    """T5's bidirectional bucket for one ``key - query`` distance, in float64 scalar arithmetic."""
    half = num_buckets // 2
    bucket = half if relative > 0 else 0
    distance, exact = abs(relative), half // 2
    if distance < exact:
        return bucket + distance
    far = exact + int(math.log(distance / exact) / math.log(max_distance / exact) * (half - exact))
    return bucket + min(far, half - 1)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (5, 9), (4, 3)])
def test_buckets_match_scalar_loop_and_torchscale(num_buckets, max_distance):
    relative = torch.arange(-300, 301)
    got = relative_position_bucket(relative, num_buckets, max_distance)
    assert int(got.min()) >= 0 and int(got.max()) < num_buckets
    scalar = torch.tensor([_loop_bucket(r, num_buckets, max_distance) for r in relative.tolist()])
    # float32 vs float64 logs may part only where the log lands on an integer; none does at these settings
    assert torch.equal(got, scalar)
    if importlib.util.find_spec("torchscale") is None:
        pytest.skip("torchscale is not installed: compared with the scalar loop only")
    from torchscale.component.relative_position_bias import RelativePositionBias as Theirs

    theirs = Theirs._relative_position_bucket(relative, True, num_buckets, max_distance)
    assert torch.equal(got, theirs)


def test_bucketed_bias_matches_torchscale_compute_bias():
    if importlib.util.find_spec("torchscale") is None:
        pytest.skip("torchscale is not installed")
    from torchscale.component.relative_position_bias import RelativePositionBias as Theirs

    theirs = Theirs(num_buckets=12, max_distance=30, n_heads=3)
    ours = BucketedRelativePositionBias(3, num_buckets=12, max_distance=30)
    ours.load_state_dict(theirs.state_dict())
    for length in (1, 5, 41):
        got = ours(length)
        assert got.shape == (1, 3, length, length) and ours.index(length) is ours.index(length)
        assert torch.equal(got, theirs.compute_bias(length, length))
    grad = torch.randn(1, 3, 41, 41)
    ours(41).backward(grad)
    theirs.compute_bias(41, 41).backward(grad)
    torch.testing.assert_close(ours.relative_attention_bias.weight.grad, theirs.relative_attention_bias.weight.grad)
