"""CUDA's Philox4x32-10 generator, and what `torch.randn` on a CUDA device makes of it, on the CPU.

A1111's default noise is `torch.randn(shape, device="cuda")` from a generator seeded with the image's
seed. Its "NV" option (`modules/rng_philox.py`) computes the same numbers with numpy so that they can
be made anywhere; this module does the same, to A1111's NV numbers bit for bit:

- torch seeds Philox with the 64-bit seed as key (low word, high word). Call number k of `randn` on
  the generator (k = 0 for the first) gives element i the 128-bit counter (k, 0, i, 0): torch starts
  one CUDA thread per element with `curand_init(seed, subsequence=i, offset=4k)`.
- Each thread runs Philox once and keeps the first of the two Box–Muller normals made from its first
  two words: sqrt(-2 ln u) * sin(v), u and v from curand's float32 constants.

Limits, shared with A1111's NV option:
- torch gives every element its own thread only while the tensor fits in the GPU's resident threads
  (multiprocessors x threads per multiprocessor: 125,952 on an RTX 3090, 270,336 on an H100 SXM); a
  larger tensor makes each thread draw several numbers, and the GPU's numbers then depend on its
  model. SD1 latents (4 x 64 x 64 = 16,384 at 512 px; 65,536 at 1024 px) are far inside.
- The GPU does the Box–Muller arithmetic in float32 with its own logf/sinf; A1111 (and we) do it in
  float64 and round once, so a number can differ from the GPU's in its last bits (about 1e-7, more
  where sqrt(-2 ln u) is close to 0).
"""

import math
from collections.abc import Sequence

import numpy as np

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # Weyl key increments (golden ratio, sqrt(3) - 1)
_MASK32 = np.uint64(0xFFFFFFFF)

# curand's CURAND_2POW32_INV and CURAND_2POW32_INV_2PI, float32 as on the GPU (the first is 2**-32)
TWO_POW32_INV = np.float32(2.3283064e-10)
TWO_POW32_INV_2PI = np.float32(2.3283064e-10 * 6.2831855)

SEED_RANGE = 2**64  # a CUDA generator's seed is an unsigned 64-bit integer


def philox4x32_10(counter: Sequence, key: Sequence) -> np.ndarray:
    """Philox4x32 with 10 rounds (Random123, as curand runs it) on 4 counter words and 2 key words.

    Each word may be an int or an array; they broadcast, so one call makes a whole tensor's worth.
    Returns the four output words stacked, uint32 of shape (4, *broadcast shape).
    """
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.asarray(k, dtype=np.uint64) for k in key)
    m0, m1 = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1])
    w0, w1 = np.uint64(PHILOX_W[0]), np.uint64(PHILOX_W[1])
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + w0) & _MASK32, (k1 + w1) & _MASK32
        # 32 x 32 -> 64-bit products are exact in uint64: the high and low words are the round's mulhilo
        p0, p1 = c0 * m0, c2 * m1
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK32
    return np.stack(np.broadcast_arrays(c0, c1, c2, c3)).astype(np.uint32)


def box_muller(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The first normal of curand's Box–Muller pair from two uint32 words, as float32.

    u = x * 2**-32 + 2**-33 lies in (0, 1), so the log is finite; A1111 evaluates in float64 with the
    float32 constants and rounds the result to float32, and so do we.
    """
    u = x.astype(np.float64) * float(TWO_POW32_INV) + float(TWO_POW32_INV / np.float32(2))
    v = y.astype(np.float64) * float(TWO_POW32_INV_2PI) + float(TWO_POW32_INV_2PI / np.float32(2))
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


def cuda_randn(seed: int, shape: Sequence[int], draw: int = 0) -> np.ndarray:
    """What call number `draw` (0 = the first) of `torch.randn(shape)` on a CUDA generator seeded with
    `seed` returns, as float32 numpy: A1111's `rng_philox.Generator(seed).randn(shape)` for draw 0."""
    if not 0 <= seed < SEED_RANGE:
        raise ValueError(f"a CUDA generator's seed is 0..2**64-1, got {seed}")
    if draw < 0:
        raise ValueError(f"draw counts calls from 0, got {draw}")
    shape = tuple(int(s) for s in shape)
    index = np.arange(math.prod(shape), dtype=np.uint64)
    words = philox4x32_10(
        (draw & 0xFFFFFFFF, draw >> 32, index & _MASK32, index >> np.uint64(32)),
        (seed & 0xFFFFFFFF, seed >> 32),
    )
    return box_muller(words[0], words[1]).reshape(shape)


class CudaGenerator:
    """A CUDA generator seeded once: each `randn` call is the next draw, as on the GPU."""

    def __init__(self, seed: int):
        if not 0 <= seed < SEED_RANGE:
            raise ValueError(f"a CUDA generator's seed is 0..2**64-1, got {seed}")
        self.seed = seed
        self.draws = 0

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        out = cuda_randn(self.seed, shape, self.draws)
        self.draws += 1
        return out
