"""Job files: YAML in, a validated list of Tasks out.

A job names a model and one run (parameters at top level) or several (`runs:`), each filled in from
`defaults:`. Every parameter may be a scalar or a list; lists of a run form a cartesian product.
Numeric parameters also take A1111 X/Y/Z-plot ranges (`1-8`, `3-12 (+1.5)`, `0.2-0.8 [4]`,
`1, 5, 9-11`). All problems of a file are collected and reported together with file:line and the
field, so one `sdbatch validate` shows every mistake; nothing is rendered from a job with any.
"""

import difflib
import hashlib
import itertools
import json
import math
import re
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError

PARAMS = (
    "prompt",
    "negative",
    "init_image",
    "mask",
    "size",
    "sampler",
    "karras",
    "steps",
    "strength",
    "cfg",
    "seed",
    "batch_size",
)
# Expansion order of the product: the first axis varies slowest, so consecutive images of a grid
# differ in their seed first, then in CFG, and so on.
AXES = PARAMS[:-1]
TOP_KEYS = ("name", "model", "vae", "output", "filename", "sheet", "devices", "defaults", "runs")
RUN_KEYS = (*PARAMS, "sheet")
DEFAULTS: dict[str, Any] = {
    "negative": "",
    "init_image": None,
    "mask": None,
    "sampler": "euler_a",
    "karras": False,
    "steps": 30,
    "strength": 0.75,
    "cfg": None,  # the model's recommended CFG (its file's header), else DEFAULT_CFG
    "seed": 0,
    "batch_size": "auto",
}
DEFAULT_CFG = 7.5
DEFAULT_FILENAME = "{index:05d}-{seed}-{slug}"
FILENAME_FIELDS = ("index", "seed", "slug", "id", "cfg", "steps", "sampler", "strength", "width", "height", "run")
MAX_AXIS_VALUES = 100_000
MAX_TASKS = 1_000_000
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
SAMPLER_ALIASES = {
    "euler a": "euler_a",
    "euler_ancestral": "euler_a",
    "euler ancestral": "euler_a",
    "k_euler_a": "euler_a",
    "k_euler": "euler",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++_2m": "dpmpp_2m",
    "dpmpp2m": "dpmpp_2m",
    "k_dpmpp_2m": "dpmpp_2m",
}


# ----------------------------------------------------------------------------------------------------
# errors


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class JobError(InputError):
    """Everything wrong with a job file, one problem per line."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(problems, key=lambda p: (p.file, p.line))
        super().__init__("\n".join(map(str, self.problems)))


class RangeError(ValueError):
    """A range such as `1-8 (+2)` that cannot be expanded; the message says why."""


# ----------------------------------------------------------------------------------------------------
# YAML with line numbers


class LineDict(dict):
    """A mapping from the YAML file that remembers the line of each key (1-based)."""

    line: int = 0
    lines: dict


class LineList(list):
    line: int = 0
    lines: list


class _Loader(yaml.SafeLoader):
    duplicates: list


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict()
    result.line, result.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            key = str(key)
        line = key_node.start_mark.line + 1
        if key in result:
            loader.duplicates.append((line, key, result.lines[key]))
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = line
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line, result.lines = node.start_mark.line + 1, [child.start_mark.line + 1 for child in node.value]
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def parse_yaml(text: str, file: str) -> Any:
    loader = _Loader(text)
    loader.duplicates = []
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        raise JobError([Problem(file, line, "", f"not valid YAML: {e.problem or e.context}")]) from None
    except yaml.YAMLError as e:
        raise JobError([Problem(file, 0, "", f"not valid YAML: {e}")]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise JobError(
            [Problem(file, line, key, f"given twice (first on line {first})") for line, key, first in loader.duplicates]
        )
    return data


# ----------------------------------------------------------------------------------------------------
# ranges


_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_RANGE = re.compile(
    rf"^\s*(?P<start>{_NUMBER})\s*-\s*(?P<end>{_NUMBER})\s*"
    rf"(?:\(\s*(?P<step>{_NUMBER})\s*\)|\[\s*(?P<count>\d+)\s*\])?\s*$"
)
_SINGLE = re.compile(rf"^\s*{_NUMBER}\s*$")


def parse_range(text: str, integer: bool) -> list[int | float]:
    """Expand one X/Y/Z-plot item list: `1-8` (step 1), `1-8 (+3)` (given step, ends inclusive when
    reached), `0.2-0.8 [4]` (that many evenly spaced values, ends included), and comma-separated
    mixtures of those and plain numbers. Integer fields round `[n]` values to the nearest integer."""
    values: list[int | float] = []
    for item in text.split(","):
        if not item.strip():
            raise RangeError(f"empty item in {text!r}")
        values.extend(_parse_item(item, integer))
        if len(values) > MAX_AXIS_VALUES:
            raise RangeError(f"{text!r} expands to more than {MAX_AXIS_VALUES:,} values")
    return values


def _number(text: str, integer: bool) -> int | float:
    value = float(text)
    if not math.isfinite(value):
        raise RangeError(f"{text!r} is not a finite number")
    if integer:
        if value != int(value):
            raise RangeError(f"{text.strip()} is not a whole number")
        return int(value)
    return value


def _parse_item(item: str, integer: bool) -> list[int | float]:
    if _SINGLE.match(item):
        return [_number(item, integer)]
    m = _RANGE.match(item)
    if not m:
        raise RangeError(f"{item.strip()!r} is neither a number nor a range like 1-8, 1-8 (+2) or 0.2-0.8 [4]")
    start, end = float(m["start"]), float(m["end"])
    if integer and (start != int(start) or end != int(end)):
        raise RangeError(f"{item.strip()!r}: the ends of an integer range must be whole numbers")
    if m["count"] is not None:
        count = int(m["count"])
        if count < 1:
            raise RangeError(f"{item.strip()!r}: the count in [n] must be at least 1")
        if count > MAX_AXIS_VALUES:
            raise RangeError(f"{item.strip()!r} asks for more than {MAX_AXIS_VALUES:,} values")
        raw = [start] if count == 1 else [start + (end - start) * i / (count - 1) for i in range(count)]
        return [round(v) for v in raw] if integer else [_clean(v) for v in raw]
    step = float(m["step"]) if m["step"] is not None else (1.0 if end >= start else -1.0)
    if step == 0 or not math.isfinite(step):
        raise RangeError(f"{item.strip()!r}: the step must be a non-zero number")
    if integer and step != int(step):
        raise RangeError(f"{item.strip()!r}: an integer range needs a whole-number step")
    if (end - start) * step < 0:
        raise RangeError(f"{item.strip()!r}: a step of {m['step']} never goes from {m['start']} to {m['end']}")
    count = math.floor((end - start) / step + 1e-9) + 1
    if count > MAX_AXIS_VALUES:
        raise RangeError(f"{item.strip()!r} expands to {count:,} values (at most {MAX_AXIS_VALUES:,})")
    if integer:
        return [int(start) + i * int(step) for i in range(count)]
    return [_clean(start + i * step) for i in range(count)]


def _clean(value: float) -> float:
    """0.1 * 3 prints as 0.3, not 0.30000000000000004: values end up in file names and metadata."""
    return float(f"{value:.10g}")


# ----------------------------------------------------------------------------------------------------
# the parsed job


@dataclass(frozen=True)
class Source:
    """Where a value came from, for error messages."""

    file: str
    line: int
    field: str


@dataclass(frozen=True)
class RandomSeeds:
    """`seed: random` or `random [n]`: drawn once per run and recorded in the output folder."""

    count: int


@dataclass
class Run:
    index: int
    values: dict[str, list]  # axis -> its values (one-element lists for scalars)
    sources: dict[str, Source]
    sheet: dict[str, str | None] = field(default_factory=dict)
    batch_size: int | str = "auto"


@dataclass(frozen=True)
class Task:
    """One image to render. `id` names it across runs of the job: resume skips ids already done."""

    index: int
    run: int
    prompt: str
    negative: str
    seed: int
    steps: int
    sampler: str
    karras: bool
    cfg: float
    strength: float | None  # None for txt2img
    width: int
    height: int
    init_image: str | None = None
    mask: str | None = None
    id: str = ""

    @property
    def mode(self) -> str:
        if self.init_image is None:
            return "txt2img"
        return "img2img" if self.mask is None else "inpaint"

    def params(self) -> dict[str, Any]:
        """The recipe alone: what decides the pixels, given the model."""
        data = asdict(self)
        for key in ("index", "run", "id"):
            data.pop(key)
        return data

    def batch_key(self) -> tuple:
        return (self.steps, self.sampler, self.karras, self.width, self.height, self.mode, self.strength)


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

    def random_slots(self) -> dict[str, int]:
        """`run<i>.seed` -> how many random seeds that run needs."""
        return {
            f"run{run.index}.seed": v.count
            for run in self.runs
            for v in run.values.get("seed", [])
            if isinstance(v, RandomSeeds)
        }

    def expand(self, model_id: str = "", randoms: dict[str, list[int]] | None = None) -> list[Task]:
        """Every task of every run, in order. `model_id` (the model's sha256) enters each task id;
        `randoms` gives the recorded draws of `seed: random` (missing ones are drawn now)."""
        randoms = randoms if randoms is not None else draw_randoms(self.random_slots(), {})
        tasks: list[Task] = []
        digests: dict[str, str] = {}
        for run in self.runs:
            values = dict(run.values)
            seeds: list[int] = []
            for v in values["seed"]:
                seeds.extend(randoms[f"run{run.index}.seed"][: v.count] if isinstance(v, RandomSeeds) else [v])
            values["seed"] = seeds
            for combo in itertools.product(*(values[a] for a in AXES[:-1] if a != "seed"), seeds):
                p = dict(zip([a for a in AXES if a != "seed"] + ["seed"], combo, strict=True))
                width, height = p["size"]
                image = p["init_image"]
                task = Task(
                    index=len(tasks),
                    run=run.index,
                    prompt=p["prompt"],
                    negative=p["negative"],
                    seed=p["seed"],
                    steps=p["steps"],
                    sampler=p["sampler"],
                    karras=p["karras"],
                    cfg=p["cfg"],
                    strength=p["strength"] if image is not None else None,
                    width=width,
                    height=height,
                    init_image=image,
                    mask=p["mask"] if image is not None else None,
                )
                tasks.append(replace(task, id=task_id(task, model_id, digests)))
        return tasks


def task_id(task: Task, model_id: str, digests: dict[str, str] | None = None) -> str:
    """16 hex digits of the sha256 of the recipe, the model and the init image / mask contents."""
    digests = digests if digests is not None else {}
    data = task.params()
    for key in ("init_image", "mask"):
        path = data[key]
        if path is not None:
            if path not in digests:
                digests[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            data[key] = digests[path]
    data["model"] = model_id
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def draw_randoms(slots: dict[str, int], recorded: dict[str, list[int]]) -> dict[str, list[int]]:
    """Recorded draws, topped up with fresh ones where a slot needs more."""
    out = {}
    for key, count in slots.items():
        have = [int(v) for v in recorded.get(key, [])][:count]
        out[key] = have + [secrets.randbelow(2**32) for _ in range(count - len(have))]
    return out


# ----------------------------------------------------------------------------------------------------
# validation


class _Checker:
    def __init__(self, file: Path):
        self.file = file
        self.name = str(file)
        self.base = file.parent
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

    # -- one parameter: raw YAML value -> list of values, or None after reporting a problem

    def values(self, key: str, raw: Any, line: int) -> list | None:
        items = list(raw) if isinstance(raw, list) else [raw]
        lines = raw.lines if isinstance(raw, LineList) else [line] * len(items)
        if isinstance(raw, list) and key == "size" and len(raw) == 2 and all(_is_int(v) for v in raw):
            items, lines = [raw], [line]  # size: [768, 512] is one size
        if not items:
            self.problem(line, key, "empty list: give at least one value")
            return None
        if key == "batch_size" and len(items) > 1:
            self.problem(line, key, "takes one value (it changes speed, not images)")
            return None
        out: list = []
        ok = True
        for item, item_line in zip(items, lines, strict=True):
            try:
                out.extend(self.value(key, item))
            except (ValueError, OSError) as e:
                self.problem(item_line, key, str(e))
                ok = False
        if ok and len(out) > MAX_AXIS_VALUES:
            self.problem(line, key, f"{len(out):,} values; at most {MAX_AXIS_VALUES:,} per axis")
            return None
        return out if ok else None

    def value(self, key: str, item: Any) -> list:
        if key in ("prompt", "negative"):
            if isinstance(item, dict):
                return self.prompt_file(item)
            if not isinstance(item, str):
                raise ValueError(f"must be text, got {_show(item)}; put it in quotes")
            return [item]
        if key in ("init_image", "mask"):
            if item is None:
                return [None]
            if not isinstance(item, str) or not item.strip():
                raise ValueError(f"must be a path to an image, got {_show(item)}")
            return [self.image_path(item)]
        if key == "size":
            return [_size(item)]
        if key == "sampler":
            return [_sampler(item)]
        if key == "karras":
            if not isinstance(item, bool):
                raise ValueError(f"must be true or false, got {_show(item)}")
            return [item]
        if key == "batch_size":
            if item == "auto":
                return [item]
            if not _is_int(item) or not 1 <= item <= 4096:
                raise ValueError(f"must be auto or a whole number from 1 to 4096, got {_show(item)}")
            return [item]
        if key == "seed":
            if isinstance(item, str) and (m := re.fullmatch(r"\s*random\s*(?:\[\s*(\d+)\s*\])?\s*", item)):
                count = int(m[1] or 1)
                if not 1 <= count <= MAX_AXIS_VALUES:
                    raise ValueError(f"random [n] needs 1 <= n <= {MAX_AXIS_VALUES:,}")
                return [RandomSeeds(count)]
            if item == -1:
                return [RandomSeeds(1)]  # A1111's "random"
        integer = key in ("seed", "steps")
        numbers = _numbers(item, integer)
        low, high, what = {
            "seed": (0, 2**64 - 1, "from 0 to 2**64-1 (or random)"),
            "steps": (1, 1000, "from 1 to 1000"),
            "cfg": (0.0, 100.0, "from 0 to 100"),
            "strength": (0.0, 1.0, "above 0 and at most 1"),
        }[key]
        for n in numbers:
            if not low <= n <= high or (key == "strength" and n <= 0):
                raise ValueError(f"{n} is out of range: {key} must be {what}")
        return numbers

    def prompt_file(self, item: dict) -> list[str]:
        if set(item) != {"file"} or not isinstance(item["file"], str):
            raise ValueError("write a prompt file as {file: prompts.txt}")
        path = self.base / item["file"]
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise ValueError(f"prompt file {path} does not exist") from None
        except UnicodeDecodeError:
            raise ValueError(f"prompt file {path} is not UTF-8 text") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not prompts:
            raise ValueError(f"prompt file {path} has no prompts (blank lines and # comments are skipped)")
        return prompts

    def image_path(self, item: str) -> str:
        path = (self.base / item).resolve()
        if not path.is_file():
            raise ValueError(f"image {path} does not exist")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"{path} is not an image Pillow can read ({e})") from None
        return str(path)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (a yes/no value)"
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _numbers(item: Any, integer: bool) -> list:
    if isinstance(item, bool) or not isinstance(item, (int, float, str)):
        raise ValueError(f"must be a number or a range like 1-8, got {_show(item)}")
    if isinstance(item, str):
        try:
            return parse_range(item, integer)
        except RangeError as e:
            raise ValueError(str(e)) from None
    if isinstance(item, float) and not math.isfinite(item):
        raise ValueError(f"must be a finite number, got {item}")
    if integer and isinstance(item, float):
        if item != int(item):
            raise ValueError(f"must be a whole number, got {item}")
        return [int(item)]
    return [float(item) if not integer else item]


def _size(item: Any) -> tuple[int, int]:
    if _is_int(item):
        width = height = item
    elif isinstance(item, list) and len(item) == 2 and all(_is_int(v) for v in item):
        width, height = item
    elif isinstance(item, str) and (m := re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", item)):
        width, height = int(m[1]), int(m[2])
    else:
        raise ValueError(f"must be 512, [width, height] or '768x512', got {_show(item)}")
    for side in (width, height):
        if not 8 <= side <= 8192 or side % 8:
            raise ValueError(f"{width}x{height}: each side must be a multiple of 8 from 8 to 8192")
    return (width, height)


def _sampler(item: Any) -> str:
    from .samplers import SAMPLERS

    if not isinstance(item, str):
        raise ValueError(f"must be a sampler name, got {_show(item)}")
    name = item.strip().lower()
    name = SAMPLER_ALIASES.get(name, name.replace(" ", "_"))
    if name not in SAMPLERS:
        base = name.removesuffix("_karras")
        base = SAMPLER_ALIASES.get(base.replace("_", " "), base)
        if base != name and base in SAMPLERS:
            raise ValueError(f"write sampler: {base} with karras: true")
        guess = difflib.get_close_matches(name, list(SAMPLERS), n=1, cutoff=0.5)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        raise ValueError(f"unknown sampler {item!r}{hint} (known: {', '.join(SAMPLERS)})")
    return name


def load_job(path: str | Path) -> Job:
    """Parse and validate a job file; raises JobError listing every problem found."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise JobError([Problem(str(file), 0, "", "job file not found")]) from None
    except IsADirectoryError:
        raise JobError([Problem(str(file), 0, "", "is a folder, not a job file")]) from None
    except UnicodeDecodeError:
        raise JobError([Problem(str(file), 0, "", "not UTF-8 text")]) from None
    return parse_job(text, file)


def parse_job(text: str, file: Path) -> Job:
    data = parse_yaml(text, str(file))
    check = _Checker(file)
    if data is None:
        raise JobError([Problem(str(file), 0, "", "the job file is empty; it needs at least a prompt")])
    if not isinstance(data, LineDict):
        raise JobError([Problem(str(file), 1, "", f"a job file is a mapping of keys (prompt: ...), not {_show(data)}")])
    check.unknown_keys(data, TOP_KEYS + PARAMS, "a job")

    def text_key(key: str, default: str | None) -> str | None:
        value = data.get(key, default)
        if value is not None and not isinstance(value, str):
            check.problem(data.lines[key], key, f"must be text, got {_show(value)}")
            return default
        if isinstance(value, str) and not value.strip():
            check.problem(data.lines[key], key, "must not be empty")
            return default
        return value

    name = text_key("name", file.stem) or file.stem
    if re.search(r"[/\\\x00]", name) or name in (".", ".."):
        check.problem(data.lines["name"], "name", f"{name!r} cannot name a folder; use letters, digits, - and _")
        name = file.stem
    model = text_key("model", "demo") or "demo"
    vae = text_key("vae", None)
    if vae is not None and (file.parent / vae).exists():
        vae = str((file.parent / vae).resolve())
    if model != "demo" and (file.parent / model).exists():
        model = str((file.parent / model).resolve())
    output_text = text_key("output", None)
    output = (file.parent / output_text).resolve() if output_text else Path("outputs") / name
    devices = str(text_key("devices", "auto"))
    filename = text_key("filename", DEFAULT_FILENAME) or DEFAULT_FILENAME
    _check_filename(check, filename, data.lines.get("filename", 0))
    sheet = _sheet(check, data.get("sheet"), data.lines.get("sheet", 0))

    defaults = data.get("defaults", LineDict())
    if not isinstance(defaults, LineDict):
        check.problem(data.lines["defaults"], "defaults", f"must be a mapping of parameters, got {_show(defaults)}")
        defaults = LineDict()
        defaults.lines = {}
    else:
        check.unknown_keys(defaults, PARAMS, "defaults")
    top_params = [k for k in data if k in PARAMS]
    if "runs" in data:
        blocks = data["runs"]
        if top_params:
            check.problem(
                data.lines[top_params[0]],
                top_params[0],
                "parameters at top level and a runs: list both given; put shared values under defaults:",
            )
        if not isinstance(blocks, LineList) or not blocks:
            check.problem(data.lines["runs"], "runs", "must be a list of run blocks (- prompt: ...)")
            blocks = LineList()
            blocks.lines = []
    else:
        blocks = LineList([data])
        blocks.lines = [data.line]

    runs = []
    for i, block in enumerate(blocks):
        if not isinstance(block, LineDict):
            check.problem(blocks.lines[i], f"runs[{i}]", f"must be a mapping of parameters, got {_show(block)}")
            continue
        if block is not data:
            check.unknown_keys(block, RUN_KEYS, "a run")
        run = _run(check, i, block, defaults, prefix=f"runs[{i}]." if block is not data else "")
        if run is not None:
            run.sheet = _sheet(check, block.get("sheet"), block.lines.get("sheet", 0)) if "sheet" in block else sheet
            runs.append(run)
    if check.problems:
        raise JobError(check.problems)
    total = sum(math.prod(_axis_len(v) for a, v in run.values.items()) for run in runs)
    if total > MAX_TASKS:
        raise JobError([Problem(str(file), 0, "", f"expands to {total:,} images (at most {MAX_TASKS:,} per job)")])
    return Job(file, name, model, vae, output, filename, devices, runs, sheet)


def _axis_len(values: list) -> int:
    return sum(v.count if isinstance(v, RandomSeeds) else 1 for v in values)


def _run(check: _Checker, index: int, block: LineDict, defaults: LineDict, prefix: str) -> Run | None:
    values: dict[str, list] = {}
    sources: dict[str, Source] = {}
    before = len(check.problems)
    for key in PARAMS:
        if key in block:
            raw, line, label = block[key], block.lines[key], prefix + key
        elif key in defaults:
            raw, line, label = defaults[key], defaults.lines[key], f"defaults.{key}"
        elif key in DEFAULTS or key == "size":
            values[key] = [DEFAULTS.get(key)]
            sources[key] = Source(check.name, 0, key)
            continue
        else:
            check.problem(block.line, prefix + key, f"missing: every run needs a {key} (here or in defaults:)")
            continue
        parsed = check.values(key, raw, line)
        if parsed is not None:
            values[key] = parsed
            sources[key] = Source(check.name, line, label)
    if len(check.problems) > before:
        return None
    # size None = the model's own size, filled in once the model is known (with_model_defaults)
    karras_bad = [s for s in values["sampler"] if True in values["karras"] and not _karras_ok(s)]
    if karras_bad:
        src = sources["karras"]
        check.problem(src.line, src.field, f"karras does not apply to {', '.join(karras_bad)} (fixed timesteps)")
    if any(m is not None for m in values["mask"]) and all(i is None for i in values["init_image"]):
        src = sources["mask"]
        check.problem(src.line, src.field, "a mask needs an init_image to repaint")
    for steps in values["steps"]:
        for strength in values["strength"]:
            if any(i is not None for i in values["init_image"]) and int(steps * strength) < 1:
                src = sources["strength"]
                check.problem(src.line, src.field, f"strength {strength} of {steps} steps runs no step at all")
    _check_aspects(check, values, sources)
    if len(check.problems) > before:
        return None
    batch_size = values.pop("batch_size")[0]
    return Run(index, values, sources, batch_size=batch_size)


def _karras_ok(sampler: str) -> bool:
    from .samplers import SAMPLERS

    return SAMPLERS[sampler].karras


def _check_aspects(check: _Checker, values: dict[str, list], sources: dict[str, Source]) -> None:
    """Init images and masks must have the render size's aspect ratio (they are resized, never
    cropped or stretched): refuse a mismatch before anything renders, not halfway through a job."""
    from PIL import Image

    from .pipeline import ASPECT_TOLERANCE

    for key in ("init_image", "mask"):
        for path in values[key]:
            if path is None:
                continue
            with Image.open(path) as im:
                w, h = im.size
            for size in values["size"]:
                w_, h_ = size or (1, 1)  # unset: the model's own size, always square
                if abs((w / h) / (w_ / h_) - 1) > ASPECT_TOLERANCE:
                    src = sources[key]
                    wanted = f"size {w_}x{h_}" if size else "the model's square size (size is not set)"
                    check.problem(
                        src.line,
                        src.field,
                        f"{Path(path).name} is {w}x{h}, which does not have the aspect ratio of {wanted}; "
                        "crop it or choose a matching size",
                    )


def _check_filename(check: _Checker, template: str, line: int) -> None:
    sample = dict.fromkeys(FILENAME_FIELDS, 0) | {"slug": "a", "id": "0" * 16, "sampler": "euler"}
    try:
        template.format(**sample)
    except (KeyError, IndexError, ValueError) as e:
        check.problem(line, "filename", f"bad template ({e}); fields: {', '.join(FILENAME_FIELDS)}")
        return
    if "/" in template or "\\" in template:
        check.problem(line, "filename", "must not contain / : images go directly into the output folder")


def _sheet(check: _Checker, raw: Any, line: int) -> dict[str, str | None]:
    if raw is None:
        return {}
    if not isinstance(raw, LineDict):
        check.problem(line, "sheet", f"must be a mapping like {{x: cfg, y: seed}}, got {_show(raw)}")
        return {}
    out: dict[str, str | None] = {}
    for key, value in raw.items():
        if key not in ("x", "y"):
            check.problem(raw.lines[key], f"sheet.{key}", "unknown key; sheet takes x and y")
        elif value is not None and value not in AXES:
            guess = difflib.get_close_matches(str(value), AXES, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else f" (axes: {', '.join(AXES)})"
            check.problem(raw.lines[key], f"sheet.{key}", f"{value!r} is not a parameter{hint}")
        else:
            out[key] = value
    if out.get("x") and out.get("x") == out.get("y"):
        check.problem(line, "sheet", "x and y must be different parameters")
    return out


def with_model_defaults(job: Job, size: int, cfg: float = DEFAULT_CFG) -> Job:
    """Fill what the job left to the model: `size` (the model's own image side, 512 for SD1, 32
    for the demo) and `cfg` (the model's recommended scale, 7.5 when it names none)."""
    for run in job.runs:
        run.values["size"] = [s if s is not None else (size, size) for s in run.values["size"]]
        run.values["cfg"] = [c if c is not None else float(cfg) for c in run.values["cfg"]]
    return job


def axis_counts(tasks: list[Task]) -> dict[str, int]:
    """How many distinct values each parameter takes over the tasks."""
    counts = {}
    for axis in AXES[:-1]:
        key = "width" if axis == "size" else axis
        if axis == "size":
            counts[axis] = len({(t.width, t.height) for t in tasks})
        else:
            counts[axis] = len({getattr(t, key) for t in tasks})
    return counts


def iter_batches(tasks: list[Task], batch_size: int) -> Iterator[list[Task]]:
    """Compatible tasks (same steps, sampler, size, mode, strength) in batches of at most
    `batch_size`, in order of each group's first task."""
    groups: dict[tuple, list[Task]] = {}
    for task in tasks:
        groups.setdefault(task.batch_key(), []).append(task)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]
