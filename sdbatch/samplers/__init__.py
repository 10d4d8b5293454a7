"""The samplers, by the names job files use. Each sampler module has `plan(schedule, steps[, karras])`
and `sample(model, x, sigmas, noise, after_step)`; see schedule.py for the conventions.

The k-diffusion samplers (heun, dpm2, ..., dpmpp_3m_sde) follow k-diffusion and A1111 instead of
diffusers: their plans are A1111's (sigmas.py: its "Automatic" schedule, or Karras), some call the
model between the plan's sigmas (model(x, i, sigma): a SigmaDenoiser), and the `brownian` ones take a
NoiseSampler noise(sigma, sigma_next) (A1111's per-image Brownian tree, brownian.py) instead of noise().

The "timestep" samplers ddim, plms and unipc walk diffusers' plans under `compat: diffusers` (DDIMScheduler,
PNDMScheduler, UniPCMultistepScheduler as SD 1.x configures them) and A1111's under `compat: a1111`
(timesteps.py: its grid 1, 1 + 1000 // steps, ..., its img2img rule, its UniPC variant); their
`sample` is the same for both, the plan carries the difference.

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
    brownian: bool = False  # its noise is a NoiseSampler noise(sigma, sigma_next), not noise()
    # two model calls a step: A1111 counts prompt-editing steps per model call, over 2 x steps
    second_order: bool = False

    @property
    def a1111_plan(self) -> bool:
        """Planned as A1111 plans k-diffusion samplers (its sigmas and img2img step rule, the LDM
        noise schedule), not as diffusers' schedulers: the k-diffusion samplers (A1111_PLANNED)."""
        return self.name in A1111_PLANNED

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
        # the k-diffusion samplers, as A1111 drives them
        Sampler("lms", "LMS", ancestral=False, karras=True, aliases=("k_lms",)),
        Sampler("heun", "Heun", ancestral=False, karras=True, aliases=("k_heun",), second_order=True),
        Sampler("dpm2", "DPM2", ancestral=False, karras=True, aliases=("k_dpm_2", "dpm_2"), second_order=True),
        Sampler(
            "dpm2_a",
            "DPM2 a",
            ancestral=True,
            karras=True,
            aliases=("k_dpm_2_a", "dpm_2_a", "dpm2_ancestral", "dpm_2_ancestral"),
            second_order=True,
        ),
        Sampler(
            "dpmpp_2s_a",
            "DPM++ 2S a",
            ancestral=True,
            karras=True,
            aliases=("k_dpmpp_2s_a", "dpm++_2s_a", "dpmpp_2s_ancestral"),
            second_order=True,
        ),
        Sampler(
            "dpmpp_sde",
            "DPM++ SDE",
            ancestral=True,
            karras=True,
            aliases=("k_dpmpp_sde", "dpm++_sde"),
            brownian=True,
            second_order=True,
        ),
        Sampler(
            "dpmpp_2m_sde",
            "DPM++ 2M SDE",
            ancestral=True,
            karras=True,
            aliases=("k_dpmpp_2m_sde", "dpm++_2m_sde"),
            brownian=True,
        ),
        Sampler(
            "dpmpp_2m_sde_heun",
            "DPM++ 2M SDE Heun",
            ancestral=True,
            karras=True,
            aliases=("k_dpmpp_2m_sde_heun", "dpm++_2m_sde_heun"),
            brownian=True,
        ),
        Sampler(
            "dpmpp_3m_sde",
            "DPM++ 3M SDE",
            ancestral=True,
            karras=True,
            aliases=("k_dpmpp_3m_sde", "dpm++_3m_sde"),
            brownian=True,
        ),
        # A1111's other timestep samplers (with ddim): diffusers' PNDM (PLMS) and UniPC, or A1111's own
        Sampler("plms", "PLMS", ancestral=False, karras=False, aliases=("pndm",)),
        Sampler("unipc", "UniPC", ancestral=False, karras=False, aliases=("uni_pc",)),
    )
}
# A1111's schedule types (`Schedule type:`): our name -> A1111's label; "automatic" is each sampler's own
SCHEDULE_LABELS = {
    "automatic": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "polyexponential": "Polyexponential",
    "sgm_uniform": "SGM Uniform",
    "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps",
    "simple": "Simple",
    "normal": "Normal",
    "ddim": "DDIM",
    "beta": "Beta",
}
# the samplers that walk fixed timesteps as diffusers' schedulers do, with no A1111 counterpart here
DIFFUSERS_ONLY = frozenset(("ddpm", "lcm"))
# A1111's "timestep" samplers (modules/sd_samplers_timesteps.py): diffusers' plans under compat diffusers,
# A1111's timestep grid under compat a1111 (timesteps.py); no schedule type applies to them
A1111_TIMESTEPS = frozenset(("ddim", "plms", "unipc"))
# the k-diffusion samplers of the table
A1111_PLANNED = frozenset(
    ("lms", "heun", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")
)
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
    if name in (
        "AfterStep",
        "Denoiser",
        "NoiseSampler",
        "NoiseSchedule",
        "NoiseSource",
        "SigmaDenoiser",
        "StepPlan",
        "a1111_img2img",
        "img2img_start",
    ):
        from . import schedule

        return getattr(schedule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "KARRAS",
    "SAMPLERS",
    "SAMPLER_NAMES",
    "AfterStep",
    "Denoiser",
    "NoiseSampler",
    "NoiseSchedule",
    "NoiseSource",
    "Sampler",
    "SigmaDenoiser",
    "StepPlan",
    "a1111_img2img",
    "get_sampler",
    "img2img_start",
]
