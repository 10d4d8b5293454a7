"""DPM-Solver++(2M) SDE (`sample_dpmpp_2m_sde`, A1111's "DPM++ 2M SDE", eta 1, midpoint solver): the
2M multistep update with the SDE's exponential damping and fresh noise each step; the last step, to
sigma 0, returns the denoised estimate. Its noise is a NoiseSampler (Sampler.brownian): A1111 passes
a Brownian tree per image. A1111's "Automatic" schedule is Exponential."""

from torch import Tensor

from .schedule import AfterStep, NoiseSampler, NoiseSchedule, SigmaDenoiser, StepPlan
from .sigmas import automatic_plan

ETA = 1.0


def plan(schedule: NoiseSchedule, steps: int, karras: bool = False) -> StepPlan:
    return automatic_plan(schedule, steps, "DPM++ 2M SDE", karras)


def sample(
    model: SigmaDenoiser,
    x: Tensor,
    sigmas: Tensor,
    noise: NoiseSampler,
    after_step: AfterStep = None,
    solver: str = "midpoint",
) -> Tensor:
    """`solver` "heun" is A1111's "DPM++ 2M SDE Heun" (dpmpp_2m_sde_heun)."""
    previous, h_last = None, None  # the last step's denoised estimate and log-sigma step
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, i)
        h = None
        if s_next == 0:
            x = denoised
        else:
            h = s.log() - s_next.log()
            eta_h = ETA * h
            decay = (-h - eta_h).expm1().neg()
            x = s_next / s * (-eta_h).exp() * x + decay * denoised
            if previous is not None:
                r = h_last / h
                if solver == "heun":
                    x = x + (decay / (-h - eta_h) + 1) * (1 / r) * (denoised - previous)
                else:
                    x = x + 0.5 * decay * (1 / r) * (denoised - previous)
            x = x + noise(s, s_next) * s_next * (-2 * eta_h).expm1().neg().sqrt()
        previous, h_last = denoised, h
        if after_step:
            x = after_step(i, x)
    return x
