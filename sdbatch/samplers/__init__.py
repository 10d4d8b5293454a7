"""The samplers, by the names job files use. Each sampler module has `plan(schedule, steps[, karras])`
and `sample(model, x, sigmas, noise, after_step)`; see schedule.py for the conventions.

This table is torch-free (the modules load on first use), so jobs can check sampler names and
write A1111 names without importing torch.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .schedule import NoiseSchedule, StepPlan


@dataclass(frozen=True)
class Sampler:
    name: str
    a1111: str  # its name in A1111's infotext (`Sampler: Euler a`)
    ancestral: bool  # draws fresh noise at each step
    karras: bool  # accepts Karras sigmas
    aliases: tuple[str, ...] = ()  # other spellings people write (lower case)
    max_steps: int = 1000  # lcm: its 50-timestep distillation grid

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f".{self.name}", __name__)

    def check(self, karras: bool) -> None:
        if karras and not self.karras:
            raise ValueError(f"sampler {self.name} walks fixed timesteps; karras applies to {', '.join(KARRAS)}")

    def plan(self, schedule: "NoiseSchedule", steps: int, karras: bool = False) -> "StepPlan":
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        self.check(karras)
        return self.module.plan(schedule, steps, karras) if self.karras else self.module.plan(schedule, steps)

    @property
    def sample(self) -> Callable:
        return self.module.sample


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("ddpm", "DDPM", ancestral=True, karras=False),
        Sampler("ddim", "DDIM", ancestral=False, karras=False),
        Sampler("euler", "Euler", ancestral=False, karras=True, aliases=("k_euler",)),
        Sampler(
            "euler_a",
            "Euler a",
            ancestral=True,
            karras=True,
            aliases=("euler_ancestral", "euler ancestral", "k_euler_a"),
        ),
        Sampler("dpmpp_2m", "DPM++ 2M", ancestral=False, karras=True, aliases=("dpm++_2m", "dpmpp2m", "k_dpmpp_2m")),
        Sampler("lcm", "LCM", ancestral=True, karras=False, aliases=("k_lcm",), max_steps=50),
    )
}
KARRAS = [name for name, s in SAMPLERS.items() if s.karras]
# every spelling (lower case) -> our name: our names, A1111's names, and the aliases
SAMPLER_NAMES = {spelling: s.name for s in SAMPLERS.values() for spelling in (s.name, s.a1111.lower(), *s.aliases)}


def get_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}") from None


def __getattr__(name: str):
    """The schedule's names, imported (with torch) only when a sampler is actually used."""
    if name in ("AfterStep", "Denoiser", "NoiseSchedule", "NoiseSource", "StepPlan", "img2img_start"):
        from . import schedule

        return getattr(schedule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "KARRAS",
    "SAMPLERS",
    "SAMPLER_NAMES",
    "AfterStep",
    "Denoiser",
    "NoiseSchedule",
    "NoiseSource",
    "Sampler",
    "StepPlan",
    "get_sampler",
    "img2img_start",
]
