"""Ancestral DPM2 (`sample_dpm_2_ancestral`, A1111's "DPM2 a"): a DPM2 step down to sigma_down, then
fresh noise back up to the next sigma. One draw per step except the last (none when sigma_next is 0).
Like DPM2, A1111 drops the next-to-last sigma and defaults to Karras."""

from torch import Tensor

from .dpm2 import midpoint_step
from .schedule import AfterStep, NoiseSchedule, NoiseSource, SigmaDenoiser, StepPlan, ancestral_step
from .sigmas import automatic_plan


def plan(schedule: NoiseSchedule, steps: int, karras: bool = False) -> StepPlan:
    return automatic_plan(schedule, steps, "DPM2 a", karras)


def sample(model: SigmaDenoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource, after_step: AfterStep = None) -> Tensor:
    for i in range(len(sigmas) - 1):
        s = sigmas[i]
        sigma_down, sigma_up = ancestral_step(s, sigmas[i + 1])
        d = (x - model(x, i)) / s
        if sigma_down == 0:
            x = x + d * (sigma_down - s)
        else:
            x = midpoint_step(model, x, i, s, d, sigma_down) + noise() * sigma_up
        if after_step:
            x = after_step(i, x)
    return x
