"""DPM-Solver++(3M) SDE (`sample_dpmpp_3m_sde`, A1111's "DPM++ 3M SDE", eta 1): third-order multistep
from the last three denoised estimates (lower orders on the first steps), exponential damping and
fresh noise each step; the last step, to sigma 0, returns the denoised estimate. Its noise is a
NoiseSampler (Sampler.brownian): A1111 passes a Brownian tree per image. A1111 drops the next-to-last
sigma; its "Automatic" schedule is Exponential."""

from torch import Tensor

from .schedule import AfterStep, NoiseSampler, NoiseSchedule, SigmaDenoiser, StepPlan
from .sigmas import automatic_plan

ETA = 1.0


def plan(schedule: NoiseSchedule, steps: int, karras: bool = False) -> StepPlan:
    return automatic_plan(schedule, steps, "DPM++ 3M SDE", karras)


def sample(
    model: SigmaDenoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler, after_step: AfterStep = None
) -> Tensor:
    denoised_1, denoised_2 = None, None  # the last two steps' estimates, newest first
    h_1, h_2 = None, None  # and their log-sigma steps
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, i)
        h = None
        if s_next == 0:
            x = denoised
        else:
            h = s.log() - s_next.log()
            h_eta = h * (ETA + 1)
            x = (-h_eta).exp() * x + (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            x = x + noise(s, s_next) * s_next * (-2 * h * ETA).expm1().neg().sqrt()
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        if after_step:
            x = after_step(i, x)
    return x
