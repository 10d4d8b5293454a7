"""PLMS / PNDM without its Runge-Kutta warm-up (Liu et al. 2022, "pseudo linear multistep"):
DDIM steps (Euler steps in VE space) on an Adams-Bashforth combination of the eps of up to the last
4 steps; the first step is made twice, the second time with the mean of the eps at its start and at
its end ("pseudo improved Euler").

diffusers: `PNDMScheduler` as SD 1.x configures it (skip_prk_steps, steps_offset 1, set_alpha_to_one
False): timesteps 981, 961, 961, 941, ..., 1 for 50 steps, the first step's end listed twice, one model
call each (steps + 1 calls), ending at the schedule's smallest sigma as DDIM does.
A1111 ("PLMS", compat a1111): the same algorithm on A1111's grid, see timesteps.py.

The plan lists the model calls, so its "steps" are calls: call 0 steps from sigmas[0] to sigmas[1];
call 1 makes that first step again from the first latent (the correction) and the latent it gives is
taken as the VP latent at sigmas[2]; call i >= 2 steps from sigmas[i] to sigmas[i + 1]. In txt2img
sigmas[2] is sigmas[1]. In diffusers' img2img (`timesteps[t_start:]` of that list) it is the next
level down: after the correction diffusers tells the UNet the next timestep and steps from there,
one grid level lower than the latent is, and so do we. (When int(steps * strength) = steps - 1
diffusers' run starts at the repeated timestep and its correction steps from the level above the
run, which the plan does not hold: there this sampler does not reproduce diffusers.)
"""

import numpy as np
from torch import Tensor

from .schedule import AfterStep, Denoiser, NoiseSchedule, NoiseSource, StepPlan

# Adams-Bashforth weights of the newest eps first, by how many there are
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def plan(schedule: NoiseSchedule, steps: int) -> StepPlan:
    t = schedule.leading(steps, offset=1)  # 981, 961, ..., 1 for 50 steps
    calls = np.concatenate([t[:2], t[1:]]) if steps > 1 else t
    # after t = 1 diffusers steps to its final alpha, alphas_cumprod[0] (set_alpha_to_one=False)
    return StepPlan.of(calls, schedule.sigmas[calls.astype(np.int64)], float(schedule.sigmas[0]), vp_init=True)


def sample(
    model: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource = None, after_step: AfterStep = None
) -> Tensor:
    history: list[Tensor] = []  # the eps of the steps, oldest first (not the correction's)
    first = x
    for i in range(len(sigmas) - 1):
        eps = (x - model(x, i)) / sigmas[i]
        if i == 1:  # the first step again, with the mean slope, from where it began
            x = first + (eps + history[-1]) / 2 * (sigmas[1] - sigmas[0])
            x = x * ((1 + sigmas[2] ** 2) / (1 + sigmas[1] ** 2)).sqrt()  # the same VP latent, at sigmas[2]
        else:
            history = [*history[-3:], eps]
            slope = sum(w * e for w, e in zip(ADAMS_BASHFORTH[len(history)], reversed(history), strict=False))
            x = x + slope * (sigmas[i + 1] - sigmas[i])
        if after_step:
            x = after_step(i, x)
    return x
