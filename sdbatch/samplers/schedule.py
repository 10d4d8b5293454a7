"""The SD 1.x training noise schedule, and the step plans the samplers walk along.

Samplers work k-diffusion style on the variance-exploding latent x = x_vp * sqrt(1 + sigma^2), a
sigma per step. Each sampler's timesteps and sigmas follow the diffusers scheduler of the same
name exactly (our test oracle), computed in numpy float64 as diffusers does, stored as float32.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

# denoised = model(x, i): the model's estimate of the clean latent at step i of the plan
Denoiser = Callable[[torch.Tensor, int], torch.Tensor]


class SigmaDenoiser(Protocol):
    """A Denoiser that can also be evaluated between the plan's sigmas, as the k-diffusion samplers
    (heun, dpm2, dpmpp_sde, ...) need: model(x, i, sigma) is the estimate at noise level `sigma` (a 0-d
    tensor), its UNet timestep `sigmas.sigma_to_t(schedule, sigma)`; `i` stays the step being taken
    (prompt editing picks its prompt by it). model(x, i) is the estimate at plan.sigmas[i], told the
    plan's timestep (for the k-diffusion plans of sigmas.py, that same sigma_to_t)."""

    def __call__(self, x: torch.Tensor, i: int, sigma: torch.Tensor | None = None) -> torch.Tensor: ...


# a fresh standard-normal tensor shaped like the latents, drawn from each image's own generator
# (None for samplers that draw nothing)
NoiseSource = Callable[[], torch.Tensor] | None
# noise(sigma, sigma_next): k-diffusion's `noise_sampler`, a standard-normal tensor shaped like the
# latents for the step from sigma to sigma_next. The SDE samplers (`Sampler.brownian`) take this form
# instead of a NoiseSource, so that A1111's per-image Brownian tree (`brownian.BrownianNoise`) can drive
# them; `lambda sigma, sigma_next: draw()` drives them with plain per-image draws.
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# x = after_step(i, x) once step i is done (inpainting puts the known region back there), or None
AfterStep = Callable[[int, torch.Tensor], torch.Tensor] | None


class NoiseSchedule:
    """1000 "scaled linear" betas, sqrt-spaced from 0.00085 to 0.012, as SD 1.x was trained."""

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, train_steps: int = 1000):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, train_steps, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()  # float32, t=0..999
        self.log_sigmas = np.log(self.sigmas)  # diffusers' (numpy)
        self.k_log_sigmas = torch.from_numpy(self.sigmas).log()  # k-diffusion's `log_sigmas` buffer
        self.train_steps = train_steps

    @classmethod
    def compvis(cls, beta_start: float = 0.00085, beta_end: float = 0.012, train_steps: int = 1000) -> "NoiseSchedule":
        """The schedule as the LDM code computes it (float64, stored as float32): the `alphas_cumprod`
        buffer of SD 1.x checkpoints, which A1111's k-diffusion wrapper reads. Its sigmas differ from
        the float32 ones above (diffusers') by up to 9e-6 relative: sigma_max 14.614642 vs 14.614647."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, train_steps, dtype=torch.float64) ** 2
        return cls.from_alphas_cumprod(torch.from_numpy(np.cumprod(1.0 - betas.numpy())).float())

    @classmethod
    def compvis_fp16(cls) -> "NoiseSchedule":
        """The schedule A1111 ran before v1.7.0-225 (its `Downcast alphas_cumprod`, which it implies
        for texts of those versions): the fp16 model cast its `alphas_cumprod` buffer too, and
        k-diffusion's wrapper computed the sigmas and their logs from it in fp16. sigma_min 0.0313
        instead of 0.0292, so every schedule's last steps differ."""
        alphas = cls.compvis().alphas_cumprod.half()
        sigmas = ((1 - alphas) / alphas) ** 0.5  # each op rounded to fp16, as on the GPU
        schedule = cls.from_alphas_cumprod(alphas.float())
        schedule.sigmas = sigmas.float().numpy()
        schedule.k_log_sigmas = sigmas.log().float()  # k-diffusion keeps the fp16 logs, not log(sigmas)
        schedule.log_sigmas = schedule.k_log_sigmas.numpy()
        return schedule

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor) -> "NoiseSchedule":
        """A schedule from given cumulative alphas (a checkpoint's own `alphas_cumprod`, say)."""
        schedule = cls.__new__(cls)
        schedule.alphas_cumprod = alphas_cumprod.float().cpu()
        a = schedule.alphas_cumprod
        schedule.sigmas = (((1 - a) / a) ** 0.5).numpy()
        schedule.log_sigmas = np.log(schedule.sigmas)
        schedule.k_log_sigmas = torch.from_numpy(schedule.sigmas).log()
        schedule.train_steps = len(a)
        return schedule

    def sigma_at(self, t: np.ndarray) -> np.ndarray:
        """Sigma at (fractional) timesteps, linearly interpolated (diffusers' default)."""
        return np.interp(t, np.arange(self.train_steps), self.sigmas)

    def t_at(self, sigma: np.ndarray) -> np.ndarray:
        """The (fractional) timestep of each sigma, interpolating in log sigma."""
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma[None, :] - self.log_sigmas[:, None]
        low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=self.train_steps - 2)
        w = np.clip((self.log_sigmas[low] - log_sigma) / (self.log_sigmas[low] - self.log_sigmas[low + 1]), 0, 1)
        return (1 - w) * low + w * (low + 1)

    def karras(self, steps: int, rho: float = 7.0) -> np.ndarray:
        """Karras et al. (2022) sigmas between the schedule's extremes, dense near the clean end."""
        lo, hi = float(self.sigmas[0]) ** (1 / rho), float(self.sigmas[-1]) ** (1 / rho)
        return (hi + np.linspace(0, 1, steps) * (lo - hi)) ** rho

    def leading(self, steps: int, offset: int = 0) -> np.ndarray:
        """offset, offset + k, ... (k = 1000 // steps), reversed: 980, 960, ..., 0 for 50 steps."""
        return (np.arange(0, steps) * (self.train_steps // steps)).round()[::-1].copy() + offset


@dataclass(frozen=True)
class StepPlan:
    """What a sampler walks: the timestep the UNet is told at each step, and the noise level before
    each step plus the one after the last (0, or the schedule's minimum for DDIM)."""

    timesteps: torch.Tensor  # (n,) float32
    sigmas: torch.Tensor  # (n + 1,) float32
    vp_init: bool  # pure noise starts at std sqrt(1 + sigma_0^2) (DDPM/DDIM/DPM) instead of sigma_0 (Euler)
    # img2img: the noise level the image is noised to, when it is not sigmas[0]. A1111's timestep samplers
    # noise it to the grid point above the first one they run, and then take that VP latent as it is
    # (timesteps.py); `noised` gives the VE latent at sigmas[0] of that VP latent. 0-d tensor or None
    noise_sigma: torch.Tensor | None = None

    @classmethod
    def of(cls, timesteps: np.ndarray, sigmas: np.ndarray, final_sigma: float, vp_init: bool) -> "StepPlan":
        return cls(
            torch.from_numpy(np.asarray(timesteps, dtype=np.float32)),
            torch.from_numpy(np.concatenate([sigmas, [final_sigma]]).astype(np.float32)),
            vp_init,
        )

    @classmethod
    def karras(cls, schedule: "NoiseSchedule", steps: int, vp_init: bool, round_t: bool = False) -> "StepPlan":
        """Karras sigmas, each UNet timestep interpolated in log sigma (rounded for integer samplers)."""
        sigmas = schedule.karras(steps)
        t = schedule.t_at(sigmas)
        return cls.of(t.round() if round_t else t, sigmas, 0.0, vp_init)

    @classmethod
    def at(cls, schedule: "NoiseSchedule", t: np.ndarray, vp_init: bool) -> "StepPlan":
        """The schedule's own sigmas at timesteps `t` (interpolated), ending at sigma 0."""
        return cls.of(t, schedule.sigma_at(t), 0.0, vp_init)

    def __len__(self) -> int:
        return len(self.timesteps)

    def from_step(self, start: int) -> "StepPlan":
        """The tail of the plan that img2img runs after noising the image to step `start`."""
        if start == 0:
            return self
        return StepPlan(self.timesteps[start:], self.sigmas[start:], self.vp_init)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """img2img's first latent: the image's latents noised to the plan's start (VE, at sigmas[0]).
        With `noise_sigma`, the VP latent (latents + noise * noise_sigma) / sqrt(1 + noise_sigma^2),
        taken as the VP latent at sigmas[0], as A1111's timestep samplers take it."""
        if self.noise_sigma is None:
            return latents + noise * self.sigmas[0]
        s = self.noise_sigma
        return (latents + noise * s) * ((1 + self.sigmas[0] ** 2) / (1 + s**2)).sqrt()

    def initial_noise_scale(self) -> torch.Tensor:
        sigma = self.sigmas[0]
        return (sigma**2 + 1).sqrt() if self.vp_init else sigma

    def to_vp(self, x: torch.Tensor) -> torch.Tensor:
        """The final latent as the VAE expects it (differs from x only when the plan ends above 0)."""
        return x / (self.sigmas[-1] ** 2 + 1).sqrt()


def img2img_start(steps: int, strength: float) -> int:
    """First step run for a given strength: the last int(steps * strength) steps are run, as in the
    seed's DDPM sampler and diffusers' img2img pipeline."""
    return steps - min(int(steps * strength), steps)


def a1111_img2img(steps: int, strength: float, fixed_steps: int | None = None) -> tuple[int, int]:
    """(steps of the schedule, first step run) of A1111's img2img with a k-diffusion sampler
    (`setup_img2img_steps`, then `sigmas[steps - t_enc - 1:]`, noise * that first sigma added to the
    image): t_enc = int(min(strength, 0.999) * steps), and the last t_enc + 1 steps of a `steps`
    schedule are run: 16 of 20 at strength 0.75 (`img2img_start`: 15), all 20 at 1.0.
    `fixed_steps` (hires fix's second pass, given `Hires steps` or else the steps; also img2img under
    A1111's "img2img_fix_steps" option) runs exactly that many, of a schedule of
    int(fixed_steps / min(strength, 0.999)) steps."""
    if fixed_steps is None:
        return steps, steps - int(min(strength, 0.999) * steps) - 1
    if strength <= 0:
        raise ValueError(f"strength must be above 0, got {strength}")
    total = int(fixed_steps / min(strength, 0.999))
    return total, total - fixed_steps


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0) -> tuple[torch.Tensor, ...]:
    """(sigma_down, sigma_up): an ancestral step goes deterministically down to sigma_down, then adds
    noise * sigma_up, so that the noise level is sigma_next again (k-diffusion's `get_ancestral_step`)."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up
