"""Stochastic DPM-Solver++ (`sample_dpmpp_sde`, A1111's "DPM++ SDE", eta 1, r 1/2): each step two
ancestral half steps in log sigma, the second from a mix of both denoised estimates; the last step, to
sigma 0, is plain Euler. Its noise is a NoiseSampler (Sampler.brownian): A1111 passes a Brownian tree
per image, asked for the step's two intervals (sigma, sigma_mid) and (sigma, sigma_next).
A1111's "Automatic" schedule is Karras."""

from torch import Tensor

from .schedule import AfterStep, NoiseSampler, NoiseSchedule, SigmaDenoiser, StepPlan, ancestral_step
from .sigmas import automatic_plan

R = 0.5  # where in log sigma the second model call sits


def plan(schedule: NoiseSchedule, steps: int, karras: bool = False) -> StepPlan:
    return automatic_plan(schedule, steps, "DPM++ SDE", karras)


def sample(
    model: SigmaDenoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler, after_step: AfterStep = None
) -> Tensor:
    def sigma_of(t: Tensor) -> Tensor:
        return t.neg().exp()

    for i in range(len(sigmas) - 1):
        denoised = model(x, i)
        if sigmas[i + 1] == 0:
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        else:
            # in t = -log(sigma), as k-diffusion computes it (sigmas come back through exp(-t))
            t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
            t_mid = t + (t_next - t) * R
            down, up = ancestral_step(sigma_of(t), sigma_of(t_mid))
            t_down = -down.log()
            x_2 = (sigma_of(t_down) / sigma_of(t)) * x - (t - t_down).expm1() * denoised
            x_2 = x_2 + noise(sigma_of(t), sigma_of(t_mid)) * up
            denoised_2 = model(x_2, i, sigma_of(t_mid))

            down, up = ancestral_step(sigma_of(t), sigma_of(t_next))
            t_down = -down.log()
            mixed = (1 - 1 / (2 * R)) * denoised + 1 / (2 * R) * denoised_2
            x = (sigma_of(t_down) / sigma_of(t)) * x - (t - t_down).expm1() * mixed
            x = x + noise(sigma_of(t), sigma_of(t_next)) * up
        if after_step:
            x = after_step(i, x)
    return x
