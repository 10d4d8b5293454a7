"""Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn)."""

import numpy as np
from torch import Tensor

from .schedule import AfterStep, Denoiser, NoiseSchedule, NoiseSource, StepPlan


def plan(schedule: NoiseSchedule, steps: int, karras: bool = False) -> StepPlan:
    if karras:
        return StepPlan.karras(schedule, steps, vp_init=False)
    return StepPlan.at(schedule, np.linspace(0, schedule.train_steps - 1, steps, dtype=np.float32)[::-1].copy(), False)


def sample(
    model: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource = None, after_step: AfterStep = None
) -> Tensor:
    for i in range(len(sigmas) - 1):
        d = (x - model(x, i)) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        if after_step:
            x = after_step(i, x)
    return x
