"""DPM-Solver-2 in k-diffusion's form (`sample_dpm_2`, A1111's "DPM2"): the slope at the geometric
midpoint of sigma and sigma_next carries the whole step; the last step, to sigma 0, is plain Euler.
A1111 computes steps + 1 sigmas and drops the next-to-last, so that the costly last midpoint step
is not taken near sigma 0; its "Automatic" schedule is Karras."""

from torch import Tensor

from .schedule import AfterStep, NoiseSchedule, NoiseSource, SigmaDenoiser, StepPlan
from .sigmas import automatic_plan


def plan(schedule: NoiseSchedule, steps: int, karras: bool = False) -> StepPlan:
    return automatic_plan(schedule, steps, "DPM2", karras)


def midpoint_step(model: SigmaDenoiser, x: Tensor, i: int, s: Tensor, d: Tensor, s_to: Tensor) -> Tensor:
    """x moved from s down to s_to along the slope at the log-midpoint, reached by an Euler half step."""
    s_mid = s.log().lerp(s_to.log(), 0.5).exp()
    x_2 = x + d * (s_mid - s)
    d_2 = (x_2 - model(x_2, i, s_mid)) / s_mid
    return x + d_2 * (s_to - s)


def sample(
    model: SigmaDenoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource = None, after_step: AfterStep = None
) -> Tensor:
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - model(x, i)) / s
        x = x + d * (s_next - s) if s_next == 0 else midpoint_step(model, x, i, s, d, s_next)
        if after_step:
            x = after_step(i, x)
    return x
