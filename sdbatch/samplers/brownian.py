"""The noise A1111 gives the SDE samplers (Sampler.brownian): k-diffusion's `BrownianTreeNoiseSampler`
with one `torchsde.BrownianTree` per image, seeded with the image's seed, so that an image's noise does
not depend on its batch. noise(sigma, sigma_next) is the tree's increment between the two noise levels
over sqrt|sigma_next - sigma|: a standard normal, correlated across steps as Brownian motion is.

A1111 (`Sampler.create_noise_sampler`) spans the tree over the smallest positive and the largest sigma
of the whole schedule, for img2img and hires passes too (not only the steps run), and seeds it with
the image seeds themselves (not seed + ENSD, not the variation seed). The tree draws its normals with a
`torch.Generator` on the latents' device: on CUDA, A1111's case, those are CUDA's Philox numbers, so a
tree built on the CPU gives other (equally valid) noise. Needs torchsde (`pip install torchsde`).
"""

import warnings
from collections.abc import Sequence

import torch


class BrownianNoise:
    """A NoiseSampler for images shaped like `x` (a batch), image k's tree seeded with seeds[k]."""

    def __init__(self, x: torch.Tensor, seeds: Sequence[int], sigmas: torch.Tensor):
        try:
            import torchsde
        except ImportError as e:
            raise ImportError("the DPM++ SDE samplers need torchsde for A1111's noise: pip install torchsde") from e
        if len(seeds) != len(x):
            raise ValueError(f"one seed per image: {len(seeds)} seeds for {len(x)} images")
        t0, t1 = sigmas[sigmas > 0].min(), sigmas.max()
        w0 = torch.zeros_like(x[0])
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(seed)) for seed in seeds]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        low, high, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        with warnings.catch_warnings():  # float rounding at the tree's ends: harmless, as in k-diffusion
            warnings.filterwarnings("ignore", message="Should have t[ab]")
            w = torch.stack([tree(low, high) for tree in self.trees]) * sign
        return w / (t1 - t0).abs().sqrt()
