"""DPM++ 2M SDE with the Heun-type correction (A1111's "DPM++ 2M SDE Heun": k-diffusion's
`sample_dpmpp_2m_sde` with solver_type "heun"). A1111's "Automatic" schedule is Exponential."""

from functools import partial

from . import dpmpp_2m_sde
from .schedule import NoiseSchedule, StepPlan
from .sigmas import automatic_plan


def plan(schedule: NoiseSchedule, steps: int, karras: bool = False) -> StepPlan:
    return automatic_plan(schedule, steps, "DPM++ 2M SDE Heun", karras)


sample = partial(dpmpp_2m_sde.sample, solver="heun")
