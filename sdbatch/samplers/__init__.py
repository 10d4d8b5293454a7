"""The samplers, by the names job files use. Each module has `plan(schedule, steps[, karras])` and
`sample(model, x, sigmas, noise)`; see schedule.py for the conventions."""

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from . import ddim, ddpm, dpmpp_2m, euler, euler_a
from .schedule import AfterStep, Denoiser, NoiseSchedule, NoiseSource, Plan, img2img_start


@dataclass(frozen=True)
class Sampler:
    name: str
    module: ModuleType
    ancestral: bool  # draws fresh noise at each step
    karras: bool  # accepts Karras sigmas

    def check(self, karras: bool) -> None:
        if karras and not self.karras:
            raise ValueError(f"sampler {self.name} walks fixed timesteps; karras applies to {', '.join(KARRAS)}")

    def plan(self, schedule: NoiseSchedule, steps: int, karras: bool = False) -> Plan:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        self.check(karras)
        return self.module.plan(schedule, steps, karras) if self.karras else self.module.plan(schedule, steps)

    @property
    def sample(self) -> Callable:
        return self.module.sample


SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler("ddpm", ddpm, ancestral=True, karras=False),
    "ddim": Sampler("ddim", ddim, ancestral=False, karras=False),
    "euler": Sampler("euler", euler, ancestral=False, karras=True),
    "euler_a": Sampler("euler_a", euler_a, ancestral=True, karras=True),
    "dpmpp_2m": Sampler("dpmpp_2m", dpmpp_2m, ancestral=False, karras=True),
}
KARRAS = [name for name, s in SAMPLERS.items() if s.karras]


def get_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}") from None


__all__ = [
    "KARRAS",
    "SAMPLERS",
    "AfterStep",
    "Denoiser",
    "NoiseSchedule",
    "NoiseSource",
    "Plan",
    "Sampler",
    "get_sampler",
    "img2img_start",
]
