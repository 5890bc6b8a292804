"""Launch configurations of the attention kernels, per architecture, dtype class and padded head dim.

Fixed tables rather than autotuning, so what runs on a GPU is what the ahead-of-time gate compiles
(``python -m mome.kernels.aot --check``). Each entry is ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``; the
reasons for each choice, and the gate's figures behind them, are in ``benchmarks/NOTES-attention.md``.

- sm_90, 16-bit: 128-row tiles with 8 warps (64 rows per warpgroup, the wgmma shape) for the forward and dQ,
  and 128 key rows for dK/dV (the key tile is the M side of its transposed products). When such tiles would
  leave SMs idle (short sequences at a small batch), the launcher takes the 64-row variant with 4 warps: one
  warpgroup, still no duplicated products.
- sm_80 and everything else (the interpreter too): the tables the sm_80 compile found spill-free.
- fp32 runs three TF32 products per ``tl.dot`` (``tf32x3``, fp32's accuracy on the tensor cores): three times
  the registers of a 16-bit product, so smaller tiles.

A spill budget (bytes of local memory the gate allows in SASS) sits beside each sm_90 16-bit entry that needs
one, with its reason; every other entry's budget is 0.
"""

from __future__ import annotations

from typing import NamedTuple


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    spill_budget: int = 0  # bytes of SASS local memory the gate accepts (sm_90, 16-bit)


# dK/dV at D = 128: the causal and prefix-LM variants hold 8 local-memory instructions at 255 registers (the
# stationary K, V, dK, dV tiles are 4 x 128 x 128 values); BLOCK_M = 16 removes them but halves the work done per
# loaded Q/dO tile, which costs more than 8 spills.
DKDV_128_SPILLS = 8

# The safe recompute of the forward and dQ runs only for tiles whose fast output is not finite (a NaN or Inf in the
# inputs): its spills cost nothing in a normal step, so any number is accepted.
SAFE_PASS_SPILLS = 1 << 20

# (kernel, 16-bit?, padded head dim) -> config; "_small" is the variant for grids that would not fill the GPU.
SM90 = {
    ("fwd", True, 16): TileConfig(128, 64, 8, 3),
    ("fwd", True, 32): TileConfig(128, 64, 8, 3),
    ("fwd", True, 64): TileConfig(128, 64, 8, 3),
    ("fwd", True, 128): TileConfig(128, 64, 8, 3),
    ("fwd_small", True, 16): TileConfig(64, 64, 4, 3),
    ("fwd_small", True, 32): TileConfig(64, 64, 4, 3),
    ("fwd_small", True, 64): TileConfig(64, 64, 4, 3),
    ("fwd_small", True, 128): TileConfig(64, 64, 4, 3),
    ("dkdv", True, 16): TileConfig(64, 128, 8, 2),
    ("dkdv", True, 32): TileConfig(64, 128, 8, 2),
    ("dkdv", True, 64): TileConfig(64, 128, 8, 2),
    ("dkdv", True, 128): TileConfig(32, 128, 8, 2, spill_budget=DKDV_128_SPILLS),  # see DKDV_128_SPILLS
    ("dkdv_small", True, 16): TileConfig(64, 64, 4, 2),
    ("dkdv_small", True, 32): TileConfig(64, 64, 4, 2),
    ("dkdv_small", True, 64): TileConfig(64, 64, 4, 2),
    ("dkdv_small", True, 128): TileConfig(32, 64, 4, 2, spill_budget=DKDV_128_SPILLS),  # see DKDV_128_SPILLS
    ("dq", True, 16): TileConfig(128, 64, 8, 2),
    ("dq", True, 32): TileConfig(128, 64, 8, 2),
    ("dq", True, 64): TileConfig(128, 64, 8, 2),
    ("dq", True, 128): TileConfig(128, 64, 8, 2),
    ("dq_small", True, 16): TileConfig(64, 64, 4, 2),
    ("dq_small", True, 32): TileConfig(64, 64, 4, 2),
    ("dq_small", True, 64): TileConfig(64, 64, 4, 2),
    ("dq_small", True, 128): TileConfig(64, 64, 4, 2),
    ("dbias", True, 16): TileConfig(128, 64, 8, 2),
    ("dbias", True, 32): TileConfig(128, 64, 8, 2),
    ("dbias", True, 64): TileConfig(128, 64, 8, 2),
    ("dbias", True, 128): TileConfig(128, 64, 8, 2),
    ("dbias_small", True, 16): TileConfig(64, 64, 4, 2),
    ("dbias_small", True, 32): TileConfig(64, 64, 4, 2),
    ("dbias_small", True, 64): TileConfig(64, 64, 4, 2),
    ("dbias_small", True, 128): TileConfig(64, 64, 4, 2),
}

SM80 = {
    ("fwd", True, 16): TileConfig(128, 64, 8, 3),
    ("fwd", True, 32): TileConfig(128, 64, 8, 3),
    ("fwd", True, 64): TileConfig(128, 64, 8, 3),
    ("fwd", True, 128): TileConfig(64, 64, 4, 3),
    ("dkdv", True, 16): TileConfig(64, 64, 8, 2),
    ("dkdv", True, 32): TileConfig(64, 64, 8, 2),
    ("dkdv", True, 64): TileConfig(64, 64, 8, 2),
    ("dkdv", True, 128): TileConfig(32, 64, 8, 2),
    ("dq", True, 16): TileConfig(64, 32, 4, 2),
    ("dq", True, 32): TileConfig(64, 32, 4, 2),
    ("dq", True, 64): TileConfig(64, 32, 4, 2),
    ("dq", True, 128): TileConfig(64, 64, 8, 2),
    ("dbias", True, 16): TileConfig(64, 64, 4, 2),
    ("dbias", True, 32): TileConfig(64, 64, 4, 2),
    ("dbias", True, 64): TileConfig(64, 64, 4, 2),
    ("dbias", True, 128): TileConfig(64, 64, 4, 2),
}

FP32 = {
    ("fwd", 16): TileConfig(64, 32, 8, 2),
    ("fwd", 32): TileConfig(64, 32, 8, 2),
    ("fwd", 64): TileConfig(64, 32, 8, 2),
    ("fwd", 128): TileConfig(32, 32, 8, 2),
    ("dkdv", 16): TileConfig(32, 32, 4, 2),
    ("dkdv", 32): TileConfig(32, 32, 4, 2),
    ("dkdv", 64): TileConfig(32, 32, 4, 2),
    ("dkdv", 128): TileConfig(32, 32, 8, 1),
    ("dq", 16): TileConfig(32, 32, 4, 2),
    ("dq", 32): TileConfig(32, 32, 4, 2),
    ("dq", 64): TileConfig(32, 32, 4, 2),
    ("dq", 128): TileConfig(32, 32, 8, 1),
    ("dbias", 16): TileConfig(32, 32, 4, 2),
    ("dbias", 32): TileConfig(32, 32, 4, 2),
    ("dbias", 64): TileConfig(32, 32, 4, 2),
    ("dbias", 128): TileConfig(32, 32, 4, 2),
}

# dK/dV at D = 128 with dropout and a bias: the Philox words, the keep mask and the bias tile on top of the four
# stationary 128 x 128 tiles leave 24-34 local-memory instructions at every tile the gate tried (16 or 32 query rows,
# 4 or 8 warps, 1 or 2 stages; figures in NOTES-attention.md, v4); 16 x 128 with 2 stages keeps the pipelining.
DKDV_128_DROPOUT_SPILLS = 40

# sm_90 16-bit overrides when dropout is on: (variant, head dim class (64 covers 16..64), with a bias) -> config.
# Philox on every (query, key) pair of a tile costs registers; these tiles are the ones the gate found spill-free
# (or within the budget above). Dropout without a bias at D <= 64 keeps the plain tables.
SM90_DROPOUT = {
    ("dkdv", 64, True): TileConfig(32, 128, 8, 2),
    ("dkdv_small", 64, True): TileConfig(32, 64, 4, 2),
    ("dkdv", 128, False): TileConfig(16, 128, 8, 2),
    ("dkdv", 128, True): TileConfig(16, 128, 8, 2, spill_budget=DKDV_128_DROPOUT_SPILLS),
    ("dkdv_small", 128, False): TileConfig(16, 64, 4, 2, spill_budget=DKDV_128_DROPOUT_SPILLS),
    ("dkdv_small", 128, True): TileConfig(16, 64, 4, 2, spill_budget=DKDV_128_DROPOUT_SPILLS),
    ("dq", 128, True): TileConfig(128, 32, 8, 2),
    ("dq_small", 128, True): TileConfig(64, 32, 4, 2),
}

DELTA_BLOCK_M = 64


def tile_config(kernel: str, arch: int, sixteen_bit: bool, block_d: int, stationary_rows: int, programs_per_tile: int,
                multiprocessors: int, *, dropout: bool = False, bias: bool = False) -> TileConfig:  # fmt: skip
    """The configuration of ``kernel`` ("fwd", "dkdv", "dq", "dbias") for one launch.

    ``stationary_rows`` is the sequence length the grid tiles (Nq, or Nk for dK/dV) and ``programs_per_tile``
    the grid's other dimension (batch · heads; for dBias, key tiles · bias planes): on sm_90 a launch whose big-tile
    grid would not give every SM two programs takes the small-tile variant. With ``dropout`` (and ``bias``),
    ``SM90_DROPOUT`` may replace it.
    """
    if not sixteen_bit:
        return FP32[(kernel, block_d)]
    if arch != 90:
        return SM80[(kernel, True, block_d)]
    config = SM90[(kernel, True, block_d)]
    rows = config.block_n if kernel == "dkdv" else config.block_m
    programs = -(-stationary_rows // rows) * programs_per_tile
    variant = f"{kernel}_small" if programs < 2 * multiprocessors else kernel
    if dropout and (variant, max(block_d, 64), bias) in SM90_DROPOUT:
        return SM90_DROPOUT[(variant, max(block_d, 64), bias)]
    return SM90[(variant, True, block_d)]
