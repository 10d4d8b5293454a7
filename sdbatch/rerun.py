"""`sdbatch rerun IMAGE`: render an image again from the recipe in its PNG metadata (our `sdbatch`
chunk, else A1111's `parameters` text), with the same rules a job file's values are held to."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__
from .addons.embeddings import IMAGE_SUFFIXES
from .addons.library import EMBEDDING_SUFFIXES, LORA_SUFFIXES, UPSCALER_SUFFIXES, Addons, Folders, check_addons
from .checkpoints import is_name, model_sha256, resolve_model
from .errors import InputError
from .files import content_sha256, prepare_folder, write_atomic
from .images import image_sha256, open_image
from .jobs import Task
from .output.a1111 import parse_infotext
from .output.png import png_bytes, read_png_text
from .plan import ModelInfo, addon_library, recipe_addons
from .recipe import Recipe
from .text import printable, text_problem


def recipe_from_image(path: Path) -> tuple[Recipe, dict[str, Any]]:
    """The recipe an image was rendered from, and its sdbatch metadata ({} for an A1111 image).
    Metadata is data from a file: anything that is not what sdbatch writes (not JSON, not an
    object, values of the wrong type, text that cannot be written back) is an InputError."""
    text = read_png_text(path)
    shown = printable(str(path))
    if "sdbatch" in text:
        damaged = f"{shown}: its sdbatch metadata is damaged"
        try:
            meta = json.loads(text["sdbatch"])
        except (ValueError, RecursionError) as e:
            raise InputError(f"{damaged} (not JSON: {e})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("task"), dict):
            raise InputError(f"{damaged} (it must be a JSON object with a task object)")
        if not isinstance(meta.get("model", {}), dict):
            raise InputError(f"{damaged} (its model must be a JSON object)")
        if problem := _text_problem(meta):
            raise InputError(f"{damaged}: {problem}")
        record = meta["task"]
        for key in ("index", "run"):
            value = record.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 10**9:
                raise InputError(f"{damaged}: task {key} {str(value)[:40]} is not a whole number from 0")
        return _checked(lambda: Recipe.from_record(record, where=f"{damaged}: ")), meta
    if "parameters" in text:
        recipe = _checked(lambda: Recipe.from_a1111(text["parameters"], where=f"{shown}: "))
        for key in ("prompt", "negative"):
            if problem := text_problem(getattr(recipe, key), multiline=True):
                raise InputError(f"{shown}: its A1111 parameters are damaged: {key} {problem}")
        return recipe, {}
    raise InputError(f"{shown}: carries no generation parameters (no sdbatch or A1111 metadata)")


def _checked(make: Callable[[], Recipe]) -> Recipe:
    """A recipe from metadata; a number too large for a float (cfg 1e400 written as an integer)
    is damage like any other, not a crash."""
    try:
        return make()
    except (OverflowError, RecursionError) as e:
        raise InputError(f"a value in the image's metadata is out of range ({e})") from None


def _text_problem(value: Any, field: str = "", depth: int = 0) -> str | None:
    """The first text in the metadata that could not be written back into a PNG or shown."""
    if isinstance(value, str):
        problem = text_problem(value, multiline=field in ("prompt", "negative"))
        return f"{field or 'a value'} {problem}" if problem else None
    if depth > 20:
        return "nested too deep"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and (problem := text_problem(key)):
            return f"a key {problem}"
        if problem := _text_problem(item, key if isinstance(key, str) else field, depth + 1):
            return problem
    return None


def rerun_image(image: Path, output: Path, model: str | None = None, device: str = "auto") -> Path:
    recipe, meta = recipe_from_image(image)
    shown = printable(str(image))
    named = meta.get("model", {}).get("path")
    if named is not None and not isinstance(named, str):
        raise InputError(f"{shown}: its sdbatch metadata is damaged (the model path is not text)")
    if (model or named) is None:
        raise InputError(f"{shown}: the metadata names no model file; pass --model")
    info = ModelInfo.of(model or _recorded_model(meta.get("model", {}), named, shown))
    for key in ("init_image", "mask"):
        value = getattr(recipe, key)
        if value is not None and not Path(value).is_file():
            raise InputError(f"{shown}: its {key} {printable(value)} no longer exists")
        if value is not None:
            open_image(value, f"{shown}: its {key} {printable(value)}")  # damaged or a bomb: refused before rendering
            _check_source(meta, key, value, shown)
    if output.exists() and not output.is_dir():  # said before rendering, not after
        raise InputError(f"output folder {printable(str(output))}: exists and is not a folder")
    target = output / image.name
    if target.resolve() == image.resolve():
        raise InputError(f"{printable(str(target))} is the image itself; choose another --output")

    record = meta.get("task", {})
    addons = find_addons(recipe, record.get("addons", {}), _a1111_hashes(image, meta), shown, bool(meta), info)
    check_addons(addons, info.config)
    task_id = recipe.task_id(info.id, content_sha256, addons.id_data())
    sources = tuple((k, image_sha256(v)) for k in ("init_image", "mask") if (v := getattr(recipe, k)) is not None)
    task = Task(record.get("index", 0), record.get("run", 0), task_id, recipe, addons, sources)
    from .render import ModelSpec, build_renderer, parse_devices

    render = build_renderer(ModelSpec(str(info.path), None, parse_devices(device)[0]))
    [(picture, error)] = render([task])
    if picture is None:
        raise InputError(f"{shown}: rendering failed again: {error}")
    text = {"parameters": recipe.to_a1111(info.a1111(), __version__, addons.a1111())}
    if meta:
        meta = dict(meta, model=info.record(), task=dict(record, id=task.id) | _addon_record(addons))
        if sources:
            meta["task"]["sources"] = {k: {"path": getattr(recipe, k), "sha256": sha} for k, sha in sources}
        text["sdbatch"] = json.dumps(meta, ensure_ascii=False)
    prepare_folder(output)
    write_atomic(target, png_bytes(picture, text))
    return target


def _found(model: str) -> bool:
    try:
        resolve_model(model)
    except InputError:
        return False
    return True


def _recorded_model(record: dict[str, Any], path: str, shown: str) -> str:
    """The model an image names: its recorded path, else (moved, another machine) the model of its
    recorded name in the weights folders when that file's sha256 is the recorded one."""
    if _found(path):
        return path
    name, sha256 = record.get("name"), record.get("sha256")
    plain = isinstance(name, str) and name and is_name(name)  # a name, never a path a crafted image names
    if plain and isinstance(sha256, str) and _found(name):
        found = resolve_model(name)
        if model_sha256(found) == sha256:
            return str(found)
        raise InputError(f"{shown}: its model {printable(path)} is gone, and {found} is another file; pass --model")
    return path  # not found: resolve_model says where it looked


def _check_source(meta: dict[str, Any], key: str, path: str, shown: str) -> None:
    """An input image that is not the one the image was made from (the sha256 its record holds) is
    refused: rendering it would make another picture under the old one's name."""
    sources = meta.get("task", {}).get("sources") if isinstance(meta.get("task"), dict) else None
    recorded = sources.get(key) if isinstance(sources, dict) else None
    sha = recorded.get("sha256") if isinstance(recorded, dict) else None
    if sha is not None and sha != image_sha256(path):
        raise InputError(
            f"{shown}: its {key} {printable(path)} has changed since the image was made (its sha256 differs); "
            "put the original back to render it again"
        )


def _addon_record(addons: Addons) -> dict[str, Any]:
    return {"addons": addons.record()} if addons else {}


def _a1111_hashes(image: Path, meta: dict[str, Any]) -> dict[str, dict[str, str]]:
    """An A1111 image's `Lora hashes` and `TI hashes` as {"lora": {name: hash}, "embedding": ...}."""
    if meta:
        return {}
    return addon_hashes(read_png_text(image).get("parameters", ""))


def addon_hashes(infotext: str) -> dict[str, dict[str, str]]:
    """An infotext's `Lora hashes` and `TI hashes` as {"lora": {name: hash}, "embedding": ...}."""
    _, _, pairs = parse_infotext(infotext)
    out: dict[str, dict[str, str]] = {}
    for kind, key in (("lora", "Lora hashes"), ("embedding", "TI hashes")):
        for item in str(pairs.get(key, "")).split(","):
            name, _, short = item.strip().rpartition(":")
            if name.strip() and short.strip():
                out.setdefault(kind, {})[name.strip()] = short.strip().lower()
    return out


def _recorded_folders(listed: Any) -> list[Path]:
    """The folders an image's add-ons were in when it was made (looked in first by rerun): each only
    while the recorded add-on file is still there, so a crafted image cannot make rerun list `/`."""
    paths = [e.get("path") for e in listed if isinstance(e, dict)] if isinstance(listed, list) else []
    return list(dict.fromkeys(Path(p).parent for p in paths if isinstance(p, str) and p and _is_file(p)))


ADDON_SUFFIXES = {*LORA_SUFFIXES, *EMBEDDING_SUFFIXES, *UPSCALER_SUFFIXES, *IMAGE_SUFFIXES}


def _is_file(path: str) -> bool:
    try:
        return Path(path).suffix.lower() in ADDON_SUFFIXES and Path(path).is_file()
    except (OSError, ValueError):  # a name too long, a NUL
        return False


def find_addons(
    recipe: Recipe, recorded: Any, a1111: dict[str, dict[str, str]], shown: str, ours: bool, model: ModelInfo
) -> Addons:
    """The recipe's LoRAs and embeddings, found by name in the add-on folders, and checked against
    what the image records: our chunk's full sha256 of each (`ours`: it lists every add-on used,
    so one found now that it does not list would change the picture), or A1111's short hashes. A
    file that is missing or is not the one the image was made with is refused, never used instead."""
    if not isinstance(recorded, dict):
        raise InputError(f"{shown}: its sdbatch metadata is damaged (addons is not an object)")
    folders = {kind: _recorded_folders(recorded.get(kind)) for kind in ("loras", "embeddings")}
    upscaler = recorded.get("upscaler")
    folders["upscalers"] = _recorded_folders([upscaler] if isinstance(upscaler, dict) else [])
    library = addon_library(None, model)
    library.folders = Folders.of(folders["loras"], folders["embeddings"], folders["upscalers"])
    addons = recipe_addons(library, recipe)
    if ours and addons.upscaler is not None:
        sha = upscaler.get("sha256") if isinstance(upscaler, dict) else None
        if sha != addons.upscaler.sha256:
            raise InputError(
                f"{shown}: upscaler {printable(addons.upscaler.name)!r} ({printable(addons.upscaler.path)}) is not "
                "the file the image was made with (its sha256 differs); put that file back to render it again"
            )
    for kind, uses in (("lora", addons.loras), ("embedding", addons.embeddings)):
        what = "LoRA" if kind == "lora" else "embedding"
        listed = recorded.get("loras" if kind == "lora" else "embeddings", [])
        if not isinstance(listed, list) or not all(isinstance(e, dict) for e in listed):
            raise InputError(f"{shown}: its sdbatch metadata is damaged ({kind}s is not a list of objects)")
        full = {e.get("name"): e.get("sha256") for e in listed}
        short = a1111.get(kind, {})
        for use in uses:
            a1111_name = use.name.replace(":", "").replace(",", "")
            if ours and use.name not in full:
                raise InputError(
                    f"{shown}: {what} {printable(use.name)!r} ({printable(use.path)}) would now apply to its prompt, "
                    f"but the image was made without it; move it out of the {kind} folder to render the image again"
                )
            if (ours and full[use.name] != use.sha256) or (a1111_name in short and short[a1111_name] != use.short):
                made = str(full[use.name])[:12] if ours else short[a1111_name]
                raise InputError(
                    f"{shown}: {what} {printable(use.name)!r} found at {printable(use.path)} is not the file the image "
                    f"was made with (hash {printable(made)}, this file {use.sha256[:12] if ours else use.short})"
                )
        found = {u.name for u in uses} | {u.name.replace(":", "").replace(",", "") for u in uses}
        missing = [n for n in [*full, *short] if n not in found]
        if missing:
            made = f" (hash {printable(str(short[missing[0]]))})" if missing[0] in short else ""
            raise InputError(
                f"{shown}: {what} {printable(str(missing[0]))!r}{made} the image was made with is not in its prompt "
                f"or not found in the {kind} folders; rendering without it would give another picture"
            )
    return addons
