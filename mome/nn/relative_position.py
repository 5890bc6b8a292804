"""Learned relative position biases for self-attention, as ``attn_bias`` for :func:`mome.ops.attention`.

- :class:`RelativePositionBias`: BEiT's 2-D table over a ``Wh x Ww`` patch grid plus its [CLS] token, and
  VLMo's variant that adds text (1-D distances with their own [CLS] entries) and one entry each for
  text -> image and image -> text. One table can serve several layers (``layers``: VLMo keeps all layers'
  heads side by side in one table; BEiT's shared bias is ``layers=1`` used by every layer).
- :class:`BucketedRelativePositionBias`: T5's log-bucketed 1-D bias over the token sequence, as torchscale's
  encoder uses it (``rel_pos_buckets`` / ``max_rel_pos``).

Both return ``(1, H, N, N)`` biases; the index of each layout is built once and cached, and the gather from
the learnable table is differentiable.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _grid(grid) -> tuple[int, int]:
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise ValueError(f"grid must be an int or a (Wh, Ww) pair of ints, got {grid!r}")
    return _positive_int("grid[0]", grid[0]), _positive_int("grid[1]", grid[1])


def image_table_size(grid: tuple[int, int]) -> int:
    """Rows of BEiT's table: every 2-D offset between two patches, then cls->token, token->cls, cls->cls."""
    height, width = grid
    return (2 * height - 1) * (2 * width - 1) + 3


def beit_relative_position_index(grid: tuple[int, int]) -> Tensor:
    """BEiT's ``(1 + Wh·Ww, 1 + Wh·Ww)`` int64 index: token 0 is the [CLS], then the patches row by row.

    Patch query ``i`` and key ``j`` at rows/columns ``(y, x)`` read row ``(y_i - y_j + Wh - 1)·(2Ww - 1) +
    (x_i - x_j + Ww - 1)``; the [CLS] query reads ``R - 3``, a [CLS] key ``R - 2`` and [CLS] -> [CLS]
    ``R - 1``, with ``R`` = :func:`image_table_size`.
    """
    height, width = _grid(grid)
    size = image_table_size((height, width))
    rows = torch.arange(height).repeat_interleave(width)  # [P] patch row
    cols = torch.arange(width).repeat(height)  # [P] patch column
    dy = rows[:, None] - rows[None, :] + (height - 1)
    dx = cols[:, None] - cols[None, :] + (width - 1)
    patches = height * width
    index = torch.empty(patches + 1, patches + 1, dtype=torch.int64)
    index[1:, 1:] = dy * (2 * width - 1) + dx
    index[0, 1:] = size - 3
    index[1:, 0] = size - 2
    index[0, 0] = size - 1
    return index


def vlmo_relative_position_index(grid: tuple[int, int], text_table_len: int, text_len: int, image: bool) -> Tensor:
    """VLMo's index for ``text_len`` text tokens (first, the [CLS] at 0) then, with ``image``, the image.

    Rows of VLMo's table: BEiT's ``R`` image rows, then ``R`` = text -> image, ``R + 1`` = image -> text, then
    ``2·text_table_len`` text rows (``text_table_len`` is VLMo's ``max_text_len_of_initckpt``): text query
    ``i`` and key ``j`` (both past the [CLS]) read ``R + text_table_len + (j - i)``, and the last three rows
    are the text cls->token, token->cls and cls->cls entries. Valid for ``text_len <= text_table_len``.
    """
    grid = _grid(grid)
    size = image_table_size(grid)
    total = size + 2 + 2 * text_table_len
    if not 0 <= text_len <= text_table_len:
        raise ValueError(f"text_len must lie in [0, text_table_len={text_table_len}], got {text_len}")
    positions = torch.arange(text_len)
    text = (positions[None, :] - positions[:, None]) + (size + text_table_len)  # [L, L], key minus query
    if text_len > 0:
        text[0, 1:] = total - 3
        text[1:, 0] = total - 2
        text[0, 0] = total - 1
    if not image:
        return text
    image_index = beit_relative_position_index(grid)
    n_image = image_index.shape[0]
    top = torch.cat([text, torch.full((text_len, n_image), size, dtype=torch.int64)], dim=1)
    bottom = torch.cat([torch.full((n_image, text_len), size + 1, dtype=torch.int64), image_index], dim=1)
    return torch.cat([top, bottom], dim=0)


class RelativePositionBias(nn.Module):
    """BEiT's (``text_table_len=None``) or VLMo's learned relative position bias.

    ``relative_position_bias_table`` ``(rows, heads · layers)``, zero at init as in BEiT / VLMo; layer ``l``
    reads columns ``[l·heads, (l + 1)·heads)`` (VLMo's layout of its one table for all layers).
    ``forward(text_len=0, image_len=0, layer=0)`` returns the ``(1, heads, N, N)`` bias of a layout: image
    only (``image_len = 1 + Wh·Ww``), text only, or text then image (VLMo's order, ``N = text_len +
    image_len``). :meth:`per_layer` gives every layer's bias from one gather.
    """

    def __init__(self, heads: int, grid, text_table_len: int | None = None, layers: int = 1):
        super().__init__()
        self.heads, self.layers = _positive_int("heads", heads), _positive_int("layers", layers)
        self.grid = _grid(grid)
        if text_table_len is not None:
            _positive_int("text_table_len", text_table_len)
        self.text_table_len = text_table_len
        rows = image_table_size(self.grid)
        if text_table_len is not None:
            rows += 2 + 2 * text_table_len
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, heads * layers))
        self._index_cache: dict[tuple[int, bool, torch.device], Tensor] = {}

    @property
    def image_len(self) -> int:
        """Image tokens the grid describes: the [CLS] and ``Wh·Ww`` patches."""
        return 1 + self.grid[0] * self.grid[1]

    def _check_layout(self, text_len: int, image_len: int) -> None:
        for name, value in (("text_len", text_len), ("image_len", image_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if image_len not in (0, self.image_len):
            height, width = self.grid
            raise ValueError(
                f"image_len={image_len} does not match the bias's {height}x{width} patch grid: expected "
                f"0 or 1 + {height}·{width} = {self.image_len} tokens ([CLS] + patches)"
            )
        if text_len > 0 and self.text_table_len is None:
            raise ValueError(f"text_len={text_len}, but this bias has no text table (BEiT's image-only bias)")
        if self.text_table_len is not None and text_len > self.text_table_len:
            raise ValueError(
                f"text_len={text_len} is longer than the bias's text table, which covers texts of at most "
                f"text_table_len={self.text_table_len} tokens"
            )
        if text_len == 0 and image_len == 0:
            raise ValueError("the layout has no tokens: pass text_len > 0, image_len > 0 or both")

    def index(self, text_len: int = 0, image_len: int = 0) -> Tensor:
        """The cached ``(N, N)`` int64 table rows of a layout, on the table's device."""
        self._check_layout(text_len, image_len)
        device = self.relative_position_bias_table.device
        key = (text_len, image_len > 0, device)
        cached = self._index_cache.get(key)
        if cached is None:
            if self.text_table_len is None:
                cached = beit_relative_position_index(self.grid)
            else:
                cached = vlmo_relative_position_index(self.grid, self.text_table_len, text_len, image_len > 0)
            cached = self._index_cache[key] = cached.to(device)
        return cached

    def _gather(self, text_len: int, image_len: int, columns: slice) -> Tensor:
        index = self.index(text_len, image_len)  # [N, N]
        values = self.relative_position_bias_table[:, columns][index]  # [N, N, C]
        return values.permute(2, 0, 1).contiguous()  # [C, N, N]

    def forward(self, text_len: int = 0, image_len: int = 0, layer: int = 0) -> Tensor:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.layers:
            raise ValueError(f"layer must be an int in [0, layers={self.layers}), got {layer!r}")
        columns = slice(layer * self.heads, (layer + 1) * self.heads)
        return self._gather(text_len, image_len, columns).unsqueeze(0)  # [1, H, N, N]

    def per_layer(self, text_len: int = 0, image_len: int = 0) -> tuple[Tensor, ...]:
        """Every layer's ``(1, heads, N, N)`` bias, from one gather of the whole table."""
        values = self._gather(text_len, image_len, slice(None))  # [layers·H, N, N]
        return tuple(chunk.unsqueeze(0) for chunk in values.split(self.heads, dim=0))

    def _apply(self, fn, recurse=True):
        self._index_cache.clear()  # the cached indices follow the table's device on the next call
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, grid={self.grid}, text_table_len={self.text_table_len}, layers={self.layers}"


def relative_position_bucket(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bidirectional bucket of ``key - query`` distances (torchscale's ``_relative_position_bucket``).

    Half the buckets are for keys before the query, half for keys after; in each half, distances below a
    quarter of the buckets get their own bucket, longer ones share log-spaced buckets up to ``max_distance``
    (and the last bucket beyond). The log is taken in float32, as upstream does, so the buckets agree
    exactly.
    """
    half = num_buckets // 2
    exact = half // 2
    offset = (relative_position > 0).to(torch.int64) * half  # keys after the query use the upper half
    distance = relative_position.abs()
    scaled = torch.log(distance.float() / exact) / math.log(max_distance / exact) * (half - exact)
    far = (exact + scaled.to(torch.int64)).clamp_max(half - 1)
    return offset + torch.where(distance < exact, distance, far)


class BucketedRelativePositionBias(nn.Module):
    """T5 / torchscale's bucketed 1-D relative position bias over the token sequence, one for all layers.

    ``relative_attention_bias`` ``(num_buckets, heads)`` (an ``nn.Embedding``, torchscale's key);
    ``forward(length)`` returns the ``(1, heads, N, N)`` bias of an ``N``-token sequence.
    """

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.heads = _positive_int("heads", heads)
        if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 4:
            raise ValueError(
                f"num_buckets must be an int >= 4 (two halves of exact and log buckets), got {num_buckets!r}"
            )
        if isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance <= num_buckets // 4:
            raise ValueError(
                f"max_distance must be an int above num_buckets // 4 = {num_buckets // 4} (the exact buckets), "
                f"got {max_distance!r}"
            )
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)
        self._index_cache: dict[tuple[int, torch.device], Tensor] = {}

    def index(self, length: int) -> Tensor:
        """The cached ``(N, N)`` bucket of every query / key pair, on the table's device."""
        _positive_int("length", length)
        device = self.relative_attention_bias.weight.device
        cached = self._index_cache.get((length, device))
        if cached is None:
            positions = torch.arange(length)
            buckets = relative_position_bucket(
                positions[None, :] - positions[:, None], self.num_buckets, self.max_distance
            )
            cached = self._index_cache[(length, device)] = buckets.to(device)
        return cached

    def forward(self, length: int) -> Tensor:
        values = self.relative_attention_bias.weight[self.index(length)]  # [N, N, H]
        return values.permute(2, 0, 1).contiguous().unsqueeze(0)  # [1, H, N, N]

    def _apply(self, fn, recurse=True):
        self._index_cache.clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, num_buckets={self.num_buckets}, max_distance={self.max_distance}"
