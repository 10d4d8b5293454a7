"""Ancestral DPM-Solver++(2S) (`sample_dpmpp_2s_ancestral`, A1111's "DPM++ 2S a"): a second-order
singlestep update in log sigma down to sigma_down (the model evaluated again halfway), then fresh noise
back up to the next sigma. One draw per step except the last. A1111's "Automatic" schedule is Karras."""

from torch import Tensor

from .schedule import AfterStep, NoiseSchedule, NoiseSource, SigmaDenoiser, StepPlan, ancestral_step
from .sigmas import automatic_plan


def plan(schedule: NoiseSchedule, steps: int, karras: bool = False) -> StepPlan:
    return automatic_plan(schedule, steps, "DPM++ 2S a", karras)


def sample(model: SigmaDenoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource, after_step: AfterStep = None) -> Tensor:
    for i in range(len(sigmas) - 1):
        s = sigmas[i]
        denoised = model(x, i)
        sigma_down, sigma_up = ancestral_step(s, sigmas[i + 1])
        if sigma_down == 0:
            x = x + (x - denoised) / s * (sigma_down - s)
        else:
            # in t = -log(sigma), as k-diffusion computes it (sigmas come back through exp(-t))
            t, t_next = -s.log(), -sigma_down.log()
            h = t_next - t
            t_mid = t + h / 2
            x_2 = ((-t_mid).exp() / (-t).exp()) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, i, (-t_mid).exp())
            x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise() * sigma_up
        if after_step:
            x = after_step(i, x)
    return x
