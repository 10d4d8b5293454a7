"""The recipe: every parameter that decides an image's pixels (given the model), in one place.

Adding a parameter means exactly four things, and nothing else:
  1. a field of `Recipe`, with its default and a one-line doc (`param(default, doc)`);
  2. its rule in `RULES` (one value) or `Recipe.problems` (a rule across fields);
  3. its YAML parser in `sdbatch.jobs.fields.PARSERS`;
  4. its A1111 infotext key in `A1111_KEYS`, if A1111 has one.
The manifest record, the `sdbatch` PNG chunk, task ids, `rerun`, file-name tokens and contact-sheet
axes are all derived from the fields. `tests/test_recipe.py` walks the fields and round-trips each
one through every one of those, so a field forgotten anywhere fails it.

Torch-free: validating and planning a job never import torch.
"""

import hashlib
import importlib.util
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field, fields, replace
from functools import lru_cache
from typing import Any

from .errors import InputError
from .hires import Target, builtin, unsupported
from .hires import a1111_name as a1111_upscaler
from .hires import target as hires_target
from .images import RESIZE_MODES
from .output.a1111 import format_infotext, number_text, parse_infotext
from .prompts import old_timeline_differs, prompt_problem
from .prompts.networks import LoraTag, lora_tags, name_problem, strip_networks, weight_problem
from .samplers import A1111_TIMESTEPS, DIFFUSERS_ONLY, SAMPLER_NAMES, SAMPLERS, SCHEDULE_LABELS
from .text import printable, text_problem

MAX_SIDE = 8192


class RecipeError(InputError):
    """A recipe that cannot be rendered; the message names the field and says why."""


def param(default: Any, doc: str, *, file: bool = False) -> Any:
    """A recipe field. `file=True`: the value is a path whose contents (not its name) enter the id."""
    return field(default=default, metadata={"doc": doc, "file": file})


# Fields are declared in the order a job's product expands them: the first varies slowest, `seed`
# (declared last) fastest, so consecutive images of a grid differ in their seed first.
@dataclass(frozen=True)
class Recipe:
    prompt: str = param("", "what to draw")
    negative: str = param("", "the unconditional prompt of classifier-free guidance")
    emphasis: str = param("original", "how (x:1.2) weights apply: original (A1111), no-norm, ignore, none, comfy")
    clip_skip: int = param(1, "A1111's Clip skip: 1 = the text encoder's last layer, N = skip the last N-1")
    lora: tuple[tuple[str, float, float], ...] = param(
        (), "LoRAs merged into the model: (name, text-encoder weight, UNet weight); prompt <lora:> tags add more"
    )
    init_image: str | None = param(None, "img2img / inpainting: the image to start from (a path)", file=True)
    mask: str | None = param(None, "inpainting: white = repaint (a path); needs init_image", file=True)
    size: tuple[int, int] = param((512, 512), "(width, height) in pixels, multiples of 8")
    resize: str | None = param(None, "an init image of another shape: just (stretch), crop, fill; None refuses it")
    sampler: str = param("euler_a", "sampler name (sdbatch.samplers)")
    karras: bool = param(False, "Karras sigmas instead of the sampler's own schedule (= schedule: karras)")
    schedule: str = param("automatic", "A1111's schedule type: automatic (the sampler's own), uniform, karras, ...")
    compat: str = param("diffusers", "whose conventions: diffusers (its schedulers' timesteps) or a1111 (its sigmas)")
    downcast_alphas: bool = param(
        False,
        "A1111's Downcast alphas_cumprod (its images before v1.7): the noise schedule rounded to fp16, as run then",
    )
    steps: int = param(30, "sampler steps (img2img runs the last int(steps * strength))")
    strength: float | None = param(
        None, "img2img / inpainting: how much of the schedule is re-run; hires fix: its denoise; else None"
    )
    cfg: float = param(7.5, "classifier-free guidance scale (1 = no guidance, no uncond row)")
    hires_scale: float | None = param(None, "hires fix: upscale the first pass by this (A1111's Hires upscale)")
    hires_size: tuple[int, int] | None = param(
        None, "hires fix: upscale to (width, height) instead; 0 keeps the aspect"
    )
    hires_upscaler: str = param("latent", "hires fix: latent[-bicubic|...], lanczos, nearest, or a model's name")
    hires_steps: int = param(0, "hires fix: second-pass steps (0 = steps); strength is its denoise")
    hires_sampler: str | None = param(None, "hires fix: second-pass sampler (None = sampler)")
    hires_schedule: str | None = param(None, "hires fix: second-pass schedule type (None = schedule)")
    hires_prompt: str | None = param(None, "hires fix: second-pass prompt (None = prompt)")
    hires_negative: str | None = param(None, "hires fix: second-pass negative prompt (None = negative)")
    hires_cfg: float | None = param(None, "hires fix: second-pass CFG scale (None = cfg)")
    rng: str = param("diffusers", "noise: diffusers (CPU generator, diffusers' order), a1111 (A1111's GPU), a1111-cpu")
    ensd: int = param(0, "A1111's ENSD (eta noise seed delta): draws after the first come from seed + ensd")
    seed_resize_from: tuple[int, int] | None = param(None, "A1111's Seed resize from: noise drawn at this size")
    subseed_strength: float = param(0.0, "A1111's Variation seed strength: slerp of the seed's noise to the subseed's")
    subseed: int = param(0, "A1111's Variation seed (applies when subseed_strength > 0)")
    seed: int = param(0, "seeds the image's own noise generator: 0 .. 2**64-1")

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    @property
    def mode(self) -> str:
        if self.init_image is None:
            return "txt2img"
        return "img2img" if self.mask is None else "inpaint"

    def batch_key(self) -> tuple:
        """Recipes with equal keys share every UNet call; prompts, seeds and CFG may differ (the
        LoRAs may not: they are merged into the weights every image of a batch goes through)."""
        noise = (self.rng, self.ensd)  # one noise source per batch
        plan = (self.steps, self.sampler, self.karras, self.schedule, self.compat, self.downcast_alphas)
        hires = (self.hires_scale, self.hires_size, self.hires_upscaler, self.hires_steps, self.hires_sampler)
        return (*plan, self.size, self.mode, self.strength, self.loras(), noise, *hires, self.hires_schedule)

    @property
    def output_size(self) -> tuple[int, int]:
        """The image's size: the hires fix's target, else `size`."""
        return self.hires_target().size if self.hires else self.size

    @property
    def hires(self) -> bool:
        """Rendered in two passes (A1111's hires fix): a hires scale or size is set."""
        return self.hires_scale is not None or self.hires_size is not None

    def hires_target(self) -> Target:
        """The second pass's size (A1111's rule; `sdbatch.hires.target`)."""
        return hires_target(self.size, self.hires_scale, self.hires_size)

    def second_pass(self) -> "Recipe":
        """The hires fix's second pass as a recipe of its own: img2img at `strength` from the
        upscaled first pass, at the target size, with the hires overrides applied. Its init image is
        the first pass (a label, never a file: the pipeline hands it the latents)."""
        schedule = self.hires_schedule
        if schedule is None and self.hires_sampler in A1111_TIMESTEPS | DIFFUSERS_ONLY:
            schedule = "automatic"  # a sampler of fixed timesteps: the first pass's schedule does not apply
        return replace(
            self,
            prompt=self.prompt if self.hires_prompt is None else self.hires_prompt,
            negative=self.negative if self.hires_negative is None else self.hires_negative,
            init_image=FIRST_PASS,
            mask=None,
            size=self.hires_target().size,
            sampler=self.hires_sampler or self.sampler,
            karras=self.karras if schedule is None else False,
            schedule=self.schedule if schedule is None else schedule,
            steps=self.hires_steps or self.steps,
            cfg=self.cfg if self.hires_cfg is None else self.hires_cfg,
            **{name: DEFAULTS[name] for name in HIRES},
        )

    @property
    def a1111_sigmas(self) -> bool:
        """Planned as A1111 plans (its sigmas, its img2img rule): the k-diffusion samplers always,
        the others under `compat: a1111` (ddim, plms, unipc: A1111's timestep grid) or with a
        schedule type of their own."""
        sampler = SAMPLERS.get(self.sampler)
        return bool(sampler and sampler.a1111_plan) or self.compat == "a1111" or self.schedule != "automatic"

    def loras(self) -> tuple[tuple[str, float, float], ...]:
        """Every LoRA this image merges: the prompt's `<lora:...>` tags first (in A1111's order),
        then the `lora` field's. ValueError for a tag that cannot be applied (see `problems`)."""
        return tuple((t.name, t.te, t.unet) for t in lora_tags(self.prompt)) + self.lora

    # -- rules

    def problems(self) -> Iterator[tuple[str, str]]:
        """(field, message) for every rule this recipe breaks: each field's own rule, then the rules
        across fields. The only copy of the rules: jobs, rerun and the pipeline all use it."""
        own = list(self._field_problems())
        if own:  # the rules across fields assume each value is of its type: a list for a sampler,
            yield from own  # NaN for a strength (from a damaged file) would break them, not be reported
            return
        yield from self._own_problems()
        yield from self._hires_problems()

    def _field_problems(self) -> Iterator[tuple[str, str]]:
        """Each field's own rule; a rule that cannot even look at the value (a list where a name
        belongs: unhashable) reports the value as being of the wrong type."""
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                message = RULES[f.name](value)
            except (TypeError, ValueError, OverflowError):
                message = f"not a valid value ({type(value).__name__} {printable(repr(value))[:60]})"
            if message:
                yield f.name, message

    def _own_problems(self, second_pass: bool = False) -> Iterator[tuple[str, str]]:
        """The rules of one pass (`second_pass`: hires' second, whose strength rules are its own)."""
        yield from self._field_problems()
        if self.karras and self.sampler in SAMPLERS and not SAMPLERS[self.sampler].karras:
            yield "karras", f"karras does not apply to {self.sampler} (fixed timesteps)"
        if self.karras and self.schedule not in ("automatic", "karras"):
            yield "schedule", f"karras: true is schedule: karras; it cannot be combined with schedule: {self.schedule}"
        if self.sampler in DIFFUSERS_ONLY | A1111_TIMESTEPS and self.schedule != "automatic":
            yield "schedule", f"{self.sampler} walks fixed timesteps: schedule types apply to the k-diffusion samplers"
        elif self.sampler in DIFFUSERS_ONLY and self.compat == "a1111":
            yield "compat", f"{self.sampler} walks diffusers' fixed timesteps: no A1111 compat for it yet"
        limit = SAMPLERS[self.sampler].max_steps if self.sampler in SAMPLERS else 1000
        if isinstance(self.steps, int) and self.steps > limit:
            yield "steps", f"{self.sampler} takes at most {limit} steps (its timestep grid), got {self.steps}"
        for name in ("prompt", "negative"):
            text = getattr(self, name)
            steps = None if second_pass else self.steps  # the second pass's edits count on from the first's
            if isinstance(text, str) and (message := _prompt_problem(text, steps, name == "negative")):
                yield name, message
        if isinstance(self.prompt, str) and _text(self.prompt) is None and RULES["lora"](self.lora) is None:
            try:
                names = [name for name, _, _ in self.loras()]
            except ValueError as e:
                yield "prompt", str(e)
            else:
                if twice := sorted({n for n in names if names.count(n) > 1}):
                    where = "lora" if twice[0] in [n for n, _, _ in self.lora] else "prompt"
                    yield where, f"LoRA {twice[0]!r} is named twice (in the prompt or the lora field); name it once"
        if self.rng != "diffusers" and self.sampler in SAMPLERS and SAMPLERS[self.sampler].brownian and not _torchsde():
            yield "sampler", f"{self.sampler} with A1111's noise needs torchsde: pip install 'sdbatch[a1111]'"
        a1111_only = [n for n in ("ensd", "seed_resize_from", "subseed_strength") if getattr(self, n) != DEFAULTS[n]]
        if self.rng == "diffusers" and a1111_only:
            yield a1111_only[0], "follows A1111's noise: set rng: a1111 (or a1111-cpu)"
        if self.downcast_alphas and not self.a1111_sigmas:
            yield (
                "downcast_alphas",
                f"is A1111's noise schedule: set compat: a1111 (or a k-diffusion sampler, not {self.sampler})",
            )
        if self.mask is not None and self.init_image is None:
            yield "mask", "a mask needs an init_image to repaint"
        if self.resize is not None and self.init_image is None:
            yield "resize", "applies to images with an init_image (img2img, inpainting) only"
        if second_pass:
            return
        if self.init_image is None and self.strength is not None and not self.hires:
            yield "strength", "applies to images with an init_image (img2img, inpainting) or hires fix only"
        elif self.init_image is not None and self.strength is None:
            yield "strength", "is needed with an init_image: how much of the schedule to re-run"
        elif self.strength is not None and not self.hires and int(self.steps * self.strength) < 1:
            yield "strength", f"strength {self.strength:g} of {self.steps} steps runs no step at all"
        elif self.compat == "a1111" and self.sampler in A1111_TIMESTEPS and isinstance(self.steps, int):
            strength = self.strength if self.init_image is not None else None
            if _timestep_calls(self.sampler, self.steps, strength) < 1:
                field = "steps" if strength is None else "strength"
                yield field, f"{self.sampler} under compat a1111 runs no step at all here (A1111's timestep grid)"

    def _hires_problems(self) -> Iterator[tuple[str, str]]:
        """Hires fix's rules: txt2img only, a denoise, a target of whole latent cells, and the
        second pass's own recipe (its sampler, steps, prompt ...), reported at the hires field."""
        if not self.hires:
            unused = [n for n in HIRES if getattr(self, n) != DEFAULTS[n]]
            if unused:
                yield unused[0], "applies with hires fix only: give hires a scale or a resize"
            return
        where = "hires_size" if self.hires_size is not None else "hires_scale"
        if self.hires_scale is not None and self.hires_size is not None:
            yield "hires_size", "give hires a scale or a resize, not both"
            return
        if any(RULES[n](getattr(self, n)) for n in (*HIRES, "size", "prompt", "negative", "sampler", "steps")):
            return  # a value's own rule is reported already
        if self.init_image is not None:
            yield where, "hires fix renders txt2img only (as in A1111); for img2img, give the size you want"
            return
        if self.strength is None:
            yield "strength", "hires fix needs its denoise (hires: denoise: 0.5)"
            return
        goal = self.hires_target()
        if problem := _size(goal.size) or _size(goal.cells):
            yield where, f"the second pass would be {problem}"
            return
        first = {message for _, message in self._own_problems()}
        try:
            same_loras = self.hires_prompt is None or lora_tags(self.hires_prompt) == lora_tags(self.prompt)
        except ValueError as e:
            yield "hires_prompt", str(e)
            return
        if not same_loras:
            yield "hires_prompt", "its <lora:...> tags differ from the prompt's; both passes use the prompt's LoRAs"
        second = self.second_pass()
        for name, message in second._own_problems(second_pass=True):
            if message not in first:
                yield SECOND_PASS_FIELDS.get(name, where), f"second pass: {message}"
        if not second.a1111_sigmas and int(second.steps * self.strength) < 1:  # diffusers' rule: int(steps * s)
            yield "strength", f"denoise {self.strength:g} of {second.steps} hires steps runs no step at all"
        elif second.compat == "a1111" and second.sampler in A1111_TIMESTEPS:
            if _timestep_calls(second.sampler, second.steps, self.strength, fixed=True) < 1:
                yield "hires_steps", f"{second.sampler}'s second pass of {second.steps} steps runs no step (A1111)"
            elif (total := int(second.steps / min(self.strength, 0.999))) > 1000:
                yield "strength", f"{second.steps} hires steps at denoise {self.strength:g} make {total} (at most 1000)"

    def check(self, where: str = "") -> "Recipe":
        """The recipe itself, or RecipeError naming every rule it breaks (after `where`)."""
        found = [f"{name}: {message}" for name, message in self.problems()]
        if found:
            raise RecipeError(where + "; ".join(found))
        return self

    # -- the manifest record and the `sdbatch` PNG chunk

    def to_record(self) -> dict[str, Any]:
        """Every field by name, as JSON values (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_record(cls, record: dict[str, Any], where: str = "") -> "Recipe":
        """Inverse of `to_record`; a field the record lacks takes its default (older files), a value
        of the wrong type or one that breaks a rule is a RecipeError naming it. The fields every
        sdbatch record has held since 0.1.0 must be there: a record without its prompt, size or
        seed is damaged, not a request for the defaults' 512x512 picture."""
        values = {}
        for f in fields(cls):
            if f.name in record:
                try:
                    values[f.name] = _coerce(f.name, record[f.name])
                except (TypeError, ValueError) as e:
                    raise RecipeError(f"{where}{f.name}: {e}") from None
        recipe = cls(**values).check(where)
        if missing := [name for name in _ID_V1 if name not in record]:
            raise RecipeError(f"{where}the record lacks {', '.join(missing)}")
        return recipe

    # -- ids

    def task_id(self, model_id: str, digest: Callable[[str], str], addons: list | None = None) -> str:
        """16 hex digits naming this image across runs: sha256 of the recipe (file fields by their
        contents' `digest`), the model, and the add-ons' contents (`Addons.id_data`: LoRAs and the
        embeddings the prompts name). Fields added after 0.1.0 enter only when they differ from
        their default, so adding a parameter never changes the ids of images already rendered."""
        data: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in _ID_V1 and value == f.default:
                continue
            if f.metadata["file"] and value is not None:
                value = digest(value)
            if f.name == "size":  # 0.1.0 ids spelled the size as two numbers
                data["width"], data["height"] = value
            else:
                data[f.name] = value
        data["model"] = model_id
        if addons:
            data["addons"] = addons
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    # -- A1111's `parameters` text

    def to_a1111(self, model: dict[str, str], version: str, extra: dict[str, str] | None = None) -> str:
        """The infotext A1111 writes (create_infotext), which its PNG Info tab and civitai read.
        `model` gives `Model hash` and `Model`, written after `Size` as A1111 does; `extra` (the
        add-ons' `Lora hashes`, `TI hashes`) goes before `Version`. The `lora` field has no key
        in A1111: its LoRAs are written as tags at the end of the prompt, which A1111 strips
        before CLIP sees the text, so A1111 renders the same picture from it."""
        pairs: dict[str, Any] = {}
        for name, (key, write, _) in A1111_KEYS.items():
            if name in HIRES and not self.hires:
                continue  # the hires keys say nothing without hires fix (hires_upscaler has a default)
            value = write(getattr(self, name))
            if value is not None or key not in pairs:  # karras and schedule share `Schedule type`
                pairs[key] = value
            if key == "Size":
                pairs |= model
        pairs |= extra or {}
        pairs["Version"] = f"sdbatch {version}"
        prompt = self.prompt + "".join(LoraTag(*lora).text() for lora in self.lora)
        return format_infotext(prompt, self.negative, pairs)

    @classmethod
    def from_a1111(cls, text: str, where: str = "") -> "Recipe":
        """The recipe of an A1111 infotext. A key that would change the picture and that sdbatch
        cannot reproduce is refused by name (never silently dropped); so is a value out of range,
        and an img2img image (its infotext does not name its init image)."""
        values = a1111_values(text, where)
        hires = values.get("hires_scale") is not None or values.get("hires_size") is not None
        if values.get("strength") is not None and not hires:
            raise RecipeError(f"{where}an A1111 img2img image names no init image; render it from a job file")
        return cls(**values).check(where)


def a1111_values(text: str, where: str = "", lenient: bool = False) -> dict[str, Any]:
    """Recipe field values from an A1111 infotext, through `A1111_KEYS`; RecipeError naming every
    key that would change the picture and has no field yet, or a value that does not parse (a number
    that is not finite among them). With `lenient`, such keys (an extension's) are left out instead
    and listed under the key "unreproduced" (key: value); a value that does not parse is still refused."""
    prompt, negative, pairs = parse_infotext(text)
    values: dict[str, Any] = {"prompt": prompt, "negative": negative}
    a1111 = not str(pairs.get("Version", "")).startswith("sdbatch")  # A1111's own text: its conventions
    typed = "Schedule type" in pairs  # A1111 1.9 on: each sampler's schedule is said, not implied by its name
    if a1111:
        pairs = _backcompat(pairs, prompt, negative)
        for key in ("Sampler", "Hires sampler"):  # a schedule in the sampler's name wins (get_sampler_and_scheduler)
            if str(pairs.get(key, "")).strip().endswith((" Karras", " Exponential")):
                pairs.pop(key.replace("sampler", "schedule type").replace("Sampler", "Schedule type"), None)
        for key in ("Seed", "Variation seed"):  # torch's manual_seed and A1111's Philox take a negative
            if re.fullmatch(r"\s*-\d+\s*", str(pairs.get(key, ""))) and int(pairs[key]) != -1:  # -1: "random"
                pairs[key] = str(int(pairs[key]) % 2**64)  # seed as its 64-bit two's complement
    pairs = {k: v for k, v in pairs.items() if str(v).strip() not in A1111_IGNORED_VALUES.get(k, ())}
    unknown = [k for k in pairs if k not in _READERS and k not in A1111_IGNORED and k not in A1111_ADDON_KEYS]
    if unknown and not lenient:
        raise RecipeError(f"{where}sdbatch cannot reproduce these A1111 fields yet: {', '.join(unknown)}")
    dropped = {k: pairs.pop(k) for k in unknown}
    for required in ("Steps", "Sampler", "CFG scale", "Seed", "Size"):
        if required not in pairs:
            raise RecipeError(f"{where}the A1111 parameters lack {required}")
    if a1111:
        values["compat"] = "a1111"
        if "RNG" not in pairs:
            values["rng"] = "a1111"  # A1111 writes no RNG key for its default, the GPU's noise
    for key, raw in pairs.items():
        if key in _READERS:
            try:
                read = _READERS[key](raw)
                if any(isinstance(v, float) and not math.isfinite(v) for v in read.values()):
                    raise ValueError("not a finite number")  # float() reads nan, inf, 1e999
                values |= read
            except (TypeError, ValueError) as e:  # lenient or not: a known key is never left out
                raise RecipeError(f"{where}{key}: {raw!r}: {e}") from None
    # before 1.9 A1111 wrote no Schedule type: a sampler named without " Karras" or " Exponential" used the
    # model's own sigmas (1.9's "Uniform"), and so did a hires sampler (not the first pass's schedule)
    if a1111 and not typed:
        if values.get("sampler") in _UNIFORM_BEFORE_1_9 and not values.get("karras") and "schedule" not in values:
            values["schedule"] = "uniform"
        if "hires_sampler" in values:
            values.setdefault(
                "hires_schedule", "uniform" if values["hires_sampler"] in _UNIFORM_BEFORE_1_9 else "automatic"
            )
    # A1111 writes its Schedule type for DDIM, PLMS and UniPC too, and ignores it: they walk its timestep grid;
    # a hires sampler that uses one takes the main one unless Hires schedule type says otherwise
    if values.get("sampler") in A1111_TIMESTEPS:
        karras, schedule = values.pop("karras", False), values.pop("schedule", None)
        hires_sampler = values.get("hires_sampler")
        kept = hires_sampler and hires_sampler not in A1111_TIMESTEPS and "hires_schedule" not in values
        if kept and (karras or schedule):
            values["hires_schedule"] = "karras" if karras else schedule
    if values.get("hires_sampler") in A1111_TIMESTEPS:
        values.pop("hires_schedule", None)
    if lenient:
        values["unreproduced"] = dropped
    return values


def a1111_version(text: str) -> tuple[int, int, int, int, int] | None:
    """A1111's `Version` as infotext_versions.parse_version reads it (the text up to its second '-',
    then a version): v1.7.0-225-g1234 -> (1, 7, 0, 1, 225), 1.8.0-RC -> (1, 8, 0, -1, 0); None
    for what it cannot read (Forge's f0.0.17v1.8.0rc-..., classic, neo), as A1111 gives None."""
    cut = re.match(r"([^-]+-[^-]+)-.*", text.strip())
    text = cut.group(1) if cut else text.strip()
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:[-.]?(rc|RC|post)?(\d*))?", text)
    if m is None:
        return None
    major, minor, patch, tag, number = m.groups()
    kind = -1 if tag in ("rc", "RC") else 1 if (tag == "post" or number) else 0
    return int(major), int(minor), int(patch or 0), kind, int(number or 0)


def _backcompat(pairs: dict[str, str], prompt: str, negative: str) -> dict[str, str]:
    """The options A1111 turns on for a text of an older version (infotext_versions.backcompat, which
    it runs when it reads an infotext): as keys, so that each is reproduced, or refused by name where
    it would change this picture and sdbatch does not follow it."""
    version = a1111_version(str(pairs.get("Version", "")))
    if version is None:
        return pairs
    pairs = dict(pairs)
    texts = [prompt, negative, str(pairs.get("Hires prompt", "")), str(pairs.get("Hires negative prompt", ""))]
    hires = "Hires upscale" in pairs or "Hires resize" in pairs
    old = version < (1, 6, 0, 0, 0)
    implied = f" (A1111 implies it for Version {str(pairs['Version']).strip()})"
    edits_change = "[" in prompt and any(old_timeline_differs(t, hires) for t in texts)
    if old and edits_change and "Old prompt editing timelines" not in pairs:
        pairs["Old prompt editing timelines" + implied] = "True"
    ddim = str(pairs.get("Sampler", "")).strip() in ("DDIM", "PLMS")
    if old and ddim and "Pad conds v0" not in pairs:
        pairs["Pad conds v0" + implied] = "True"  # the uncond cut or padded to the cond's length
    if version < (1, 7, 0, 1, 225):
        pairs.setdefault("Downcast alphas_cumprod", "True")
    return pairs


# the hires fix's fields; the second pass's fields -> the hires field that sets them (for messages)
HIRES = tuple(f.name for f in fields(Recipe) if f.name.startswith("hires_"))
SECOND_PASS_FIELDS = {
    "prompt": "hires_prompt",
    "negative": "hires_negative",
    "sampler": "hires_sampler",
    "karras": "hires_sampler",
    "compat": "hires_sampler",
    "schedule": "hires_schedule",
    "steps": "hires_steps",
    "cfg": "hires_cfg",
}
FIRST_PASS = "(first pass)"  # the second pass's init image: the first pass's latents or image, never a file
_ID_V1 = ("prompt", "negative", "init_image", "mask", "size", "sampler", "karras", "steps", "strength", "cfg", "seed")
FIELDS = tuple(f.name for f in fields(Recipe))
DEFAULTS = {f.name: f.default for f in fields(Recipe) if f.default is not MISSING}
DOCS = {f.name: f.metadata["doc"] for f in fields(Recipe)}


# ----------------------------------------------------------------------------------------------------
# one value's rule per field: a message when the value is wrong, else None


def _text(value: Any) -> str | None:
    return text_problem(value, multiline=True) if isinstance(value, str) else f"must be text, got {value!r}"


def _path(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value):
        return None if value is None else text_problem(value)
    return f"must be a path, got {value!r}"


def _whole(low: int, high: int, what: str) -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            return f"{value} is out of range: must be {what}"
        return None

    return rule


def _real(low: float, high: float, what: str, above: bool = False) -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not low <= value <= high or (above and value <= low):
            return f"{value} is out of range: must be {what}"
        return None

    return rule


def _size(value: Any) -> str | None:
    ok = isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value)
    if not ok or any(not 8 <= side <= MAX_SIDE or side % 8 for side in value):
        shown = f"{value[0]}x{value[1]}" if ok else repr(value)
        return f"{shown}: each side must be a multiple of 8 from 8 to {MAX_SIDE}"
    return None


def _sampler(value: Any) -> str | None:
    return None if value in SAMPLERS else f"unknown sampler {value!r} (known: {', '.join(SAMPLERS)})"


def _flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def _strength(value: Any) -> str | None:
    return None if value is None else _real(0.0, 1.0, "above 0 and at most 1", above=True)(value)


def _timestep_calls(sampler: str, steps: int, strength: float | None, fixed: bool = False) -> int:
    """Model calls of A1111's DDIM, PLMS or UniPC (sd_samplers_timesteps): txt2img walks the grid
    range(0, 1000, 1000 // steps); img2img walks its first t_enc points, t_enc = int(min(s, 0.999) *
    steps), or steps - 1 for hires' fixed steps. DDIM calls the model at all points but the last,
    PLMS once more (its first step), UniPC once per point."""
    if strength is None:
        points = len(range(0, 1000, max(1, 1000 // steps)))
    else:
        points = steps - 1 if fixed else int(min(strength, 0.999) * steps)
    if sampler == "unipc":
        return points
    return max(0, points - 1) + (1 if sampler == "plms" and points >= 2 else 0)


@lru_cache(maxsize=1)
def _torchsde() -> bool:
    """Whether torchsde (A1111's Brownian-tree noise for the DPM++ SDE samplers) is installed."""
    return importlib.util.find_spec("torchsde") is not None


@lru_cache(maxsize=4096)
def _prompt_problem(text: str, steps: Any, negative: bool) -> str | None:
    """A1111 prompt syntax sdbatch refuses (AND, a prompt-editing switch past the last step...);
    cached: a job's combinations repeat the same few prompts many times."""
    if text_problem(text, multiline=True) is not None:
        return None  # the field's own rule says what is wrong
    if not negative:
        text = strip_networks(text)  # A1111 takes <lora:...> tags out before parsing the rest
    return prompt_problem(text, steps if isinstance(steps, int) and steps >= 1 else None, negative=negative)


EMPHASIS = {
    "original": "Original",
    "no-norm": "No norm",
    "ignore": "Ignore",
    "none": "None",
    "comfy": "Comfy",
}  # -> A1111's name


RNG = {"diffusers": "diffusers", "a1111": "NV", "a1111-cpu": "CPU"}  # -> A1111's `RNG:` value


def _choice(known: Any, what: str) -> Callable[[Any], str | None]:
    return lambda value: None if value in known else f"unknown {what} {value!r} (known: {', '.join(known)})"


def _rng(value: Any) -> str | None:
    return None if value in RNG else f"unknown rng {value!r} (known: {', '.join(RNG)})"


def _resize_from(value: Any) -> str | None:
    return None if value is None else _size(value)


def _resize(value: Any) -> str | None:
    return None if value in (None, *RESIZE_MODES) else f"unknown resize {value!r} (known: {', '.join(RESIZE_MODES)})"


def _emphasis(value: Any) -> str | None:
    return None if value in EMPHASIS else f"unknown emphasis {value!r} (known: {', '.join(EMPHASIS)})"


def _lora(value: Any) -> str | None:
    if not isinstance(value, tuple):
        return f"must be a list of (name, weight) LoRAs, got {value!r}"
    for item in value:
        if not isinstance(item, tuple) or len(item) != 3:
            return f"each LoRA must be (name, text-encoder weight, UNet weight), got {item!r}"
        if problem := name_problem(item[0]) or weight_problem(item[1]) or weight_problem(item[2]):
            return problem
    return None


def _optional(rule: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """A hires override: None (the first pass's value) or a value of the field's rule."""
    return lambda value: None if value is None else rule(value)


def _hires_size(value: Any) -> str | None:
    ok = isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value)
    if not ok or value == (0, 0) or any(side and (not 8 <= side <= MAX_SIDE or side % 8) for side in value):
        shown = f"{value[0]}x{value[1]}" if ok else repr(value)
        return f"{shown}: each side must be a multiple of 8 from 8 to {MAX_SIDE} (or one side 0: keep the aspect)"
    return None


def _hires_text(value: Any) -> str | None:
    if value == "":
        return "empty: leave it out to use the first pass's (A1111 reads an empty one so)"
    return _text(value)


def _upscaler(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return f"must be an upscaler's name, got {value!r}"
    if builtin(value) == value:
        return None
    if problem := unsupported(value):
        return problem
    problem = name_problem(value)
    return problem and f"upscaler {value!r}: name an upscaler model by its file name without extension"


RULES: dict[str, Callable[[Any], str | None]] = {
    "prompt": _text,
    "negative": _text,
    "emphasis": _emphasis,
    "clip_skip": _whole(1, 12, "from 1 (off) to 12"),
    "lora": _lora,
    "init_image": _path,
    "mask": _path,
    "size": _size,
    "resize": _resize,
    "sampler": _sampler,
    "karras": _flag,
    "schedule": _choice(SCHEDULE_LABELS, "schedule type"),
    "compat": _choice(("diffusers", "a1111"), "compat"),
    "downcast_alphas": _flag,
    "steps": _whole(1, 1000, "from 1 to 1000"),
    "strength": _strength,
    "cfg": _real(0.0, 100.0, "from 0 to 100"),
    "hires_scale": _optional(_real(1.0, 8.0, "from 1 to 8")),
    "hires_size": _optional(_hires_size),
    "hires_upscaler": _upscaler,
    "hires_steps": _whole(0, 1000, "from 0 (= steps) to 1000"),
    "hires_sampler": _optional(_sampler),
    "hires_schedule": _optional(_choice(SCHEDULE_LABELS, "schedule type")),
    "hires_prompt": _optional(_hires_text),
    "hires_negative": _optional(_hires_text),
    "hires_cfg": _optional(_real(0.0, 100.0, "from 0 to 100")),
    "rng": _rng,
    "ensd": _whole(-(2**31), 2**31 - 1, "from -2**31 to 2**31-1"),
    "seed_resize_from": _resize_from,
    "subseed_strength": _real(0.0, 1.0, "from 0 to 1"),
    "subseed": _whole(0, 2**64 - 1, "from 0 to 2**64-1"),
    "seed": _whole(0, 2**64 - 1, "from 0 to 2**64-1"),
}


# ----------------------------------------------------------------------------------------------------
# JSON in and out


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value


def _coerce(name: str, value: Any) -> Any:
    """A JSON value back into the field's Python type (strict: no float seeds, no text numbers)."""
    if name in ("size", "seed_resize_from", "hires_size") and not (name != "size" and value is None):
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError(f"must be [width, height], got {value!r}")
        return tuple(value)
    if (
        name in ("cfg", "subseed_strength", "hires_scale", "hires_cfg")
        and isinstance(value, int)
        and not isinstance(value, bool)
    ):
        return float(value)
    if name == "lora":
        if not isinstance(value, list) or not all(isinstance(v, list) and len(v) == 3 for v in value):
            raise ValueError(f"must be a list of [name, te weight, unet weight], got {value!r}"[:200])
        return tuple((n, _real_number(te), _real_number(unet)) for n, te, unet in value)
    return value


def _real_number(value: Any) -> Any:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


# ----------------------------------------------------------------------------------------------------
# A1111 infotext keys: field -> (key, write value or None to leave it out, read text -> field values)


def _read_sampler(text: str) -> dict[str, Any]:
    """Before A1111 1.9 the schedule was part of the sampler's name: `DPM++ 2M Karras`, and since 1.6
    `DPM++ 2M SDE Exponential` (a name without either used the model's own sigmas: `a1111_values`)."""
    text = text.strip()
    suffix = next((s for s in (" Karras", " Exponential") if text.endswith(s)), "")
    base = text.removesuffix(suffix).strip().lower()
    name = SAMPLER_NAMES.get(base) or SAMPLER_NAMES.get(base.replace(" ", "_"))
    if name is None:
        raise ValueError("has no sdbatch equivalent yet")
    schedule = {" Karras": {"karras": True}, " Exponential": {"schedule": "exponential"}}.get(suffix, {})
    return {"sampler": name} | schedule


def _read_schedule(text: str) -> dict[str, Any]:
    """A1111 1.9+'s `Schedule type`: Karras is read as `karras: true` (as sdbatch writes it)."""
    names = {label.lower(): name for name, label in SCHEDULE_LABELS.items()}
    name = names.get(text.strip().lower())
    if name is None:
        raise ValueError(f"unknown schedule type (known: {', '.join(SCHEDULE_LABELS.values())})")
    return {"karras": True} if name == "karras" else {} if name == "automatic" else {"schedule": name}


def _read_size(text: str) -> dict[str, Any]:
    width, _, height = text.partition("x")
    return {"size": (int(width), int(height))}


def _read_whole(name: str) -> Callable[[str], dict[str, Any]]:
    return lambda text: {name: int(text)}  # int("1e3") fails: no float rounding of seeds


def _read_true(name: str) -> Callable[[str], dict[str, Any]]:
    """A1111's options written as `True` / `False` (Python's bool)."""

    def read(text: str) -> dict[str, Any]:
        if text.strip() not in ("True", "False"):
            raise ValueError("must be True or False")
        return {name: text.strip() == "True"}

    return read


def _read_real(name: str) -> Callable[[str], dict[str, Any]]:
    return lambda text: {name: float(text)}


def _read_rng(text: str) -> dict[str, Any]:
    names = {"gpu": "a1111", "nv": "a1111", "cpu": "a1111-cpu", "diffusers": "diffusers"}
    if text.strip().lower() not in names:
        raise ValueError("unknown noise source (known: GPU, NV, CPU)")
    return {"rng": names[text.strip().lower()]}


def _read_resize(text: str) -> dict[str, Any]:
    size = _read_size(text)["size"]
    return {} if size[0] <= 0 or size[1] <= 0 else {"seed_resize_from": size}  # A1111 writes -1x-1 for off


def _read_emphasis(text: str) -> dict[str, Any]:
    names = {a1111.lower(): name for name, a1111 in EMPHASIS.items()}
    if text.strip().lower() not in names:
        raise ValueError(f"unknown emphasis mode (known: {', '.join(EMPHASIS.values())})")
    return {"emphasis": names[text.strip().lower()]}


def _read_hires_size(text: str) -> dict[str, Any]:
    return {"hires_size": _read_size(text)["size"]}


def _read_hires_sampler(text: str) -> dict[str, Any]:
    read = _read_sampler(text)
    schedule = "karras" if read.get("karras") else read.get("schedule")
    return {"hires_sampler": read["sampler"]} | ({"hires_schedule": schedule} if schedule else {})


def _read_hires_schedule(text: str) -> dict[str, Any]:
    read = _read_schedule(text)
    return {"hires_schedule": "karras" if read.get("karras") else read.get("schedule", "automatic")}


A1111_KEYS: dict[str, tuple[str, Callable[[Any], Any], Callable[[str], dict[str, Any]]]] = {
    "steps": ("Steps", lambda v: v, _read_whole("steps")),
    "sampler": ("Sampler", lambda v: SAMPLERS[v].a1111, _read_sampler),
    "karras": ("Schedule type", lambda v: "Karras" if v else None, _read_schedule),
    "schedule": ("Schedule type", lambda v: None if v == "automatic" else SCHEDULE_LABELS[v], _read_schedule),
    # not an A1111 key: written when a1111, so that sdbatch reads its own text back (A1111 ignores it)
    "compat": ("Compat", lambda v: None if v == "diffusers" else v, lambda text: {"compat": text.strip().lower()}),
    "downcast_alphas": ("Downcast alphas_cumprod", lambda v: True if v else None, _read_true("downcast_alphas")),
    "cfg": ("CFG scale", number_text, _read_real("cfg")),
    "seed": ("Seed", lambda v: v, _read_whole("seed")),
    "size": ("Size", lambda v: f"{v[0]}x{v[1]}", _read_size),
    "strength": ("Denoising strength", lambda v: None if v is None else number_text(v), _read_real("strength")),
    "hires_scale": ("Hires upscale", lambda v: None if v is None else number_text(v), _read_real("hires_scale")),
    "hires_size": ("Hires resize", lambda v: None if v is None else f"{v[0]}x{v[1]}", _read_hires_size),
    "hires_steps": ("Hires steps", lambda v: v or None, _read_whole("hires_steps")),
    "hires_upscaler": ("Hires upscaler", a1111_upscaler, lambda text: {"hires_upscaler": builtin(text) or text}),
    "hires_sampler": ("Hires sampler", lambda v: v and SAMPLERS[v].a1111, _read_hires_sampler),
    "hires_schedule": ("Hires schedule type", lambda v: v and SCHEDULE_LABELS[v], _read_hires_schedule),
    "hires_prompt": ("Hires prompt", lambda v: v or None, lambda text: {"hires_prompt": text} if text else {}),
    "hires_negative": (
        "Hires negative prompt",
        lambda v: v or None,
        lambda text: {"hires_negative": text} if text else {},
    ),
    "hires_cfg": ("Hires CFG Scale", lambda v: None if v is None else number_text(v), _read_real("hires_cfg")),
    "clip_skip": ("Clip skip", lambda v: v if v > 1 else None, _read_whole("clip_skip")),
    "emphasis": ("Emphasis", lambda v: None if v == "original" else EMPHASIS[v], _read_emphasis),
    "subseed": ("Variation seed", lambda v: v or None, _read_whole("subseed")),
    "subseed_strength": ("Variation seed strength", lambda v: number_text(v) or None, _read_real("subseed_strength")),
    "seed_resize_from": ("Seed resize from", lambda v: None if v is None else f"{v[0]}x{v[1]}", _read_resize),
    "ensd": ("ENSD", lambda v: v or None, _read_whole("ensd")),
    # A1111's default (GPU) writes no RNG key; sdbatch's own default (diffusers) writes none either
    "rng": ("RNG", lambda v: None if v == "diffusers" else RNG[v], _read_rng),
}
_READERS = {key: read for key, _, read in A1111_KEYS.values()}
# keys that do not change the pixels (or name the model, which rerun resolves itself); `Batch size`/`Batch
# pos`: since 1.6 A1111 draws every noise from each image's own seed (`Seed` is the image's; before, the
# per-step noise was drawn per image too: `enable_batch_seeds`); civitai's date, resources and hashes
A1111_IGNORED = {
    "Model hash",
    "Model",
    "Version",
    "Template",
    "Negative Template",
    "Batch size",
    "Batch pos",
    "Created Date",
    "Hashes",
    "Civitai resources",
    "Civitai metadata",
}
# keys ignored with these values only (a real value changes the picture and stays refused)
A1111_IGNORED_VALUES = {
    "Token merging ratio": ("0", "0.0"),
    "Token merging ratio hr": ("0", "0.0"),
    "Hires sampler": ("Use same sampler",),
    "Hires schedule type": ("Use same scheduler",),
    "Hires checkpoint": ("Use same checkpoint",),
    "Hires Module 1": ("Use same choices",),  # Forge: the hires pass keeps the first pass's VAE/text encoders
}
# the samplers whose name before A1111 1.9 (without " Karras") meant the model's own sigmas, "Uniform",
# where 1.9's "Automatic" is Karras or Exponential (samplers.sigmas.AUTOMATIC; torch-free here)
_UNIFORM_BEFORE_1_9 = frozenset(
    ("dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_2m", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")
)
# the add-ons' short hashes: not recipe fields, but rerun checks the files it finds against them
A1111_ADDON_KEYS = {"Lora hashes", "TI hashes"}
