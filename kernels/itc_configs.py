"""Launch configurations of the ITC kernels, per architecture and dtype class.

Fixed tables, so what runs on a GPU is what the gate compiles (``python -m mome.kernels.aot --check``); the
gate's figures behind each choice are in ``benchmarks/NOTES-itc.md``. ``block_m`` is the stationary side of each
kernel (rows for the forward and the row backward, columns for the column backward), ``block_n`` the streamed one;
``BLOCK_D`` (the similarity's feature step) is ``min(64, padded d)`` and ``BLOCK_DOUT`` (the backward's feature
slice) ``min(FEATURE_SLICE, padded d)``.

- sm_90, 16-bit: 64-row stationary tiles, the wgmma M side of one warpgroup.
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


FEATURE_SLICE = 128 if interpreting() else 256

SM90 = {
    "fwd": ItcConfig(64, 64, 4, 3),
    # distillation holds a second similarity tile (the momentum rows'): at 64 streamed columns it spilled 159
    # instructions at 255 registers; 32 compile clean (221 registers, 2 CTAs per SM)
    "fwd_distill": ItcConfig(64, 32, 4, 3),
    "bwd_rows": ItcConfig(64, 64, 8, 2),
    "bwd_cols": ItcConfig(64, 64, 8, 2),
}
SM80 = {
    "fwd": ItcConfig(64, 32, 8, 3),
    "fwd_distill": ItcConfig(64, 32, 8, 3),
    "bwd_rows": ItcConfig(32, 32, 8, 2),
    "bwd_cols": ItcConfig(32, 32, 8, 2),
}
INTERPRETER = ItcConfig(32, 32, 8, 1)


def itc_config(kernel: str, arch: int, sixteen_bit: bool) -> ItcConfig:
    """The configuration of ``kernel`` ("fwd", "fwd_distill", "bwd_rows", "bwd_cols") for one launch."""
    if interpreting():
        return INTERPRETER
    return (SM90 if arch == 90 and sixteen_bit else SM80)[kernel]


def feature_blocks(dim: int, padded: int) -> tuple[int, int]:
    """``(BLOCK_D, BLOCK_DOUT)`` for features of width ``dim`` (``padded``: its power-of-two tile width)."""
    if interpreting():
        return 32, FEATURE_SLICE
    return min(64, padded), min(FEATURE_SLICE, padded)
