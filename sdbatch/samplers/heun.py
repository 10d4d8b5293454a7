"""Heun's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn):
an Euler step, then the average of the slopes at both ends; the last step, to sigma 0, is plain Euler.
k-diffusion's `sample_heun`, A1111's "Heun"."""

from torch import Tensor

from .schedule import AfterStep, NoiseSchedule, NoiseSource, SigmaDenoiser, StepPlan
from .sigmas import automatic_plan


def plan(schedule: NoiseSchedule, steps: int, karras: bool = False) -> StepPlan:
    return automatic_plan(schedule, steps, "Heun", karras)


def sample(
    model: SigmaDenoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource = None, after_step: AfterStep = None
) -> Tensor:
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - model(x, i)) / s
        dt = s_next - s
        if s_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, i, s_next)) / s_next
            x = x + (d + d_2) / 2 * dt
        if after_step:
            x = after_step(i, x)
    return x
