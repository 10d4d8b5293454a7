"""Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn)."""

import numpy as np
import torch

from .schedule import AfterStep, Denoiser, NoiseSchedule, NoiseSource, StepPlan


def plan(schedule: NoiseSchedule, steps: int, karras: bool = False) -> StepPlan:
    if karras:
        sigmas = schedule.karras(steps)
        return StepPlan.of(schedule.t_at(sigmas), sigmas, 0.0, vp_init=False)
    t = np.linspace(0, schedule.train_steps - 1, steps, dtype=np.float32)[::-1].copy()
    return StepPlan.of(t, schedule.sigma_at(t), 0.0, vp_init=False)


def sample(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise: NoiseSource | None = None,
    after_step: AfterStep = None,
) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        d = (x - model(x, i)) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        if after_step:
            x = after_step(i, x)
    return x
