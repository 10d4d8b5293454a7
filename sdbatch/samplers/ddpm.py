"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), exactly the seed's algorithm."""

import numpy as np
import torch

from .schedule import AfterStep, Denoiser, NoiseSchedule, NoiseSource, StepPlan


def plan(schedule: NoiseSchedule, steps: int) -> StepPlan:
    t = schedule.leading(steps)  # 980, 960, ..., 0 for 50 steps, as the seed (diffusers' SD pipelines add 1)
    return StepPlan.of(t, schedule.sigmas[t.astype(np.int64)], 0.0, vp_init=True)


def sample(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource, after_step: AfterStep = None
) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        denoised = model(x, i)
        a_t, a_prev = 1 / (1 + sigmas[i] ** 2), 1 / (1 + sigmas[i + 1] ** 2)
        beta_t = 1 - a_t / a_prev
        # posterior mean of x_{t-1} given x_t and the predicted x_0, in the VP parametrisation
        mean = (a_prev.sqrt() * beta_t / (1 - a_t)) * denoised + ((a_t / a_prev).sqrt() * (1 - a_prev) / (1 - a_t)) * (
            x * a_t.sqrt()
        )
        if sigmas[i + 1] > 0:  # no noise on the last step
            variance = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
            mean = mean + variance.sqrt() * noise()
        x = mean / a_prev.sqrt()
        if after_step:
            x = after_step(i, x)
    return x
