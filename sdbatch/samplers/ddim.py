"""DDIM with eta = 0 (Song et al. 2021): deterministic; on DDIM's own sigmas it is an Euler step.

compat diffusers: diffusers' DDIMScheduler as SD 1.x configures it (plan below). compat a1111: A1111's
"DDIM" on its grid, one step fewer than the grid has points, ending at t = 1 (timesteps.py)."""

import numpy as np
from torch import Tensor

from . import euler
from .schedule import AfterStep, Denoiser, NoiseSchedule, NoiseSource, StepPlan


def plan(schedule: NoiseSchedule, steps: int) -> StepPlan:
    # 981, 961, ..., 1 for 50 steps: the original CompVis DDIM sampler's +1 offset, which diffusers'
    # SD pipelines also force (steps_offset=1)
    t = schedule.leading(steps, offset=1)
    # the last step lands on the schedule's smallest sigma, not 0 (SD's set_alpha_to_one=False)
    return StepPlan.of(t, schedule.sigmas[t.astype(np.int64)], float(schedule.sigmas[0]), vp_init=True)


def sample(
    model: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource = None, after_step: AfterStep = None
) -> Tensor:
    return euler.sample(model, x, sigmas, after_step=after_step)
