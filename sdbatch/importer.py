"""`sdbatch import`: an A1111 (or civitai) PNG or infotext -> a job file that renders that picture.

Every key of the infotext is mapped onto a recipe field through `recipe.A1111_KEYS` (the same table
`rerun` reads), the model is found in the weights folders by A1111's `Model hash` (the 10-digit sha256
prefix, or the 8-digit hash of A1111 before 1.0), and the prompt's LoRAs and embeddings are checked
against `Lora hashes` / `TI hashes`. A key sdbatch cannot reproduce (Hires fix, ADetailer, ControlNet,
an unknown sampler) is an error naming every such key; with `lenient` each is written into the job
as a comment and returned as a warning instead. Never silently dropped.

The job is then the user's to edit into a sweep (`seed: 1-8`, `cfg: 5-9`...).
"""

import hashlib
from pathlib import Path
from typing import Any

import yaml

from .checkpoints import SHIPPED_WEIGHTS, model_hash, weights_dir
from .errors import InputError
from .files import TooLarge, read_limited
from .jobs.job import HIRES_KEYS
from .jobs.wildcards import has_syntax
from .output.a1111 import parse_infotext
from .output.png import read_png_text
from .recipe import DEFAULTS, FIELDS, Recipe, a1111_values
from .text import printable

MODEL_SUFFIXES = (".safetensors", ".ckpt")
HIRES_FIELDS = {field: key for key, field in HIRES_KEYS.items()}  # hires_scale -> scale, strength -> denoise
MAX_TEXT = 1 << 20  # bytes of a parameters text file


def read_infotext(source: Path) -> str:
    """The `parameters` text of a PNG, or a text file's contents (UTF-8)."""
    shown = printable(str(source))
    try:
        head = read_limited(source, 8, head=True)
    except OSError as e:
        raise InputError(f"{shown}: cannot read ({e.strerror or e})") from None
    if head.startswith(b"\x89PNG"):
        text = read_png_text(source)
        if "parameters" not in text:
            raise InputError(f"{shown}: carries no A1111 parameters (no `parameters` text chunk)")
        return text["parameters"]
    try:
        return read_limited(source, MAX_TEXT).decode("utf-8-sig")
    except TooLarge as e:
        raise InputError(f"{shown}: {e}; an infotext is a few KB") from None
    except OSError as e:
        raise InputError(f"{shown}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise InputError(f"{shown}: neither a PNG nor UTF-8 text") from None


def import_job(source: Path, lenient: bool = False) -> tuple[str, list[str]]:
    """(the job file's YAML text, warnings). InputError naming everything that cannot be reproduced
    (unless `lenient`: then each is a warning and a comment in the job)."""
    shown = printable(str(source))
    text = read_infotext(source)
    values = a1111_values(text, where=f"{shown}: ", lenient=lenient)
    dropped: dict[str, Any] = dict(values.pop("unreproduced", {}))
    hires = values.get("hires_scale") is not None or values.get("hires_size") is not None
    if any(k.startswith("Hires") for k in dropped) and values.get("strength") is not None and not hires:
        dropped["Denoising strength"] = values.pop("strength")  # the hires pass's, not an img2img's
    notes: list[str] = []
    if values.get("strength") is not None and not hires:
        message = "an img2img image: its parameters do not name its init image (set init_image in the job)"
        if not lenient:
            raise InputError(f"{shown}: {message}")
        dropped["Denoising strength"] = values.pop("strength")
        notes.append(message)
    for name in ("prompt", "negative"):
        if has_syntax(values.get(name, "")):
            message = f"the {name} holds {{a|b}} or __name__, which a job file expands as variants or wildcards"
            if not lenient:
                raise InputError(f"{shown}: {message}")
            notes.append(message)
    recipe = _recipe(values, shown, lenient, notes)
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
    return _yaml(source, recipe, model or str(pairs.get("Model", "")) or "demo", warnings), warnings


def _recipe(values: dict[str, Any], shown: str, lenient: bool, notes: list[str]) -> Recipe:
    """The recipe of the values; with `lenient`, a field that breaks a rule (DDIM under A1111's
    conventions, say) goes back to its default, with a note saying so."""
    while True:
        problems = list(Recipe(**values).problems())
        if not problems or not lenient:
            return Recipe(**values).check(f"{shown}: ")
        field, message = problems[0]
        if field not in values:
            return Recipe(**values).check(f"{shown}: ")  # a default breaks it: nothing to drop
        notes.append(f"{field} {values.pop(field)!r} left at its default {DEFAULTS[field]!r}: {message}")


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
    from .plan import ModelInfo
    from .rerun import addon_hashes, find_addons

    try:
        find_addons(recipe, {}, addon_hashes(text), shown, False, ModelInfo.of(model))
    except InputError as e:
        if not lenient:
            raise
        return [str(e).removeprefix(f"{shown}: ")]
    return []


def _yaml(source: Path, recipe: Recipe, model: str, warnings: list[str]) -> str:
    """The job: name, model, then every field that is not at its default (prompt always); hires
    fix's fields in a `hires:` block, its denoise among them."""
    job: dict[str, Any] = {"name": _name(source), "model": model}
    hires: dict[str, Any] = {}
    for field in FIELDS:
        value = getattr(recipe, field)
        shown = list(value) if isinstance(value, tuple) else value
        key = HIRES_FIELDS.get(field)
        if recipe.hires and key is not None and (value != DEFAULTS[field] or field == "strength"):
            hires[key] = shown
        elif field in ("prompt", "negative", "compat", "rng") or value != DEFAULTS[field]:
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
