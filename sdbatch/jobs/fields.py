"""How a job file writes each recipe field: one parser per field, in a table.

A parser takes one YAML item and returns the values it stands for (a range stands for many); the
recipe's own rule for the field (`sdbatch.recipe.RULES`) is then applied to each value, so the
rules live in one place and every message still points at the item's line.
"""

import difflib
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import TooLarge, read_limited
from ..hires import builtin
from ..images import RESIZE_MODES, ImageError, check_image
from ..prompts.networks import name_problem
from ..recipe import DEFAULTS, FIELDS, RULES
from ..samplers import SAMPLER_NAMES, SAMPLERS
from ..text import printable, text_problem
from .inputs import LATER, MISSING, SIZE_KINDS, MaskFolder, SizeOf
from .ranges import MAX_AXIS_VALUES, RangeError, parse_range
from .wildcards import expand, has_syntax

MODEL = object()  # a default the model decides (its size, its recommended CFG): filled in at expansion
# what a run gets for a field it does not set; a field missing here is required (prompt)
YAML_DEFAULTS: dict[str, Any] = {k: v for k, v in DEFAULTS.items() if k != "prompt"} | {
    "size": MODEL,
    "cfg": MODEL,
    "strength": 0.75,  # used by runs with an init_image; txt2img recipes carry none
}
RUN_OPTIONS = {"batch_size": "auto"}  # run keys that are not recipe fields (they change speed, not images)
PARAMS = (*FIELDS, *RUN_OPTIONS)
MAX_PROMPT_FILE = 16 * 2**20  # bytes; a prompt file is text someone wrote, not /dev/zero


@dataclass(frozen=True)
class RandomSeeds:
    """`seed: random` or `random [n]`: drawn once per run and recorded in the output folder."""

    count: int


@dataclass(frozen=True)
class RandomPrompts:
    """`prompt: {random: n, from: "{a|b} __animal__"}`: n of the prompts the text expands to,
    drawn once per run and recorded in the output folder like `seed: random` (the draws are
    numbers; draw d picks choices[d % len(choices)], or the next one not yet picked, so that the
    n prompts are distinct while there are n to pick from: a repeat would be merged into one task
    and the run would render fewer images than asked)."""

    count: int
    choices: tuple[str, ...]

    def pick(self, draws: list[int]) -> list[str]:
        n, taken, out = len(self.choices), set(), []
        for d in draws:
            i = d % n
            while len(taken) < n and i in taken:
                i = (i + 1) % n
            taken.add(i)
            out.append(self.choices[i])
        return out


RANDOM_VALUES = (RandomSeeds, RandomPrompts)  # values drawn when the job first runs


@dataclass
class Context:
    """What parsers need beyond the item: the job's folder, and what they learnt of image files."""

    base: Path
    image_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    wildcards: Path | None = None  # the job's `wildcards:` folder (else weights/wildcards)
    folders_used: bool = False  # some init_image came from {folder: ...}: file names keep the source
    notes: list[str] = field(default_factory=list)  # what validate and run say besides problems (skipped files)


def show(value: Any, limit: int = 60) -> str:
    """A YAML value as a user would recognise it in a message (one line, cut when long)."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a yes/no value)"
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, (set, frozenset, tuple, bytes)):
        return f"a {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------------
# the parsers


def _text(item: Any, ctx: Context) -> list:
    """A prompt, a prompt file, or a prompt with variants `{a|b}` / wildcards `__name__`, which
    stands for every prompt it expands to (sdbatch.jobs.wildcards)."""
    if isinstance(item, dict) and "random" in item:
        return [_random_prompts(item, ctx)]
    if isinstance(item, dict):
        prompts = _prompt_file(item, ctx)
    elif not isinstance(item, str):
        raise ValueError(f"must be text, got {show(item)}; put it in quotes")
    else:
        prompts = [item]
    if not any(has_syntax(p) for p in prompts):
        return prompts
    out = [q for p in prompts for q in expand(p, ctx.wildcards)]
    if len(out) > MAX_AXIS_VALUES:
        raise ValueError(f"variants and wildcards make more than {MAX_AXIS_VALUES:,} prompts")
    return out


def _random_prompts(item: dict, ctx: Context) -> RandomPrompts:
    count, text = item.get("random"), item.get("from")
    if set(item) != {"random", "from"} or not is_int(count) or not isinstance(text, str):
        raise ValueError('write random prompts as {random: 4, from: "a {red|blue} __animal__"}')
    if not 1 <= count <= MAX_AXIS_VALUES:
        raise ValueError(f"random: needs 1 <= n <= {MAX_AXIS_VALUES:,}")
    choices = tuple(expand(text, ctx.wildcards))
    for choice in choices:
        if message := RULES["prompt"](choice):
            raise ValueError(message)
    return RandomPrompts(count, choices)


def _prompt_file(item: dict, ctx: Context) -> list[str]:
    if set(item) != {"file"} or not isinstance(item["file"], str):
        raise ValueError("write a prompt file as {file: prompts.txt}")
    path = ctx.base / item["file"]
    if not path.exists():
        raise ValueError(f"prompt file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"prompt file {path} is not a regular file")
    try:
        data = read_limited(path, MAX_PROMPT_FILE)
    except TooLarge as e:
        raise ValueError(f"prompt file {path} is {e}") from None
    except OSError as e:
        raise ValueError(f"prompt file {path}: cannot be read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"prompt file {path}:{line} is not UTF-8 text") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            if problem := text_problem(line, multiline=True):
                raise ValueError(f"prompt file {path}:{number} {problem}")
            prompts.append(line)
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts (blank lines and # comments are skipped)")
    return prompts


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def _image(item: Any, ctx: Context) -> list:
    if item is None:
        return [None]
    if isinstance(item, dict):
        return _image_folder(item, ctx)
    if not isinstance(item, str) or not item.strip():
        raise ValueError(f"must be a path to an image or {{folder: ..., glob: ...}}, got {show(item)}")
    path = (ctx.base / item).resolve()
    if not path.is_file():
        raise ValueError(f"image {path} does not exist")
    _decode(path, ctx)
    return [str(path)]


def _mask(item: Any, ctx: Context) -> list:
    """A mask file, or `{folder: masks/, glob: ..., missing: skip | full}`: one value that pairs
    each init image with the mask of its file stem (sdbatch.jobs.inputs.MaskFolder)."""
    if not isinstance(item, dict):
        return _image(item, ctx)
    if "missing" in item and "mask_missing" in item:
        raise ValueError("missing and mask_missing are one setting; give it once")
    missing = item.get("missing", item.get("mask_missing"))  # the run key mask_missing lands here too
    if missing is not None and missing not in MISSING:
        raise ValueError(f"missing: must be skip or full, got {show(missing)}")
    listing = {k: v for k, v in item.items() if k not in ("missing", "mask_missing")}
    paths = _folder_images(listing, ctx, "{folder: masks/, missing: skip}")
    masks: dict[str, str] = {}
    for path in paths:
        if (other := masks.setdefault(Path(path).stem, path)) != path:
            raise ValueError(f"masks {Path(other).name} and {Path(path).name} share a file stem; keep one")
    return [MaskFolder(str((ctx.base / item["folder"]).resolve()), masks, missing)]


def _decode(path: Path, ctx: Context) -> None:
    """Decoded in full once: a damaged image fails at validate time, not halfway through a job. Only
    its size is kept (and the sha256 of the bytes read, for its task id): never its pixels."""
    if str(path) not in ctx.image_sizes:
        try:
            ctx.image_sizes[str(path)] = check_image(path)
        except ImageError as e:
            raise ValueError(str(e)) from None


def _image_folder(item: dict, ctx: Context) -> list:
    """`{folder: photos/, glob: "*.jpg"}` (or a list of globs, `**/*.png` reaching into subfolders):
    the images there in sorted order, as A1111's img2img batch tab takes a folder."""
    found = _folder_images(item, ctx, "{folder: photos/, glob: '*.jpg'}")
    ctx.folders_used = True
    return found


def _folder_images(item: dict, ctx: Context, example: str) -> list[str]:
    """The images a `{folder: ..., glob: ...}` mapping names, sorted. Hidden files and folders and
    files that are not images (by suffix) are skipped; an image that does not decode is an error
    naming it; a glob that matches no image is an error."""
    if unknown := sorted(set(map(str, item)) - {"folder", "glob"}):
        raise ValueError(f"unknown key {unknown[0]!r}; write {example}")
    if not isinstance(item.get("folder"), str) or not item["folder"].strip():
        raise ValueError("needs folder: the folder of images (relative to the job file)")
    folder = (ctx.base / item["folder"]).resolve()
    if not folder.is_dir():
        raise ValueError(f"folder {folder} does not exist")
    globs = item.get("glob", "*")
    globs = [globs] if isinstance(globs, str) else globs
    if not isinstance(globs, list) or not globs or not all(isinstance(g, str) and g.strip() for g in globs):
        raise ValueError(f"glob must be a pattern or a list of patterns, got {show(item.get('glob'))}")
    found: set[Path] = set()
    hidden_files: set[Path] = set()
    others: set[Path] = set()
    for pattern in globs:
        if pattern.startswith("/") or ".." in Path(pattern).parts:
            raise ValueError(f"glob {pattern!r} must stay inside the folder")
        for path in folder.glob(pattern):
            hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
            if not path.is_file():
                continue
            if hidden:
                hidden_files.add(path)
            elif path.suffix.lower() not in IMAGE_SUFFIXES:
                others.add(path)
            else:
                found.add(path)
                if len(found) > MAX_AXIS_VALUES:
                    raise ValueError(f"more than {MAX_AXIS_VALUES:,} images in {folder}")
    if hidden_files or others:
        shown = ", ".join(p.name for p in sorted(others)[:3]) + (", ..." if len(others) > 3 else "")
        parts = [f"{len(hidden_files)} hidden"] if hidden_files else []
        parts += [f"{len(others)} not an image by its suffix ({shown})"] if others else []
        ctx.notes.append(f"{printable(str(folder))}: skipped {' and '.join(parts)}")
    if not found:
        raise ValueError(f"no image in {folder} matches {', '.join(globs)}")
    for path in sorted(found):
        _decode(path, ctx)
    return [str(p) for p in sorted(found)]


def _size(item: Any, ctx: Context) -> list:
    """`512`, `[768, 512]`, `'768x512'`; or taken from each init image (sdbatch.jobs.inputs.SizeOf):
    `from_image`, `{width: 768}`, `{height: 768}`, `{max_pixels: 589824}`."""
    if item == "from_image":
        return [SizeOf("from_image")]
    if isinstance(item, dict):
        if len(item) != 1 or next(iter(item)) not in SIZE_KINDS:
            raise ValueError("write size from the image as {width: 768}, {height: 768} or {max_pixels: 589824}")
        [(kind, value)] = item.items()
        low, high = (64, 8192**2) if kind == "max_pixels" else (8, 8192)
        if not is_int(value) or not low <= value <= high or (kind != "max_pixels" and value % 8):
            wanted = f"a whole number from {low} to {high:,}" + ("" if kind == "max_pixels" else ", a multiple of 8")
            raise ValueError(f"{kind}: must be {wanted}, got {show(value)}")
        return [SizeOf(kind, value)]
    if is_int(item):
        return [(item, item)]
    if isinstance(item, list) and len(item) == 2 and all(is_int(v) for v in item):
        return [(item[0], item[1])]
    if isinstance(item, str) and (m := re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", item)):
        return [(int(m[1]), int(m[2]))]
    raise ValueError(f"must be 512, [width, height], '768x512', from_image or {{width: 768}}, got {show(item)}")


def _resize(item: Any, ctx: Context) -> list:
    """`just`, `crop`, `fill` (A1111's `Just resize`, `Crop and resize`, `Resize and fill` too), or
    `none`: an init image of another shape than the size is refused."""
    if item is None or item == "none":
        return [None]
    if not isinstance(item, str):
        raise ValueError(f"must be just, crop, fill or none, got {show(item)}")
    text = item.strip().lower()
    a1111 = {"just resize": "just", "crop and resize": "crop", "resize and fill": "fill"}
    value = a1111.get(text, text)
    if value not in RESIZE_MODES:
        raise ValueError(f"unknown resize {item!r} (known: just, crop, fill, none)")
    return [value]


def _sampler(item: Any, ctx: Context) -> list:
    if not isinstance(item, str):
        raise ValueError(f"must be a sampler name, got {show(item)}")
    text = item.strip().lower()
    name = SAMPLER_NAMES.get(text) or SAMPLER_NAMES.get(text.replace(" ", "_"))
    if name is not None:
        return [name]
    base = text.removesuffix(" karras").removesuffix("_karras")
    base = SAMPLER_NAMES.get(base) or SAMPLER_NAMES.get(base.replace(" ", "_"))
    if base is not None:
        raise ValueError(f"write sampler: {base} with karras: true")
    guess = difflib.get_close_matches(text.replace(" ", "_"), list(SAMPLERS), n=1, cutoff=0.5)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    raise ValueError(f"unknown sampler {item!r}{hint} (known: {', '.join(SAMPLERS)})")


def _flag(item: Any, ctx: Context) -> list:
    if not isinstance(item, bool):
        raise ValueError(f"must be true or false, got {show(item)}")
    return [item]


def _numbers(integer: bool) -> Callable[[Any, Context], list]:
    def parse(item: Any, ctx: Context) -> list:
        if isinstance(item, bool) or not isinstance(item, (int, float, str)):
            raise ValueError(f"must be a number or a range like 1-8, got {show(item)}")
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
        if not integer and abs(item) > 1e300:  # an integer of 400 digits has no float
            raise ValueError(f"{show(item)} is out of range")
        return [item if integer else float(item)]

    return parse


def _seed(item: Any, ctx: Context) -> list:
    if isinstance(item, str) and (m := re.fullmatch(r"\s*random\s*(?:\[\s*(\d+)\s*\])?\s*", item)):
        count = int(m[1] or 1)
        if not 1 <= count <= MAX_AXIS_VALUES:
            raise ValueError(f"random [n] needs 1 <= n <= {MAX_AXIS_VALUES:,}")
        return [RandomSeeds(count)]
    if item == -1:
        return [RandomSeeds(1)]  # A1111's "random"
    return _numbers(True)(item, ctx)


def _batch_size(item: Any, ctx: Context) -> list:
    if item == "auto":
        return [item]
    if not is_int(item) or not 1 <= item <= 4096:
        raise ValueError(f"must be auto or a whole number from 1 to 4096, got {show(item)}")
    return [item]


def _emphasis(item: Any, ctx: Context) -> list:
    """`original` (A1111's default), `no-norm`, `ignore` (brackets parsed away, weights not
    applied), `none` (brackets are plain text), `comfy`; A1111's own names (`No norm`) too."""
    if not isinstance(item, str):
        raise ValueError(f"must be an emphasis mode, got {show(item)}")
    return [item.strip().lower().replace(" ", "-")]


def _lora(item: Any, ctx: Context) -> list:
    """One set of LoRAs: `{add_detail: 0.6, film_grain: 0.3}`; a weight may be a sweep (`0.2-1.0
    [5]`, `[0.2, 0.8]`) and the set stands for every combination; `{name: {te: 0.5, unet: 1}}`
    weighs the text encoder and the UNet apart (each sweepable); `none` or `{}` is no LoRA. A list
    of sets (`lora: [{a: 1}, {b: 1}]`) is an axis of sets."""
    if item is None or item == "none" or item == {}:
        return [()]
    if not isinstance(item, dict):
        raise ValueError(f"must be LoRA names with weights, like {{add_detail: 0.6}}, or none; got {show(item)}")
    choices = []
    for name, weight in item.items():
        if problem := name_problem(name):
            raise ValueError(problem)
        if isinstance(weight, dict):
            if unknown := sorted(set(map(str, weight)) - {"te", "unet"}):
                raise ValueError(f"{name}: unknown key {unknown[0]!r}; write {{te: 0.5, unet: 1.0}}")
            te = _weights(name, weight.get("te", 1.0), ctx)
            unet = _weights(name, weight["unet"], ctx) if "unet" in weight else None
            choices.append([(name, t, u) for t in te for u in (unet or [t])])
        else:
            choices.append([(name, w, w) for w in _weights(name, weight, ctx)])
    combos = math.prod(len(c) for c in choices)
    if combos > MAX_AXIS_VALUES:
        raise ValueError(f"{combos:,} LoRA weight combinations; at most {MAX_AXIS_VALUES:,} per axis")
    return [tuple(combo) for combo in itertools.product(*choices)]


def _weights(name: str, weight: Any, ctx: Context) -> list[float]:
    items = weight if isinstance(weight, list) else [weight]
    if not items:
        raise ValueError(f"{name}: empty list of weights")
    try:
        return [w for item in items for w in _numbers(False)(item, ctx)]
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _word(item: Any, ctx: Context) -> list:
    """A name from a small set, in any case, spaces as `_` (A1111's `SGM Uniform` is sgm_uniform)."""
    if not isinstance(item, str):
        raise ValueError(f"must be a name, got {show(item)}")
    return [item.strip().lower().replace(" ", "_").replace("-", "_")]


def _rng(item: Any, ctx: Context) -> list:
    """`diffusers`, `a1111` (A1111's GPU noise; A1111's names GPU and NV too), `a1111-cpu` (CPU)."""
    if not isinstance(item, str):
        raise ValueError(f"must be a noise source, got {show(item)}")
    text = item.strip().lower()
    return [{"gpu": "a1111", "nv": "a1111", "cpu": "a1111-cpu"}.get(text, text)]


def _or_none(parse: Callable[[Any, Context], list]) -> Callable[[Any, Context], list]:
    """A hires override: `none` (null) keeps the first pass's value; else the field's own form."""
    return lambda item, ctx: [None] if item is None or item == "none" else parse(item, ctx)


def _hires_size(item: Any, ctx: Context) -> list:
    """`1024x768`, `[1024, 768]`, or one side 0 to keep the first pass's aspect (`1024x0`)."""
    if isinstance(item, str) and (m := re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", item)):
        return [(int(m[1]), int(m[2]))]
    if isinstance(item, list) and len(item) == 2 and all(is_int(v) for v in item):
        return [(item[0], item[1])]
    if is_int(item) and item > 0:  # `resize: 0x64` unquoted: YAML reads a hexadecimal number (100)
        raise ValueError(
            f"got the number {item}: YAML reads an unquoted {hex(item)} as hexadecimal; write '{hex(item)}'"
        )
    raise ValueError(f"must be [width, height] or '1024x768' (a side 0 keeps the aspect), got {show(item)}")


def _hires_text(item: Any, ctx: Context) -> list:
    """A second-pass prompt; empty means the first pass's, as A1111 reads an empty Hires prompt."""
    if isinstance(item, dict):
        raise ValueError("takes text (variants and wildcards expand), not a mapping")
    return [None] if item == "" else _text(item, ctx)


def _upscaler(item: Any, ctx: Context) -> list:
    """A latent or pixel mode in any spelling (`latent (bicubic)`, `Lanczos`), or a model's name."""
    if not isinstance(item, str) or not item.strip():
        raise ValueError(f"must be an upscaler (latent, lanczos, ... or a model's name), got {show(item)}")
    return [builtin(item) or item.strip()]


def _resize_from(item: Any, ctx: Context) -> list:
    return [None] if item is None or item == "none" else _size(item, ctx)


PARSERS: dict[str, Callable[[Any, Context], list]] = {
    "prompt": _text,
    "negative": _text,
    "emphasis": _emphasis,
    "clip_skip": _numbers(True),
    "lora": _lora,
    "init_image": _image,
    "mask": _mask,
    "size": _size,
    "resize": _resize,
    "sampler": _sampler,
    "karras": _flag,
    "schedule": _word,
    "compat": _word,
    "downcast_alphas": _flag,
    "steps": _numbers(True),
    "strength": _numbers(False),
    "cfg": _numbers(False),
    "hires_scale": _or_none(_numbers(False)),
    "hires_size": _or_none(_hires_size),
    "hires_upscaler": _upscaler,
    "hires_steps": _numbers(True),
    "hires_sampler": _or_none(_sampler),
    "hires_schedule": _or_none(_word),
    "hires_prompt": _or_none(_hires_text),
    "hires_negative": _or_none(_hires_text),
    "hires_cfg": _or_none(_numbers(False)),
    "rng": _rng,
    "ensd": _numbers(True),
    "seed_resize_from": _resize_from,
    "subseed_strength": _numbers(False),
    "subseed": _numbers(True),
    "seed": _seed,
    "batch_size": _batch_size,
}


def parse_item(key: str, item: Any, ctx: Context) -> list:
    """The values one YAML item stands for, each checked by the recipe's rule for the field."""
    values = PARSERS[key](item, ctx)
    rule = RULES.get(key)
    for value in values:
        if rule is not None and not isinstance(value, (*RANDOM_VALUES, *LATER)) and (message := rule(value)):
            raise ValueError(message)
    return values
