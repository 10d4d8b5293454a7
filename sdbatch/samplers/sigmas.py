"""A1111's schedule types ("Schedule type" in its infotext, A1111 1.10 `modules/sd_schedulers.py`):
sigmas for the k-diffusion samplers, each a function (schedule, steps) -> float32 sigmas, `steps` of
them then a 0. They are computed as A1111 computes them (torch float32 on the CPU, k-diffusion's
`get_sigmas_*`, `CompVisDenoiser`'s log-sigma interpolation), so that a seed gives A1111's picture.

A1111 takes sigma_min and sigma_max from the model's discrete sigmas (0.0292 and 14.6146 for SD 1.x):
pass `NoiseSchedule.compvis()` to get its values to the last bit.

"Automatic" is each sampler's own choice (AUTOMATIC below); A1111 also drops the next-to-last sigma
of DPM2, DPM2 a and DPM++ 3M SDE, computing steps + 1 sigmas so that `steps` remain.
"""

import math

import numpy as np
import torch

from . import SCHEDULE_LABELS
from .schedule import NoiseSchedule, StepPlan


def _log_sigmas(schedule: NoiseSchedule, device: torch.device | str = "cpu") -> torch.Tensor:
    """k-diffusion's `log_sigmas` buffer (in fp16 for A1111's downcast schedule: not log(sigmas))."""
    return schedule.k_log_sigmas.to(device)


def sigma_to_t(schedule: NoiseSchedule, sigma: torch.Tensor) -> torch.Tensor:
    """The (fractional) UNet timestep of each sigma: k-diffusion's `DiscreteSchedule.sigma_to_t`,
    linear in log sigma between the two neighbouring discrete sigmas (what A1111 tells the UNet)."""
    log_sigmas = _log_sigmas(schedule, sigma.device)
    log_sigma = sigma.log()
    dists = log_sigma - log_sigmas[:, None]
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
    return ((1 - w) * low + w * high).view(sigma.shape)


def t_to_sigma(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """The sigma of (fractional) timesteps, interpolated in log sigma: k-diffusion's `t_to_sigma`."""
    log_sigmas = _log_sigmas(schedule, t.device)
    t = t.float()
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def _extremes(schedule: NoiseSchedule) -> tuple[float, float]:
    return float(schedule.sigmas[0]), float(schedule.sigmas[-1])


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def uniform(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """Timesteps evenly from 999 to 0: `CompVisDenoiser.get_sigmas`, A1111's default ("Uniform")."""
    return _append_zero(t_to_sigma(schedule, torch.linspace(schedule.train_steps - 1, 0, steps)))


def karras(schedule: NoiseSchedule, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022): evenly spaced in sigma^(1/rho), dense near the clean end."""
    sigma_min, sigma_max = _extremes(schedule)
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """Evenly spaced in log sigma."""
    sigma_min, sigma_max = _extremes(schedule)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp())


def polyexponential(schedule: NoiseSchedule, steps: int, rho: float = 1.0) -> torch.Tensor:
    """log sigma a polynomial of the step; A1111's default rho 1 makes it `exponential` up to rounding."""
    sigma_min, sigma_max = _extremes(schedule)
    ramp = torch.linspace(1, 0, steps) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def _timesteps_between_extremes(schedule: NoiseSchedule, count: int) -> torch.Tensor:
    sigma_min, sigma_max = _extremes(schedule)
    start, end = sigma_to_t(schedule, torch.tensor(sigma_max)), sigma_to_t(schedule, torch.tensor(sigma_min))
    return torch.linspace(start, end, count)


def sgm_uniform(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """Timesteps evenly over steps + 1 points from the largest to the smallest sigma, the last dropped
    (SGM's "trailing" spacing)."""
    return _append_zero(t_to_sigma(schedule, _timesteps_between_extremes(schedule, steps + 1)[:-1]))


def normal(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """Timesteps evenly over `steps` points from the largest sigma to the smallest (ComfyUI's "normal")."""
    return _append_zero(t_to_sigma(schedule, _timesteps_between_extremes(schedule, steps)))


def simple(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """Every (1000 / steps)-th discrete sigma from the top, truncated (ComfyUI's "simple")."""
    stride = len(schedule.sigmas) / steps
    return _append_zero(torch.tensor([float(schedule.sigmas[-(1 + int(k * stride))]) for k in range(steps)]))


def ddim(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """The discrete sigmas at timesteps 1, 1 + k, 1 + 2k, ... (k = 1000 // steps), reversed. As in
    A1111 this gives more than `steps` sigmas when 999 is not a multiple of k (14 for 13 steps)."""
    stride = max(len(schedule.sigmas) // steps, 1)
    picked = [float(s) for s in schedule.sigmas[1::stride]]
    return _append_zero(torch.tensor(picked[::-1]))


def kl_optimal(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """Evenly spaced in arctan(sigma) (Sabour et al. 2024). As A1111's, it ends at the smallest sigma,
    not 0: the last step leaves sigma_min of noise in the latent, and A1111 decodes it so."""
    sigma_min, sigma_max = _extremes(schedule)
    alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
    k = torch.arange(steps + 1)
    return torch.tan(k / steps * alpha_min + (1.0 - k / steps) * alpha_max)


# NVIDIA's "Align Your Steps" sigmas for SD 1.5 (10 steps), as A1111 lists them
AYS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]


def align_your_steps(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """AYS_SD15, or for another step count its log-linear interpolation (the model's own sigmas do not
    enter: these are tuned for SD 1.5)."""
    if steps == len(AYS_SD15):
        return torch.tensor([*AYS_SD15, 0.0])
    xs, log_sigmas = np.linspace(0, 1, len(AYS_SD15)), np.log(AYS_SD15[::-1])
    sigmas = np.exp(np.interp(np.linspace(0, 1, steps), xs, log_sigmas))[::-1]
    return torch.tensor(np.append(sigmas, [0.0]), dtype=torch.float32)


def beta(schedule: NoiseSchedule, steps: int, a: float = 0.6, b: float = 0.6) -> torch.Tensor:
    """Linear in sigma at the quantiles of a Beta(a, b) distribution (Lee et al. 2024), A1111's
    defaults 0.6 and 0.6 (its options `Beta scheduler alpha/beta`)."""
    sigma_min, sigma_max = _extremes(schedule)
    quantiles = [beta_ppf(float(q), a, b) for q in 1 - np.linspace(0, 1, steps)]
    return torch.tensor([sigma_min + q * (sigma_max - sigma_min) for q in quantiles] + [0.0])


def beta_ppf(q: float, a: float, b: float) -> float:
    """The q-quantile of Beta(a, b), by bisection on the regularized incomplete beta function (scipy's
    `stats.beta.ppf`, which A1111 uses, to ~1e-15 without scipy)."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if _betainc(a, b, mid) < q else (lo, mid)
    return lo if q <= 0 else hi


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b) by its continued fraction (modified Lentz), on the side where it converges fast."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300

    def nonzero(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1.0 / nonzero(1.0 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 / nonzero(1.0 + numerator * d)
            c = nonzero(1.0 + numerator / c)
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


SCHEDULES = {
    "uniform": uniform,
    "karras": karras,
    "exponential": exponential,
    "polyexponential": polyexponential,
    "sgm_uniform": sgm_uniform,
    "kl_optimal": kl_optimal,
    "align_your_steps": align_your_steps,
    "simple": simple,
    "normal": normal,
    "ddim": ddim,
    "beta": beta,
}
# A1111's labels (infotext `Schedule type: ...`); "Automatic" is not written to the infotext
LABELS = {name: label for name, label in SCHEDULE_LABELS.items() if name != "automatic"}

# "Automatic": A1111 1.10's `scheduler` option of each k-diffusion sampler (`samplers_k_diffusion`), by
# its A1111 name; those without one use the model's discrete sigmas, i.e. "uniform"
AUTOMATIC = {
    "Euler a": "uniform",
    "Euler": "uniform",
    "LMS": "uniform",
    "Heun": "uniform",
    "DPM2": "karras",
    "DPM2 a": "karras",
    "DPM++ 2S a": "karras",
    "DPM++ 2M": "karras",
    "DPM++ SDE": "karras",
    "DPM++ 2M SDE": "exponential",
    "DPM++ 2M SDE Heun": "exponential",
    "DPM++ 3M SDE": "exponential",
}
# A1111's `discard_next_to_last_sigma` samplers: steps + 1 sigmas are made and the next-to-last dropped
DISCARD_NEXT_TO_LAST = frozenset({"DPM2", "DPM2 a", "DPM++ 3M SDE"})


def a1111_plan(
    schedule: NoiseSchedule, steps: int, schedule_type: str = "uniform", discard_next_to_last_sigma: bool = False
) -> StepPlan:
    """The plan A1111's `KDiffusionSampler.get_sigmas` makes: the sigmas of `schedule_type`, each
    step's UNet timestep by `sigma_to_t`, pure noise starting at sigma_0 (txt2img: noise * sigma_0)."""
    try:
        make = SCHEDULES[schedule_type]
    except KeyError:
        raise ValueError(f"unknown schedule type {schedule_type!r}; known: {', '.join(SCHEDULES)}") from None
    sigmas = make(schedule, steps + 1 if discard_next_to_last_sigma else steps).float()
    if discard_next_to_last_sigma:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return StepPlan(sigma_to_t(schedule, sigmas[:-1]), sigmas, vp_init=False)


def automatic_plan(schedule: NoiseSchedule, steps: int, sampler: str, karras: bool = False) -> StepPlan:
    """The plan of A1111's sampler `sampler` (its A1111 name) with "Automatic" schedule, or "Karras"."""
    return a1111_plan(schedule, steps, "karras" if karras else AUTOMATIC[sampler], sampler in DISCARD_NEXT_TO_LAST)
