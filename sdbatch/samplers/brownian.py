"""The noise A1111 gives the SDE samplers (Sampler.brownian): k-diffusion's `BrownianTreeNoiseSampler`
with one `torchsde.BrownianTree` per image, seeded with the image's seed, so that an image's noise does
not depend on its batch. noise(sigma, sigma_next) is the tree's increment between the two noise levels
over sqrt|sigma_next - sigma|: a standard normal, correlated across steps as Brownian motion is.

A1111 (`Sampler.create_noise_sampler`) spans the tree over the smallest positive and the largest sigma
of the whole schedule, for img2img and hires passes too (not only the steps run), and seeds it with
the image seeds themselves (not seed + ENSD, not the variation seed). torchsde draws the tree's normals
with `_randn(size, dtype, device, seed)`: a fresh `torch.Generator(device)` seeded with a number from
the tree's `SeedSequence`, one `torch.randn` each. A1111 replaces that function by its `randn_local`
(`replace_torchsde_browinan`): the same draw made by its noise source, on an NVIDIA GPU CUDA's Philox
numbers. So `source` picks the normals: "a1111" (`rng: a1111`) our port of CUDA's randn (noise/philox.py),
so that a CPU render gives A1111-on-GPU's noise; "a1111-cpu" a CPU `torch.Generator` (what torchsde's own
draws are on the CPU); None torchsde's own, on the latents' device. torchsde's module-level `_randn` is
swapped only while a tree of ours draws, under a lock (one process may hold trees of both sources).
Needs torchsde (`pip install torchsde`).
"""

import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

_SWAP = threading.RLock()


@contextmanager
def normals(source: str | None) -> Iterator[None]:
    """torchsde's Brownian normals drawn by `source` (see above) inside the block."""
    if source is None:
        yield
        return
    from torchsde._brownian import brownian_interval

    from ..noise.a1111 import randn

    def draw(size, dtype, device, seed):  # A1111's torchsde_randn: randn_local(seed, size)
        return randn(int(seed), tuple(size), source).to(device=device, dtype=dtype)

    with _SWAP:
        saved = brownian_interval._randn
        brownian_interval._randn = draw
        try:
            yield
        finally:
            brownian_interval._randn = saved


class BrownianNoise:
    """A NoiseSampler for images shaped like `x` (a batch), image k's tree seeded with seeds[k]."""

    def __init__(self, x: torch.Tensor, seeds: Sequence[int], sigmas: torch.Tensor, source: str | None = None):
        try:
            import torchsde
        except ImportError as e:
            raise ImportError("the DPM++ SDE samplers need torchsde for A1111's noise: pip install torchsde") from e
        if len(seeds) != len(x):
            raise ValueError(f"one seed per image: {len(seeds)} seeds for {len(x)} images")
        t0, t1 = sigmas[sigmas > 0].min(), sigmas.max()
        w0 = torch.zeros_like(x[0])
        self.source = source
        with normals(source):
            self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(seed)) for seed in seeds]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        low, high, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        with warnings.catch_warnings(), normals(self.source):  # float rounding at the ends: harmless (k-diffusion)
            warnings.filterwarnings("ignore", message="Should have t[ab]")
            w = torch.stack([tree(low, high) for tree in self.trees]) * sign
        return w / (t1 - t0).abs().sqrt()
