"""Euler ancestral: an Euler step down to sigma_down, then fresh noise back up to the next sigma."""

import torch

from . import euler
from .schedule import AfterStep, Denoiser, NoiseSchedule, NoiseSource, StepPlan


def plan(schedule: NoiseSchedule, steps: int, karras: bool = False) -> StepPlan:
    return euler.plan(schedule, steps, karras)


def sample(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource, after_step: AfterStep = None
) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        sigma_up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
        sigma_down = (s_next**2 - sigma_up**2) ** 0.5
        d = (x - model(x, i)) / s
        # noise is drawn on every step, the last too, so that each image's generator advances as in
        # diffusers and the same seed gives the same picture in both
        x = x + d * (sigma_down - s) + noise() * sigma_up
        if after_step:
            x = after_step(i, x)
    return x
