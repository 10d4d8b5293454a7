"""`sdbatch import`: an A1111 (or civitai) PNG or infotext -> a job file that renders that picture.

Every key of the infotext is mapped onto a recipe field through `recipe.A1111_KEYS` (the same table
`rerun` reads), the model is found in the weights folders by A1111's `Model hash` (the 10-digit sha256
prefix, or the 8-digit hash of A1111 before 1.0), and the prompt's LoRAs and embeddings are checked
against `Lora hashes` / `TI hashes`. A key sdbatch cannot reproduce (ADetailer, ControlNet, an unknown
sampler) is an error naming every such key; with `lenient` each key sdbatch has no field for (an
extension's, a VAE) is written into the job as a comment and returned as a warning instead. Never
silently dropped, and a value sdbatch has a field for is never reset to a default: one that cannot be
reproduced (an upscaler it cannot run, a NaN) is an error even with `lenient`.

The job holds every value the infotext gives (a value left out would take the model's default, the
demo's 32x32 say), its model by absolute path (or a shipped one by name), so that it renders the same
from any folder. It is then the user's to edit into a sweep (`seed: 1-8`, `cfg: 5-9`...).
"""

import hashlib
from pathlib import Path
from typing import Any

import yaml

from .checkpoints import SHIPPED_WEIGHTS, CheckpointError, model_hash, resolve_model, weights_dir
from .errors import InputError
from .files import TooLarge, read_limited, write_atomic
from .jobs.job import HIRES_KEYS
from .jobs.wildcards import has_syntax
from .output.a1111 import parse_infotext
from .output.png import read_png_text
from .prompts.networks import lora_tags
from .recipe import DEFAULTS, FIELDS, Recipe, RecipeError, a1111_values
from .text import printable

MODEL_SUFFIXES = (".safetensors", ".ckpt")
HIRES_FIELDS = {field: key for key, field in HIRES_KEYS.items()}  # hires_scale -> scale, strength -> denoise
MAX_TEXT = 1 << 20  # bytes of a parameters text file
LENIENT = (
    " (--lenient leaves out, as comments, the fields sdbatch has no equivalent for: an extension's, a VAE, face "
    "restoration...; it never resets a value sdbatch reproduces: prompt, size, seed, steps, CFG scale, sampler, "
    "schedule, denoising strength, noise and seed settings, emphasis, clip skip, upscaler)"
)
PROMPTS = {
    "prompt": "prompt",
    "negative": "negative prompt",
    "hires_prompt": "Hires prompt",
    "hires_negative": "Hires negative prompt",
}
# always written, even at sdbatch's default: a job leaves size and cfg to the model (the demo's 32x32, cfg 4)
WRITTEN = ("prompt", "negative", "compat", "rng", "size", "sampler", "steps", "cfg", "seed")


def read_infotext(source: Path) -> str:
    """The `parameters` text of a PNG, or a text file's contents (UTF-8)."""
    shown = printable(str(source))
    try:
        head = read_limited(source, 12, head=True)
    except OSError as e:
        raise InputError(f"{shown}: cannot read ({e.strerror or e})") from None
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff")) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        text = read_png_text(source)  # a JPEG's or WebP's is its EXIF UserComment, as A1111 writes it
        if "parameters" not in text:
            raise InputError(f"{shown}: carries no A1111 parameters (no `parameters` text, no EXIF UserComment)")
        return text["parameters"]
    try:
        return read_limited(source, MAX_TEXT).decode("utf-8-sig")
    except TooLarge as e:
        raise InputError(f"{shown}: {e}; an infotext is a few KB") from None
    except OSError as e:
        raise InputError(f"{shown}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise InputError(f"{shown}: neither a PNG nor UTF-8 text") from None


def import_job(source: Path, lenient: bool = False, output: Path | None = None) -> tuple[str, list[str]]:
    """(the job file's YAML text, warnings); with `output`, the job is written there too (checked
    first, before any model is hashed). InputError naming everything that cannot be reproduced (with
    `lenient`, an extension's key is a warning and a comment in the job instead)."""
    shown = printable(str(source))
    if output is not None:
        check_output(output)
    text = read_infotext(source)
    tail = LENIENT if lenient else ""
    try:
        values = a1111_values(text, where=f"{shown}: ", lenient=lenient)
    except RecipeError as e:  # with lenient: a value that does not parse, or no Steps, Size...
        raise RecipeError(f"{e}{tail}") from None
    dropped: dict[str, Any] = dict(values.pop("unreproduced", {}))
    hires = values.get("hires_scale") is not None or values.get("hires_size") is not None
    unhired = [k for k in dropped if k.startswith("Hires") or k == "First pass size"]
    if unhired and values.get("strength") is not None and not hires:  # the hires pass's denoise
        raise InputError(
            f"{shown}: Denoising strength is that of a hires fix sdbatch cannot reproduce ({', '.join(unhired)}){tail}"
        )
    if values.get("strength") is not None and not hires:
        message = "an img2img image: its parameters do not name its init image (give it in a job: init_image)"
        raise InputError(f"{shown}: {message}{tail}")
    for name, what in PROMPTS.items():
        if has_syntax(values.get(name) or ""):
            expands = "which a job file expands as variants or wildcards"
            raise InputError(f"{shown}: the {what} holds {{a|b}} or __name__, {expands}{tail}")
    notes: list[str] = []
    recipe = _recipe(values, shown, lenient)
    _, _, pairs = parse_infotext(text)
    model, model_note = find_model(str(pairs.get("Model hash", "")), str(pairs.get("Model", "")))
    if model_note:
        if not lenient:
            raise InputError(f"{shown}: {model_note}")
        notes.append(model_note)
    if model is not None:
        notes += _check_addons(recipe, text, shown, model, lenient)
    if dropped and not lenient:
        raise InputError(f"{shown}: sdbatch cannot reproduce these A1111 fields yet: {', '.join(dropped)}")
    warnings = [f"not reproduced: {k}: {v}" for k, v in dropped.items()] + notes
    name = _model_entry(Path(model)) if model is not None else str(pairs.get("Model", "")) or "demo"
    job = _yaml(source, recipe, set(values), name, warnings)
    if output is not None:
        write_job(output, job)
    return job, warnings


def check_output(output: Path) -> None:
    """InputError, in one line, unless `output` can name a job file to write: a file name (not a
    folder) in a folder that exists."""
    shown = printable(str(output))
    if output.name in ("", ".", ".."):  # -o "" is Path("."), a folder
        raise InputError(f"-o {shown!r}: name the job file to write, e.g. -o job.yaml")
    if output.is_dir():
        raise InputError(f"{shown}: is a folder; name the job file to write in it, e.g. {shown}/job.yaml")
    if not output.parent.is_dir():
        raise InputError(f"{shown}: cannot write there: the folder {printable(str(output.parent))} does not exist")


def write_job(output: Path, text: str) -> None:
    """Write the job atomically; an OSError is one line naming `output` (never the temp file)."""
    check_output(output)
    try:
        write_atomic(output, text.encode())
    except OSError as e:
        raise InputError(f"{printable(str(output))}: cannot write ({e.strerror or type(e).__name__})") from None


def _recipe(values: dict[str, Any], shown: str, lenient: bool) -> Recipe:
    """The recipe of the values, or RecipeError: a value sdbatch reproduces is never reset to a
    default to get past a rule, not even with `lenient` (the picture would be another one)."""
    try:
        return Recipe(**values).check(f"{shown}: ")
    except RecipeError as e:
        raise RecipeError(f"{e}{LENIENT if lenient else ''}") from None


def _model_entry(path: Path) -> str:
    """The job's `model:`: a shipped model by its name (`demo`), any other by its absolute path (a
    relative one would be read relative to the job file, or the working folder, wherever it is)."""
    absolute = path.absolute()
    try:
        inside = absolute.resolve().relative_to(SHIPPED_WEIGHTS.resolve())
    except ValueError:
        return str(absolute)
    name = str(inside.parent if inside.name == "model.safetensors" else inside.with_suffix(""))
    try:
        same = resolve_model(name).resolve() == absolute.resolve()  # not shadowed in the weights folder
    except (CheckpointError, OSError):
        same = False
    return name if same else str(absolute)


def find_model(short: str, name: str) -> tuple[str | None, str | None]:
    """(the model file with A1111's hash `short`, None) or (None, why not): the file named `name`
    first, then every model file in the weights folders (hashes are cached by path, size and mtime)."""
    if not short:
        return None, "the parameters carry no Model hash; set model: in the job"
    candidates: list[Path] = []
    for base in dict.fromkeys((weights_dir(), SHIPPED_WEIGHTS)):
        if base.is_dir():
            candidates += sorted(p for p in base.rglob("*") if p.suffix in MODEL_SUFFIXES and _is_model(p, base))
    candidates.sort(key=lambda p: (p.stem != name and p.parent.name != name,))
    for path in candidates:
        if _a1111_hash(path, len(short)) == short.lower():
            return str(path), None
    return None, f"no model with Model hash {short} ({printable(name) or 'no name'}) in {weights_dir()}/"


def _is_model(path: Path, base: Path) -> bool:
    """Not an add-on: LoRAs, embeddings and upscalers live in their own subfolders."""
    parts = path.relative_to(base).parts
    return path.is_file() and not (set(parts[:-1]) & {"loras", "embeddings", "upscalers"})


def _a1111_hash(path: Path, length: int) -> str:
    """A1111's `Model hash`: 10 digits of the sha256 since 1.0; before, 8 digits of the sha256 of the
    64 KiB at offset 1 MiB (`model_hash` in its old sd_models.py)."""
    if length != 8:
        return model_hash(path)[:length]
    with path.open("rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _check_addons(recipe: Recipe, text: str, shown: str, model: str, lenient: bool) -> list[str]:
    """Notes: a `Lora hashes` / `TI hashes` name no prompt uses (A1111 and Forge can list networks of an
    earlier image: stale hashes) is a note and is not checked; every other is: a file missing, or
    one that is not the file the image was made with, is an error (a note with `lenient`)."""
    from .plan import ModelInfo
    from .rerun import addon_hashes, find_addons

    hashes = addon_hashes(text)
    notes = []
    for kind, listed in hashes.items():
        for name in [n for n in listed if not _used(recipe, kind, n)]:
            key = "Lora hashes" if kind == "lora" else "TI hashes"
            notes.append(f"{key} names {name!r}, which no prompt uses (a stale hash A1111 keeps): not checked")
            del listed[name]
    try:
        find_addons(recipe, {}, hashes, shown, False, ModelInfo.of(model))
    except InputError as e:
        message = str(e).removeprefix(f"{shown}: ")  # a file not found says so without the source's name
        if not lenient:
            raise InputError(f"{shown}: {message}") from None
        notes.append(message)
    return notes


def _used(recipe: Recipe, kind: str, name: str) -> bool:
    """Whether a prompt names the LoRA (its tag, as A1111 writes the name: without `:` and `,`) or
    the embedding (its name in any prompt; A1111 matches it by tokens, which ignore case)."""
    prompts = [recipe.prompt, recipe.negative, recipe.hires_prompt or "", recipe.hires_negative or ""]
    if kind == "lora":
        tags = [t.name for p in (prompts[0], prompts[2]) for t in lora_tags(p)] + [n for n, _, _ in recipe.lora]
        return name in {t.replace(":", "").replace(",", "") for t in tags}
    return any(name.lower() in p.lower() for p in prompts)


def _yaml(source: Path, recipe: Recipe, given: set[str], model: str, warnings: list[str]) -> str:
    """The job: name, model, then every field the infotext gives, or that is not at its default
    (WRITTEN always); hires fix's fields in a `hires:` block, its denoise among them."""
    job: dict[str, Any] = {"name": _name(source), "model": model}
    hires: dict[str, Any] = {}
    for field in FIELDS:
        value = getattr(recipe, field)
        shown = list(value) if isinstance(value, tuple) else value
        written = field in given or field in WRITTEN or value != DEFAULTS[field]
        key = HIRES_FIELDS.get(field)
        if recipe.hires and key is not None:
            if written or field == "strength":
                hires[key] = shown
        elif written:
            job[field] = shown
    if hires:
        job["hires"] = hires
    body = yaml.safe_dump(job, sort_keys=False, allow_unicode=True, width=10**6, default_flow_style=None)
    head = [f"# imported from {printable(str(source))} by sdbatch import; edit any value into a sweep"]
    head += [f"# {printable(w)}".replace("\n", " ") for w in warnings]
    return "\n".join(head) + "\n" + body


def _name(source: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in source.stem).strip("-")
    return stem[:100] or "imported"
