"""A1111's per-image noise (`modules/rng.py` `ImageRNG`), so that a seed gives A1111's picture here.

Every image has its own generator, so batch size and position never change a picture. The image's
first draw is its initial latent noise, possibly blended with a variation seed's noise and pasted
from another size; every later draw (ancestral and other stochastic sampler steps, through
k-diffusion's `torch.randn_like`) continues that generator, or one seeded with seed + ENSD.

Sources, by A1111's "Random number generator source" option (infotext `RNG:`):
- "a1111": GPU (the default, no `RNG:` key) and NV. The numbers of `torch.randn` on a CUDA device,
  made on the CPU by `philox`: A1111's NV numbers bit for bit, the GPU's up to their last bits.
- "a1111-cpu": CPU. `torch.randn` on the CPU generator. A1111 seeds torch's global generator per
  call; a local `torch.Generator` gives the same numbers without touching global state.

Seeds: A1111 uses them as given (a random seed is drawn from 0..2**32-2, but any integer can be typed
in), and torch takes -2**63..2**64-1, a negative seed counting as 2**64 + seed. The CUDA generator
keys Philox with all 64 bits; torch's CPU generator (a Mersenne Twister) keeps only the low 32, so
with "a1111-cpu" seed 2**32 + 5 is seed 5 and with "a1111" it is not. A seed outside torch's range
fails in A1111 and raises ValueError here.

This is `ImageRNG` as of A1111 1.6; before it, `processing.create_random_tensors` drew the same
initial noise, and applied ENSD only when it was above 0.
"""

from collections.abc import Sequence
from typing import Literal

import torch

from . import philox

Source = Literal["a1111", "a1111-cpu"]
SOURCES: tuple[Source, ...] = ("a1111", "a1111-cpu")
LATENT_FACTOR = 8  # A1111 turns "Seed resize from" pixels into latent cells with // 8

Size = tuple[int, int]  # (width, height) in pixels


def torch_seed(seed: int) -> int:
    """The seed as torch's generators store it: 0..2**64-1, negatives wrapped as torch wraps them."""
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"a seed must be in -2**63..2**64-1 (what torch accepts), got {seed}")
    return int(seed) % 2**64


class NoiseGenerator:
    """One image's generator: A1111's `create_generator(seed)`, each `randn` the next draw."""

    def __init__(self, seed: int, source: Source = "a1111"):
        if source not in SOURCES:
            raise ValueError(f"unknown noise source {source!r}; choose one of {', '.join(SOURCES)}")
        self.seed = torch_seed(seed)
        self.source = source
        if source == "a1111":
            self._cuda = philox.CudaGenerator(self.seed)
        else:
            self._cpu = torch.Generator("cpu").manual_seed(self.seed)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """The next draw: standard normal float32 on the CPU."""
        if self.source == "a1111":
            return torch.from_numpy(self._cuda.randn(shape))
        return torch.randn(tuple(shape), generator=self._cpu, dtype=torch.float32, device="cpu")


def randn(seed: int, shape: Sequence[int], source: Source = "a1111") -> torch.Tensor:
    """A fresh generator's first draw (A1111's `randn(seed, shape)` / `randn_local`): the variation
    seed's noise, the noise drawn at the "resize from" size, and the Brownian-tree noise of A1111's
    DPM++ SDE samplers (its torchsde hook draws `randn_local(seed, size)`)."""
    return NoiseGenerator(seed, source).randn(shape)


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's variation blend of `low` (the seed's noise) towards `high` (the variation seed's), kept
    operation for operation so that the float32 results match.

    Quirks kept on purpose: the vectors are taken along dim 1 of the tensor as given, so for one
    image's (C, H, W) noise every (channel, column) is interpolated on its own with its own angle;
    and when the vectors are nearly parallel on average the fallback is linear with the weights the
    other way round (`low * val + high * (1 - val)`). No norm is guarded: A1111 has no epsilon.
    """
    low_unit = low / torch.linalg.vector_norm(low, dim=1, keepdim=True)
    high_unit = high / torch.linalg.vector_norm(high, dim=1, keepdim=True)
    cos = (low_unit * high_unit).sum(1)
    if cos.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(cos)
    sin_omega = torch.sin(omega)
    w_low = (torch.sin((1.0 - val) * omega) / sin_omega).unsqueeze(1)
    w_high = (torch.sin(val * omega) / sin_omega).unsqueeze(1)
    return w_low * low + w_high * high


def paste_centred(canvas: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """`patch` (C, h, w) over the middle of `canvas` (C, H, W) in place, as A1111's seed resize does.

    Offsets are floor((H - h) / 2): a smaller patch sits one cell nearer the top/left when the
    difference is odd; a patch larger by an odd amount is cropped to H - 1 rows starting at its
    row (h - H + 1) / 2, so the canvas keeps its own last row (likewise for columns).
    """
    dy, dx = (canvas.shape[1] - patch.shape[1]) // 2, (canvas.shape[2] - patch.shape[2]) // 2
    h = patch.shape[1] if dy >= 0 else patch.shape[1] + 2 * dy
    w = patch.shape[2] if dx >= 0 else patch.shape[2] + 2 * dx
    ty, tx = max(dy, 0), max(dx, 0)
    sy, sx = max(-dy, 0), max(-dx, 0)
    canvas[:, ty : ty + h, tx : tx + w] = patch[:, sy : sy + h, sx : sx + w]
    return canvas


class ImageNoise:
    """The noise of a batch of images, one generator each, as A1111's `ImageRNG`.

    `shape` is one image's latent (C, H, W). `subseed_strength` and `seed_resize_from` (pixels,
    (width, height); None or a size <= 0 means off) apply to every image or, as a list, one per
    image: A1111 shares them across its batch, and per-image values let any images share a batch.
    A1111 also pastes with the resize on the hires pass: build a new ImageNoise per pass with the
    pass's latent shape and the same arguments, as A1111 builds a new ImageRNG.

    `first()` is the initial noise; `next()` returns it on its first call (A1111's sampler only ever
    calls `next()`) and each later draw after that. All tensors are (B, C, H, W) float32 on the CPU.
    """

    def __init__(
        self,
        shape: Sequence[int],
        seeds: Sequence[int],
        subseeds: Sequence[int] | None = None,
        subseed_strength: float | Sequence[float] = 0.0,
        seed_resize_from: Size | Sequence[Size | None] | None = None,
        source: Source = "a1111",
        ensd: int = 0,
    ):
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3:
            raise ValueError(f"shape is one image's latent (C, H, W), got {self.shape}")
        if not seeds:
            raise ValueError("no seeds: one per image")
        n = len(seeds)
        self.seeds = [int(s) for s in seeds]  # as given: ENSD adds to the seed, not to its wrapped value
        self.strengths = _per_image(
            [float(subseed_strength)] * n if _is_number(subseed_strength) else subseed_strength, n
        )
        if subseeds is None:
            if any(self.strengths):
                raise ValueError("a variation strength needs variation seeds (subseeds)")
            self.subseeds = [0] * n
        else:
            self.subseeds = [int(s) for s in _per_image(subseeds, n)]
        shared = _is_size(seed_resize_from)
        self.resize_from = _per_image([seed_resize_from] * n if shared else seed_resize_from, n)
        self.source = source
        self.ensd = int(ensd)
        self._generators = [NoiseGenerator(s, source) for s in self.seeds]
        self._started = False

    def first(self) -> torch.Tensor:
        """Each image's initial noise (one draw from its generator); then, when ENSD is not 0, every
        generator is replaced by one seeded with seed + ENSD for the draws that follow."""
        if self._started:
            raise RuntimeError("first() draws the initial noise once; call next() for later draws")
        self._started = True
        xs = [self._first_one(i) for i in range(len(self.seeds))]
        if self.ensd:
            # as 64-bit seeds, as torch's manual_seed and A1111's Philox take seed + ENSD (a seed near
            # 2**64, a negative A1111 seed read as its two's complement, or a negative ENSD would overflow)
            self._generators = [NoiseGenerator((s + self.ensd) % 2**64, self.source) for s in self.seeds]
        return torch.stack(xs)

    def next(self) -> torch.Tensor:
        """The initial noise on the first call, then the next draw of each image's generator."""
        if not self._started:
            return self.first()
        return torch.stack([g.randn(self.shape) for g in self._generators])

    def _first_one(self, i: int) -> torch.Tensor:
        # the order of the draws is A1111's: each generator must end one full-size draw further on
        seed, generator, strength = self.seeds[i], self._generators[i], self.strengths[i]
        noise_shape = self._noise_shape(self.resize_from[i])
        resized = noise_shape != self.shape
        subnoise = randn(self.subseeds[i], noise_shape, self.source) if strength != 0 else None
        noise = randn(seed, noise_shape, self.source) if resized else generator.randn(self.shape)
        if subnoise is not None:
            noise = slerp(strength, noise, subnoise)
        if resized:
            noise = paste_centred(generator.randn(self.shape), noise)
        return noise

    def _noise_shape(self, size: Size | None) -> tuple[int, ...]:
        if size is None or size[0] <= 0 or size[1] <= 0:
            return self.shape
        width, height = size
        return (self.shape[0], int(height) // LATENT_FACTOR, int(width) // LATENT_FACTOR)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float))


def _is_size(value: object) -> bool:
    """One (width, height) or None, as opposed to a list of them."""
    return value is None or (isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value))


def _per_image(values: Sequence, n: int) -> list:
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{len(values)} per-image values for {n} seeds")
    return values
