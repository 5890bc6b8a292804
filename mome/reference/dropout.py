"""Attention dropout's mask: counter-based (Philox4x32-10), so every backend draws the same mask from one seed.

The mask is never stored: a kernel regenerates it from the seed and each element's position, forward and backward.
This module is the specification of that mask, in plain PyTorch (int64 arithmetic on any device).

For the element ``(bh, i, j)`` of an attention call (``bh = batch · heads + head``, query i, key j), Philox4x32 with
10 rounds runs on the counter ``(j // 8, i, bh, 0)`` under the key ``(seed mod 2³², seed // 2³² mod 2³²)`` (what
``triton.language.philox`` takes from a 64-bit seed), and the element reads the 16-bit half ``j % 2`` (0: the low
half) of output word ``(j % 8) // 2``: one Philox call serves eight neighbouring keys, which keeps the integer work
per pair below the tensor cores' (a Philox call costs about 60 integer instructions). The pair is kept when its half
is at least ``threshold(p)``: it is dropped with probability ``threshold(p) / 2¹⁶``, ``p`` rounded to a multiple of
``2⁻¹⁶`` (so a ``p`` below ``2⁻¹⁷`` drops nothing). Kept probabilities are multiplied by ``keep_scale(p)``,
``1 / (1 − rounded p)``, which keeps every expectation exact (0 when ``p = 1``: everything is dropped, and the output
is exactly 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

ROUNDS = 10
KEYS_PER_CALL = 8  # four 32-bit words, two 16-bit halves each
HALF_BITS = 16
_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def threshold(p: float) -> int:
    """The smallest kept 16-bit half for dropout probability ``p`` in ``[0, 1]``."""
    return min(round(p * 2**HALF_BITS), 2**HALF_BITS - 1)


def keep_scale(p: float) -> float:
    """What a kept probability is multiplied by: one over the probability of keeping it."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - threshold(p) / 2**HALF_BITS)


def _mul_hi_lo(constant: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(constant · x) >> 32`` and ``(constant · x) mod 2³²`` for 32-bit words held in int64 (16-bit halves: no
    product overflows)."""
    c_hi, c_lo = constant >> 16, constant & 0xFFFF
    x_hi, x_lo = x >> 16, x & 0xFFFF
    low = ((c_hi * x_lo + c_lo * x_hi) << 16) + c_lo * x_lo  # < 2^50
    return c_hi * x_hi + (low >> 32), low & _MASK32


def philox4x32(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[int, int], rounds: int = ROUNDS):
    """Philox4x32 on broadcastable int64 tensors holding 32-bit words: the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _seed_key(seed: Tensor) -> tuple[int, int]:
    value = int(seed.reshape(-1)[0]) % 2**64  # the kernels read the int64 seed's bits as unsigned
    return value & _MASK32, (value >> 32) & _MASK32


def attention_keep(seed: Tensor, batch: int, heads: int, nq: int, nk: int, p: float) -> Tensor:
    """``(B, H, Nq, Nk)`` bool: True where attention dropout with probability ``p`` keeps the pair."""
    device = seed.device
    groups = -(-nk // KEYS_PER_CALL)
    c0 = torch.arange(groups, dtype=torch.int64, device=device)[None, None, :]
    c1 = torch.arange(nq, dtype=torch.int64, device=device)[None, :, None]
    c2 = torch.arange(batch * heads, dtype=torch.int64, device=device)[:, None, None]
    c3 = torch.zeros((), dtype=torch.int64, device=device)
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    words = torch.stack(philox4x32((c0, c1, c2, c3), _seed_key(seed)), dim=-1)  # [BH, Nq, groups, 4]
    halves = torch.stack([words & 0xFFFF, words >> HALF_BITS], dim=-1)  # [BH, Nq, groups, 4, 2]: key 8g + 2w + h
    halves = halves.reshape(batch * heads, nq, groups * KEYS_PER_CALL)[..., :nk]
    return (halves >= threshold(p)).reshape(batch, heads, nq, nk)


def draw_seed(device: torch.device, generator: torch.Generator | None) -> Tensor:
    """A one-element int64 seed on ``device`` from ``generator`` (torch's default generator for that device when
    None), drawn on the device: no host sync."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device, generator=generator)
