"""Launch configurations of the ITC kernels, per architecture and dtype class.

Fixed tables, so what runs on a GPU is what the gate compiles (``python -m mome.kernels.aot --check``); the
gate's figures behind each choice are in ``benchmarks/NOTES-itc.md``. ``block_m`` is the stationary side of each
kernel (rows for the forward and the row backward, columns for the column backward), ``block_n`` the streamed one;
``feature_blocks`` gives the feature tiling and ``column_splits`` the column ranges of launches with few rows.

- sm_90, 16-bit: features up to 256 wide held whole by 128-row stationary tiles; wider ones in 64-row tiles (the
  wgmma M side of one warpgroup) with an inner feature loop.
- sm_80 and everything else (fp32 on sm_90 too, which the gate's rules do not cover): the tiles the sm_80 compile
  found nearly spill-free: a streamed tile of 32 and a 32-row stationary block in the backward.
- the interpreter: small tiles (its cost grows with tile steps).
"""

from __future__ import annotations

from typing import NamedTuple

from mome.kernels._common import interpreting


class ItcConfig(NamedTuple):
    block_m: int  # stationary
    block_n: int  # streamed
    num_warps: int
    num_stages: int
    spill_budget: int = 0  # SASS local-memory instructions the gate accepts (sm_90, 16-bit)
    whole_d: int = 0  # the widest (padded) feature width this configuration holds whole: see ``feature_blocks``


FEATURE_SLICE = 128 if interpreting() else 256

SM90 = {
    "fwd": ItcConfig(64, 64, 4, 3),
    # distillation holds a second similarity tile (the momentum rows'): at 64 streamed columns it spilled 159
    # instructions at 255 registers; 32 compile clean (221 registers, 2 CTAs per SM)
    "fwd_distill": ItcConfig(64, 32, 4, 3),
    "bwd_rows": ItcConfig(64, 64, 8, 2),
    "bwd_cols": ItcConfig(64, 64, 8, 2),
}
# Features up to 256 wide, held whole: 128 stationary rows (a warpgroup's 64 each, so the chained similarity ->
# gradient products are not computed by both warpgroups, as they are at 64 rows under 8 warps) against 32
# streamed columns, double-buffered: the kernels compile without spills but for the one noted below (64 x 64
# spilled in the forward and the backward; see NOTES-itc.md, v4 and v5).
SM90_WHOLE = {
    **dict.fromkeys(("fwd", "fwd_distill", "bwd_cols"), ItcConfig(128, 32, 8, 2, whole_d=256)),
    # ALBEF's row kernel split over column ranges (distillation: two held row tiles) keeps one register in local
    # memory across the column loop: one store before the loop, one load after it, none inside (SASS)
    "bwd_rows": ItcConfig(128, 32, 8, 2, spill_budget=2, whole_d=256),
}
SM80 = {
    "fwd": ItcConfig(64, 32, 8, 3),
    "fwd_distill": ItcConfig(64, 32, 8, 3),
    "bwd_rows": ItcConfig(32, 32, 8, 2),
    "bwd_cols": ItcConfig(32, 32, 8, 2),
}
INTERPRETER = ItcConfig(32, 32, 8, 1, whole_d=64)  # both code paths: whole up to 64 features, sliced beyond


def itc_config(kernel: str, arch: int, sixteen_bit: bool, padded_dim: int) -> ItcConfig:
    """The configuration of ``kernel`` ("fwd", "fwd_distill", "bwd_rows", "bwd_cols") for one launch on features
    of power-of-two tile width ``padded_dim``."""
    if interpreting():
        return INTERPRETER
    if arch == 90 and sixteen_bit:
        whole = SM90_WHOLE[kernel]
        return whole if padded_dim <= whole.whole_d else SM90[kernel]
    return SM80[kernel]


# Column splits: row programs (row blocks x feature slices) fewer than SPLIT_PROGRAMS_PER_SM per multiprocessor
# each stream a range of the columns instead of all of them (ALBEF: 256 rows against a 57 600 queue are 2 row
# blocks), and the launcher combines the ranges' statistics. A range keeps at least MIN_SPLIT_TILES streamed tiles,
# each range reloading the stationary tile.
SPLIT_PROGRAMS_PER_SM = 2
MIN_SPLIT_TILES = 8


def column_splits(programs: int, columns: int, block_n: int, multiprocessors: int) -> int:
    """How many column ranges the ``programs`` row programs of a launch each split their ``columns`` into: a
    count that cuts the tiles into equal ranges with none left empty (the kernels' ``_column_range``)."""
    tiles = _cdiv(columns, block_n)
    splits = max(1, min(_cdiv(SPLIT_PROGRAMS_PER_SM * multiprocessors, programs), tiles // MIN_SPLIT_TILES))
    return _cdiv(tiles, _cdiv(tiles, splits))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def feature_blocks(config: ItcConfig, padded: int) -> tuple[int, int, bool]:
    """``(BLOCK_D, BLOCK_DOUT, WHOLE_D)`` for features of power-of-two tile width ``padded``.

    WHOLE_D (``padded <= config.whole_d``): the stationary tile is loaded once and each streamed tile is loaded
    whole, one product per similarity and one load per tile for both of the backward's products, in the one
    loop of the program (pipelined across tiles). Otherwise the similarity steps through BLOCK_D features in an
    inner loop and the backward's programs each own a BLOCK_DOUT slice of the gradient."""
    if padded <= config.whole_d:
        return padded, padded, True
    if interpreting():
        return 32, FEATURE_SLICE, False
    return min(64, padded), min(FEATURE_SLICE, padded), False
