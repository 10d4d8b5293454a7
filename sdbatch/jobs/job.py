"""Job files: YAML in, validated runs out, and their expansion into recipes.

A job names a model and one run (parameters at top level) or several (`runs:`), each filled in from
`defaults:`. Every parameter may be a scalar or a list; lists of a run form a cartesian product.
Numeric parameters also take A1111 X/Y/Z-plot ranges (`1-8`, `3-12 (+1.5)`, `0.2-0.8 [4]`,
`1, 5, 9-11`). All problems of a file are collected and reported together with file:line and the
field, so one `sdbatch validate` shows every mistake; nothing is rendered from a job with any.
"""

import difflib
import itertools
import math
import os
import re
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..addons.library import Addons
from ..errors import InputError
from ..files import TooLarge, read_limited
from ..output.names import DEFAULT_TEMPLATE, FOLDER_TEMPLATE, template_problem, tokens
from ..recipe import DEFAULTS, FIELDS, HIRES, Recipe
from ..render.devices import device_counts
from ..text import printable, text_problem
from .fields import (
    MODEL,
    PARAMS,
    RANDOM_VALUES,
    RUN_OPTIONS,
    YAML_DEFAULTS,
    Context,
    RandomPrompts,
    RandomSeeds,
    parse_item,
    show,
)
from .inputs import SKIP, resolve, run_problems, stand_in
from .ranges import MAX_AXIS_VALUES
from .yamlmarks import JobError, LineDict, LineList, Problem, parse_yaml

MAX_TASKS = 1_000_000
MAX_JOB_FILE = 16 * 2**20  # bytes: a job file is text someone wrote
MAX_NAME_BYTES = 200  # the job's name is a folder name (255 bytes at most, with room to spare)
MAX_TEXT_KEY_BYTES = 4000  # name, model, vae, output, devices, filename (a path is at most 4096)
MULTILINE = ("prompt", "negative")  # text that may hold line breaks and tabs
TOP_KEYS = (
    "name",
    "model",
    "vae",
    "output",
    "filename",
    "sheet",
    "devices",
    "wildcards",
    "lora_folder",
    "embedding_folder",
    "upscaler_folder",
    "defaults",
    "runs",
)
RUN_KEYS = (*PARAMS, "sheet", "hires", "mask_missing")
BLOCK_KEYS = ("hires", "mask_missing")  # keys of runs and defaults that fold into a parameter
# the `hires:` block's keys -> recipe fields (`denoise` is the second pass's strength, as in A1111)
HIRES_KEYS = {
    "scale": "hires_scale",
    "resize": "hires_size",
    "upscaler": "hires_upscaler",
    "steps": "hires_steps",
    "denoise": "strength",
    "sampler": "hires_sampler",
    "schedule": "hires_schedule",
    "prompt": "hires_prompt",
    "negative": "hires_negative",
    "cfg": "hires_cfg",
}
HIRES_DENOISE = 0.7  # A1111's default Denoising strength for hires fix
AXES = FIELDS  # what can vary between the images of a run (and label a contact sheet's rows)
# Names people bring from A1111, diffusers or habit, and what this file calls them.
ALIASES = {
    "negative_prompt": "negative",
    "neg": "negative",
    "prompts": "prompt",
    "seeds": "seed",
    "cfg_scale": "cfg",
    "guidance_scale": "cfg",
    "scale": "cfg",
    "sampler_name": "sampler",
    "scheduler": "sampler",
    "num_inference_steps": "steps",
    "denoising_strength": "strength",
    "width": "size",
    "height": "size",
    "image": "init_image",
    "init": "init_image",
    "mask_image": "mask",
    "batch": "batch_size",
    "models": "model",
    "out": "output",
    "output_dir": "output",
    "run": "runs",
    "default": "defaults",
}


@dataclass(frozen=True)
class Source:
    """Where a value came from, for error messages."""

    file: str
    line: int
    field: str


@dataclass
class Run:
    index: int
    values: dict[str, list]  # recipe field -> its values (one-element lists for scalars)
    sources: dict[str, Source]
    sheet: dict[str, str | None] = field(default_factory=dict)
    batch_size: int | str = "auto"

    def size(self) -> int:
        return math.prod(sum(v.count if isinstance(v, RANDOM_VALUES) else 1 for v in vs) for vs in self.values.values())


@dataclass(frozen=True)
class Task:
    """One image to render: where it stands in the job, the id that names it across runs of the
    job (resume skips ids already done), and its recipe."""

    index: int
    run: int
    id: str
    recipe: Recipe
    addons: Addons = field(default_factory=Addons)  # the LoRA and embedding files it uses, with their hashes
    sources: tuple[tuple[str, str], ...] = ()  # (field, sha256) of its init image and mask: the id's hashes

    def __getattr__(self, name: str) -> Any:
        """`task.seed` reads the recipe's seed: a task is its recipe, placed in a job."""
        if name.startswith("__") or name == "recipe":
            raise AttributeError(name)
        return getattr(self.recipe, name)


@dataclass
class Job:
    file: Path
    name: str
    model: str
    vae: str | None
    output: Path
    filename: str
    devices: str
    runs: list[Run]
    sheet: dict[str, str | None]
    image_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    kept: int = 0  # images the last expansion made (after a mask folder's `missing: skip`)
    lora_folder: Path | None = None  # looked in before the weights folders (sdbatch.addons.library)
    embedding_folder: Path | None = None
    upscaler_folder: Path | None = None  # hires fix's upscaler models, before weights/upscalers
    notes: list[str] = field(default_factory=list)  # said by validate and run: files a folder skipped
    model_line: int = 0  # where `model:` is (0: not given, the demo model)

    def random_slots(self) -> dict[str, int]:
        """`run<i>.seed` (and `run<i>.prompt`, `run<i>.negative`) -> how many draws that run needs."""
        slots: dict[str, int] = {}
        for run in self.runs:
            for name in ("seed", "prompt", "negative"):
                count = sum(v.count for v in run.values.get(name, []) if isinstance(v, RANDOM_VALUES))
                if count:
                    slots[f"run{run.index}.{name}"] = count
        return slots

    def size(self) -> int:
        return sum(run.size() for run in self.runs)

    def expand(
        self, randoms: dict[str, list[int]], size: int, cfg: float, keep: bool = True
    ) -> list[tuple[int, Recipe]]:
        """(run index, recipe) for every image of every run, in order. `randoms` gives the draws of
        `seed: random`; `size` and `cfg` are the model's, for runs that leave them to it. Raises
        JobError naming every rule a combination breaks (a mask without an image, say) with the
        lines of the values involved. `keep=False` checks without keeping the list."""
        out: list[tuple[int, Recipe]] = []
        problems: dict[tuple[int, str, str], Problem] = {}

        def report(run: Run, name: str, message: str) -> None:
            src = run.sources[name]
            problems.setdefault((src.line, src.field, message), Problem(src.file, src.line, src.field, message))

        model = {"size": (size, size), "cfg": float(cfg)}
        kept = 0  # combinations made into recipes (a mask folder's `missing: skip` drops some)
        for run in self.runs:
            for name, message in run_problems(run.values):
                report(run, name, message)
            unset_size = MODEL in run.values["size"]
            values = {k: [model[k] if v is MODEL else v for v in vs] for k, vs in run.values.items()}
            for name in ("seed", "prompt", "negative"):
                values[name] = _drawn(values[name], randoms.get(f"run{run.index}.{name}", []))
            for combo in itertools.product(*(values[name] for name in FIELDS)):
                chosen, found = resolve(dict(zip(FIELDS, combo, strict=True)), self.image_sizes, unset_size)
                for name, message in found:
                    report(run, name, message)
                if chosen is SKIP:
                    continue  # its image has no mask, and the mask folder says missing: skip
                recipe = Recipe(**chosen)
                if not recipe.hires and any(getattr(recipe, n) != DEFAULTS[n] for n in HIRES):
                    # `hires: {scale: [none, 2], ...}`: the images without hires fix drop its settings
                    recipe = replace(recipe, **{n: DEFAULTS[n] for n in HIRES})
                if recipe.init_image is None and not recipe.hires:
                    recipe = replace(recipe, strength=None)  # txt2img has no strength, whatever the default
                for name, message in recipe.problems():
                    report(run, name, message)
                kept += 1
                if keep:
                    out.append((run.index, recipe))
        if problems:
            raise JobError(list(problems.values()))
        self.kept = kept
        return out

    def check(self, size: int, cfg: float) -> int:
        """Every rule over every combination, without keeping them (random seeds stand in as 0);
        how many images they make."""
        self.expand({k: [0] * n for k, n in self.random_slots().items()}, size, cfg, keep=False)
        return self.kept


def _drawn(values: list, draws: list[int]) -> list:
    """A field's values with each random item replaced by its share of the recorded draws."""
    out, used = [], 0
    for v in values:
        if isinstance(v, RANDOM_VALUES):
            mine, used = draws[used : used + v.count], used + v.count
            out.extend(v.pick(mine) if isinstance(v, RandomPrompts) else mine)
        else:
            out.append(v)
    return out


def draw_randoms(slots: dict[str, int], recorded: dict[str, Any], where: str = "randoms.json") -> dict[str, list[int]]:
    """Recorded draws, topped up with fresh ones where a slot needs more. A recorded slot that is
    not a list of seeds (a damaged or hand-edited record) is an InputError naming `where`: the
    draws are what makes a resumed job render the same images, so they are never guessed."""
    out = {}
    for key, count in slots.items():
        have = recorded.get(key, []) if isinstance(recorded, dict) else []
        if not isinstance(have, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64 for v in have
        ):
            raise InputError(
                f"{where}: {key}: {show(have)} is not a list of seeds (whole numbers from 0 to 2**64-1); "
                "fix it, or delete the file to draw new ones"
            )
        have = have[:count]
        out[key] = have + [secrets.randbelow(2**32) for _ in range(count - len(have))]
    return out


# ----------------------------------------------------------------------------------------------------
# reading a job file


class _Checker:
    """Collects every problem of one job file."""

    def __init__(self, file: Path):
        self.file = file
        self.name = printable(str(file))  # a file name need not be valid text: shown escaped
        self.ctx = Context(file.parent)
        self.problems: list[Problem] = []

    def problem(self, line: int, name: str, message: str) -> None:
        self.problems.append(Problem(self.name, line, name, message))

    def unknown_keys(self, block: LineDict, allowed: tuple[str, ...], where: str) -> None:
        for key in block:
            if key in allowed:
                continue
            guess = ALIASES.get(key.lower()) if ALIASES.get(key.lower()) in allowed else None
            guess = guess or next(iter(difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)), None)
            hint = f"; did you mean {guess!r}?" if guess else f"; {where} takes: {', '.join(allowed)}"
            if key in ("width", "height") and "size" in allowed:
                hint = "; write size: [width, height] (or size: 512 for a square)"
            self.problem(block.lines[key], key, f"unknown key{hint}")

    def values(self, key: str, raw: Any, line: int, label: str | None = None) -> list | None:
        """One parameter: raw YAML value -> list of values, or None after reporting a problem
        (named `label` in messages: `hires.scale` for the field hires_scale)."""
        label = label or key
        items = list(raw) if isinstance(raw, list) else [raw]
        lines = raw.lines if isinstance(raw, LineList) else [line] * len(items)
        pair = key in ("size", "seed_resize_from", "hires_size") and len(raw) == 2 if isinstance(raw, list) else False
        if pair and all(isinstance(v, int) for v in raw):
            items, lines = [raw], [line]  # size: [768, 512] is one size
        if not items:
            self.problem(line, label, "empty list: give at least one value")
            return None
        if key in RUN_OPTIONS and len(items) > 1:
            self.problem(line, label, "takes one value (it changes speed, not images)")
            return None
        out: list = []
        ok = True
        for item, item_line in zip(items, lines, strict=True):
            try:
                out.extend(parse_item(key, item, self.ctx))
            except (ValueError, OSError) as e:
                self.problem(item_line, label, str(e))
                ok = False
        if ok and len(out) > MAX_AXIS_VALUES:
            self.problem(line, label, f"{len(out):,} values; at most {MAX_AXIS_VALUES:,} per axis")
            return None
        return out if ok else None

    def text_key(self, data: LineDict, key: str, default: str | None) -> str | None:
        value = data.get(key, default)
        if value is not None and not isinstance(value, str):
            self.problem(data.lines[key], key, f"must be text, got {show(value)}")
            return default
        if isinstance(value, str) and not value.strip():
            self.problem(data.lines[key], key, "must not be empty")
            return default
        if isinstance(value, str) and len(value.encode()) > MAX_TEXT_KEY_BYTES:  # names, paths, templates
            self.problem(data.lines[key], key, f"longer than {MAX_TEXT_KEY_BYTES:,} bytes")
            return default
        return value


def load_job(path: str | Path) -> Job:
    """Parse and validate a job file; raises JobError listing every problem found."""
    file = Path(path)
    where = printable(str(file))
    try:
        data = read_limited(file, MAX_JOB_FILE)
    except TooLarge as e:
        raise JobError([Problem(where, 0, "", f"{e}; a job file is short text")]) from None
    except FileNotFoundError:
        raise JobError([Problem(where, 0, "", "job file not found")]) from None
    except IsADirectoryError:
        raise JobError([Problem(where, 0, "", "is a folder, not a job file")]) from None
    except (OSError, ValueError) as e:
        raise JobError([Problem(where, 0, "", f"cannot be read ({getattr(e, 'strerror', None) or e})")]) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise JobError([Problem(where, line, "", "not UTF-8 text (a binary file, or another encoding?)")]) from None
    return parse_job(text, file)


def parse_job(text: str, file: Path) -> Job:
    data = parse_yaml(text, printable(str(file)))
    check = _Checker(file)
    if data is None:
        raise JobError([Problem(check.name, 0, "", "the job file is empty; it needs at least a prompt")])
    if not isinstance(data, LineDict):
        raise JobError([Problem(check.name, 1, "", f"a job file is a mapping of keys (prompt: ...), not {show(data)}")])
    _check_text(check, data, "", data.line, set())
    if check.problems:  # text that cannot be written anywhere: nothing else is looked at
        raise JobError(check.problems)
    check.unknown_keys(data, (*TOP_KEYS, *PARAMS, *BLOCK_KEYS), "a job")
    job = _job_settings(check, data, file)
    defaults = _defaults(check, data)
    for i, (block, line) in enumerate(_run_blocks(check, data)):
        if not isinstance(block, LineDict):
            check.problem(line, f"runs[{i}]", f"must be a mapping of parameters, got {show(block)}")
            continue
        if block is not data:
            check.unknown_keys(block, RUN_KEYS, "a run")
        run = _parse_run(check, i, block, defaults, prefix=f"runs[{i}]." if block is not data else "")
        if run is not None:
            run.sheet = (
                _sheet(check, block.get("sheet"), block.lines.get("sheet", 0)) if "sheet" in block else job.sheet
            )
            job.runs.append(run)
    defaults_missing = data.get("defaults") if isinstance(data.get("defaults"), LineDict) else {}
    if "mask_missing" in defaults_missing and not getattr(check, "folded_missing", False) and not check.problems:
        check.problem(defaults_missing.lines["mask_missing"], "defaults.mask_missing", "no run has a mask folder")
    if check.ctx.folders_used and "filename" not in data:
        job.filename = FOLDER_TEMPLATE  # a folder of inputs: each output keeps its source's name
    if not check.problems and (problem := template_problem(job.filename, _samples(job.runs))):
        check.problem(data.lines.get("filename", 0), "filename", problem)
    if check.problems:
        raise JobError(check.problems)
    job.image_sizes = check.ctx.image_sizes
    job.notes = list(dict.fromkeys(check.ctx.notes))
    if job.size() > MAX_TASKS:
        message = f"expands to {job.size():,} images (at most {MAX_TASKS:,} per job)"
        raise JobError([Problem(check.name, 0, "", message)])
    job.check(size=512, cfg=7.5)  # every combination's rules, before any model is read
    return job


def _job_settings(check: _Checker, data: LineDict, file: Path) -> Job:
    """The job-wide keys: name, model, vae, output, devices, filename, sheet (no runs yet)."""
    # the file's own name, made UTF-8 (a name of other bytes reaches Python as lone surrogates)
    stem = os.fsencode(file.stem).decode("utf-8", errors="replace")
    name = check.text_key(data, "name", stem) or stem
    if re.search(r"[/\\\x00]", name) or name in (".", ".."):
        check.problem(data.lines["name"], "name", f"{show(name)} cannot name a folder; use letters, digits, - and _")
        name = stem
    elif len(name.encode()) > MAX_NAME_BYTES:
        check.problem(data.lines["name"], "name", f"longer than {MAX_NAME_BYTES} bytes; it names a folder")
        name = stem
    model = check.text_key(data, "model", "demo") or "demo"
    vae = check.text_key(data, "vae", None)
    if vae is not None and _exists(file.parent / vae):
        vae = str((file.parent / vae).resolve())
    elif vae is not None and not _exists(Path(vae)):
        check.problem(data.lines["vae"], "vae", f"{file.parent / vae} does not exist")
    if model != "demo" and _exists(file.parent / model):
        model = str((file.parent / model).resolve())
    output_text = check.text_key(data, "output", None)
    output = (file.parent / output_text).resolve() if output_text else Path("outputs") / name
    if output_text and output.exists() and not output.is_dir():
        check.problem(data.lines["output"], "output", f"{output} is a file, not a folder")
    devices = str(check.text_key(data, "devices", "auto"))
    try:
        device_counts(devices)
    except InputError as e:
        check.problem(data.lines.get("devices", 0), "devices", str(e).removeprefix("--devices: "))
    wildcards = check.text_key(data, "wildcards", None)
    if wildcards is not None:
        check.ctx.wildcards = (file.parent / wildcards).resolve()
        if not check.ctx.wildcards.is_dir():
            check.problem(data.lines["wildcards"], "wildcards", f"{check.ctx.wildcards} is not a folder")
    folders = {key: _folder(check, data, key) for key in ("lora_folder", "embedding_folder", "upscaler_folder")}
    filename = check.text_key(data, "filename", DEFAULT_TEMPLATE) or DEFAULT_TEMPLATE
    _check_filename(check, filename, data.lines.get("filename", 0))
    sheet = _sheet(check, data.get("sheet"), data.lines.get("sheet", 0))
    job = Job(file, name, model, vae, output, filename, devices, [], sheet, **folders)
    job.model_line = data.lines.get("model", 0)
    return job


def _folder(check: _Checker, data: LineDict, key: str) -> Path | None:
    """A folder key, relative to the job file; it must exist (a typo would silently look elsewhere)."""
    text = check.text_key(data, key, None)
    if text is None:
        return None
    folder = (check.ctx.base / text).resolve()
    if not folder.is_dir():
        check.problem(data.lines[key], key, f"{folder} is not a folder")
    return folder


def _exists(path: Path) -> bool:
    """Whether a path names something; a path the OS refuses to look up (too long) names nothing."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _defaults(check: _Checker, data: LineDict) -> LineDict:
    defaults = data.get("defaults", LineDict())
    if not isinstance(defaults, LineDict):
        check.problem(data.lines["defaults"], "defaults", f"must be a mapping of parameters, got {show(defaults)}")
        defaults = LineDict()
        defaults.lines = {}
    elif "defaults" in data:
        check.unknown_keys(defaults, (*PARAMS, *BLOCK_KEYS), "defaults")
    return _hires_block(check, defaults, "defaults.")


def _mask_missing(check: _Checker, block: LineDict, defaults: LineDict, prefix: str) -> tuple[LineDict, LineDict]:
    """`mask_missing: skip | full` (in the run or in defaults) is the mask folder's `missing:` (see
    fields._mask), folded into the mask mapping the run uses. A run's own setting wins over the
    defaults'; a default applies to the runs whose mask is a folder (the job checks some run is)."""
    in_run = "mask_missing" in block
    given = block if in_run else defaults if "mask_missing" in defaults else None
    if given is None:
        return block, defaults
    label = (prefix if in_run else "defaults.") + "mask_missing"
    value, line = given["mask_missing"], given.lines["mask_missing"]
    block, defaults = _without(block, "mask_missing"), _without(defaults, "mask_missing")
    holder = block if "mask" in block else defaults if "mask" in defaults else None
    mask = None if holder is None else holder["mask"]
    if not isinstance(mask, LineDict) or "folder" not in mask:
        if in_run:
            check.problem(line, label, "applies to a mask folder (mask: {folder: masks/}) only")
        return block, defaults
    own = {k: v for k, v in mask.items() if k not in ("missing", "mask_missing")}
    if len(own) < len(mask) and (holder is block) == in_run:  # said twice at one level: which one?
        check.problem(line, label, "and the mask's missing: both given; give it once")
        return block, defaults
    if len(own) < len(mask) and not (in_run and holder is defaults):
        return block, defaults  # the run's mask mapping says it itself (it wins over defaults)
    folded = LineDict({**own, "mask_missing": value})
    folded.line, folded.lines = mask.line, {**mask.lines, "mask_missing": line}
    holder["mask"] = folded  # holder is a copy made by _without
    check.folded_missing = True
    return block, defaults


def _without(block: LineDict, *keys: str) -> LineDict:
    """A copy of a block (its lines and labels too) without `keys`."""
    out = LineDict({k: v for k, v in block.items() if k not in keys})
    out.line, out.lines = block.line, dict(getattr(block, "lines", {}))
    out.labels = dict(getattr(block, "labels", {}))
    return out


def _hires_block(check: _Checker, block: LineDict, prefix: str) -> LineDict:
    """The block with its `hires:` mapping spread into the recipe's hires fields (`scale` ->
    hires_scale, `denoise` -> strength ...), each keeping its line; `hires: none` is no hires fix."""
    if "hires" not in block:
        return block
    out = _without(block, "hires")
    hires, line = block["hires"], block.lines["hires"]
    if hires is None or hires is False or hires == "none":
        for name in ("hires_scale", "hires_size"):  # also when defaults have a hires block
            out[name], out.lines[name], out.labels[name] = None, line, "hires"
        return out
    if not isinstance(hires, LineDict):
        check.problem(line, prefix + "hires", f"must be a mapping (scale: 2, denoise: 0.5, ...), got {show(hires)}")
        return out
    if "scale" not in hires and "resize" not in hires:
        check.problem(line, prefix + "hires", "give it a scale (scale: 2) or a resize (resize: 1024x1024)")
        return out
    for key, value in hires.items():
        name = HIRES_KEYS.get(key)
        if name is None:
            guess = difflib.get_close_matches(str(key), list(HIRES_KEYS), n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else f"; hires takes: {', '.join(HIRES_KEYS)}"
            check.problem(hires.lines[key], f"{prefix}hires.{key}", f"unknown key{hint}")
        elif name in block:
            check.problem(hires.lines[key], f"{prefix}hires.{key}", f"{name} is given twice (here and as {name}:)")
        else:
            out[name], out.lines[name] = value, hires.lines[key]
            out.labels[name] = f"hires.{key}"
    return out


def _run_blocks(check: _Checker, data: LineDict) -> list[tuple[Any, int]]:
    """(block, line) of every run: the `runs:` list, or the job itself when it has none."""
    if "runs" not in data:
        return [(data, data.line)]
    top_params = [k for k in data if k in PARAMS or k in BLOCK_KEYS]
    if top_params:
        check.problem(
            data.lines[top_params[0]],
            top_params[0],
            "parameters at top level and a runs: list both given; put shared values under defaults:",
        )
    blocks = data["runs"]
    if not isinstance(blocks, LineList) or not blocks:
        check.problem(data.lines["runs"], "runs", "must be a list of run blocks (- prompt: ...)")
        return []
    return list(zip(blocks, blocks.lines, strict=True))


def _parse_run(check: _Checker, index: int, block: LineDict, defaults: LineDict, prefix: str) -> Run | None:
    values: dict[str, list] = {}
    sources: dict[str, Source] = {}
    before = len(check.problems)
    if "hires" in block:  # a run's hires block replaces the defaults' whole (its denoise too)
        defaults = _without(defaults, *(k for k, label in getattr(defaults, "labels", {}).items() if "hires" in label))
    block = _hires_block(check, block, prefix)
    block, defaults = _mask_missing(check, block, defaults, prefix)
    for key in PARAMS:
        if key in block:
            raw, line, label = block[key], block.lines[key], prefix + getattr(block, "labels", {}).get(key, key)
        elif key in defaults:
            raw, line = defaults[key], defaults.lines[key]
            label = "defaults." + getattr(defaults, "labels", {}).get(key, key)
        elif key == "strength" and any(k in d for k in ("hires_scale", "hires_size") for d in (block, defaults)):
            values[key], sources[key] = [HIRES_DENOISE], Source(check.name, 0, "hires.denoise")
            continue
        elif key in YAML_DEFAULTS or key in RUN_OPTIONS:
            values[key] = [YAML_DEFAULTS.get(key, RUN_OPTIONS.get(key))]
            sources[key] = Source(check.name, 0, key)
            continue
        else:
            check.problem(block.line, prefix + key, f"missing: every run needs a {key} (here or in defaults:)")
            continue
        shown = getattr(block if key in block else defaults, "labels", {}).get(key)  # hires.scale, not hires_scale
        parsed = check.values(key, raw, line, shown)
        if parsed is not None:
            values[key] = parsed
            sources[key] = Source(check.name, line, label)
    if len(check.problems) > before:
        return None
    if any(v is not None for v in values["resize"]) and all(v is None for v in values["init_image"]):
        src = sources["resize"]
        check.problem(src.line, src.field, "applies to images with an init_image (img2img, inpainting) only")
        return None
    if values["compat"] == ["a1111"] and "rng" not in block and "rng" not in defaults:
        values["rng"] = ["a1111"]  # one line makes a run A1111's: its noise too, unless rng says otherwise
    options = {key: values.pop(key)[0] for key in RUN_OPTIONS}
    return Run(index, values, sources, batch_size=options["batch_size"])


def _check_filename(check: _Checker, template: str, line: int) -> None:
    """The template's form; its fields' types are checked against the runs once they are read."""
    if "/" in template or "\\" in template:
        check.problem(line, "filename", "must not contain / : images go directly into the output folder")
    elif problem := template_problem(template):
        check.problem(line, "filename", problem)


def _samples(runs: list[Run]) -> list[dict[str, Any]]:
    """File-name tokens of one task per run and mode, with the types the run's tasks will have:
    a template that formats these formats every task (`{cfg:d}` fails on cfg 7.5 here, at once,
    not when the plan names the files; `{strength:.2f}` fails on a txt2img run's empty strength)."""
    samples = []
    for run in runs:
        first = {k: next((stand_in(v) for v in vs if v is not MODEL), None) for k, vs in run.values.items()}
        base = dict(first, size=first["size"] or (512, 512), cfg=first["cfg"] if first["cfg"] is not None else 7.5)
        base["seed"] = 0 if isinstance(base["seed"], RandomSeeds) else base["seed"]
        for name in ("prompt", "negative"):
            if isinstance(base[name], RandomPrompts):
                base[name] = base[name].choices[0]
        images = [p for p in run.values["init_image"] if p is not None]
        modes = ([None] if None in run.values["init_image"] else []) + images[:1]
        for init in modes:
            strength = None if init is None else (base["strength"] if base["strength"] is not None else 0.75)
            recipe = Recipe(**(base | {"init_image": init, "strength": strength}))
            samples.append(tokens(Task(0, run.index, "0" * 16, recipe)))
    return samples


def _check_text(check: _Checker, value: Any, field: str, line: int, seen: set[int]) -> None:
    """Every key and every text value of the document: no lone surrogates, no control characters
    (line breaks and tabs only in prompts). Such text cannot be written into a file name, a folder
    name, a PNG chunk or a terminal, so it is refused before anything else reads the job."""
    if isinstance(value, str):
        if problem := text_problem(value, multiline=field.rsplit(".", 1)[-1] in MULTILINE):
            check.problem(line, field or "text", problem)
        return
    if not isinstance(value, (LineDict, LineList)) or id(value) in seen:
        return
    seen.add(id(value))  # an alias names the same object again: look at it once
    if isinstance(value, LineDict):
        for key, item in value.items():
            label = printable(key)[:40]
            if problem := text_problem(key):
                check.problem(value.lines[key], label, f"the key {problem}")
            _check_text(check, item, f"{field}.{label}" if field else label, value.lines[key], seen)
    else:
        for i, (item, item_line) in enumerate(zip(value, value.lines, strict=True)):
            label = f"{field}[{i}]" if field and isinstance(item, LineDict) else field
            _check_text(check, item, label, item_line, seen)


def _sheet(check: _Checker, raw: Any, line: int) -> dict[str, str | None]:
    if raw is None:
        return {}
    if not isinstance(raw, LineDict):
        check.problem(line, "sheet", f"must be a mapping like {{x: cfg, y: seed}}, got {show(raw)}")
        return {}
    out: dict[str, str | None] = {}
    for key, value in raw.items():
        if key not in ("x", "y"):
            check.problem(raw.lines[key], f"sheet.{key}", "unknown key; sheet takes x and y")
        elif value is not None and not isinstance(value, str):
            check.problem(raw.lines[key], f"sheet.{key}", f"must be a parameter name, got {show(value)}")
        elif value is not None and value not in AXES:
            guess = difflib.get_close_matches(str(value), AXES, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else f" (axes: {', '.join(AXES)})"
            check.problem(raw.lines[key], f"sheet.{key}", f"{value!r} is not a parameter{hint}")
        else:
            out[key] = value
    if out.get("x") and out.get("x") == out.get("y"):
        check.problem(line, "sheet", "x and y must be different parameters")
    return out
