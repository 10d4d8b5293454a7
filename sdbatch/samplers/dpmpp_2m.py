"""DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log-sigma, first order at the ends."""

import numpy as np
import torch
from torch import Tensor

from .schedule import AfterStep, Denoiser, NoiseSchedule, NoiseSource, StepPlan


def plan(schedule: NoiseSchedule, steps: int, karras: bool = False) -> StepPlan:
    if karras:
        return StepPlan.karras(schedule, steps, vp_init=True, round_t=True)
    # integer timesteps over steps + 1 points, the last dropped (diffusers' DPMSolverMultistep rule)
    return StepPlan.at(schedule, np.linspace(0, schedule.train_steps - 1, steps + 1).round()[::-1][:-1].copy(), True)


def sample(
    model: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource = None, after_step: AfterStep = None
) -> Tensor:
    previous = None  # the last step's denoised estimate: the "multistep" memory
    for i in range(len(sigmas) - 1):
        denoised = model(x, i)
        s, s_next = sigmas[i], sigmas[i + 1]
        if s_next == 0:
            x = denoised  # the first-order update's limit at sigma 0
        else:
            h = s.log() - s_next.log()  # step size in lambda = -log(sigma)
            estimate = denoised
            if previous is not None:  # second order from the two latest estimates
                r = (sigmas[i - 1].log() - s.log()) / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
            x = (s_next / s) * x - torch.expm1(-h) * estimate
        previous = denoised
        if after_step:
            x = after_step(i, x)
    return x
