"""`sdbatch rerun IMAGE`: render an image again from the recipe in its PNG metadata (our `sdbatch`
chunk, else A1111's `parameters` text), with the same rules a job file's values are held to."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__
from .errors import InputError
from .files import content_sha256, write_atomic
from .images import open_image
from .jobs import Task
from .output.png import png_bytes, read_png_text
from .plan import ModelInfo
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
    info = ModelInfo.of(model or named)
    for key in ("init_image", "mask"):
        value = getattr(recipe, key)
        if value is not None and not Path(value).is_file():
            raise InputError(f"{shown}: its {key} {printable(value)} no longer exists")
        if value is not None:
            open_image(value, f"{shown}: its {key} {printable(value)}")  # damaged or a bomb: refused before rendering
    target = output / image.name
    if target.resolve() == image.resolve():
        raise InputError(f"{printable(str(target))} is the image itself; choose another --output")

    record = meta.get("task", {})
    task = Task(record.get("index", 0), record.get("run", 0), recipe.task_id(info.id, content_sha256), recipe)
    from .render import ModelSpec, build_renderer, parse_devices

    render = build_renderer(ModelSpec(str(info.path), None, parse_devices(device)[0]))
    [(picture, error)] = render([task])
    if picture is None:
        raise InputError(f"{shown}: rendering failed again: {error}")
    text = {"parameters": recipe.to_a1111(info.a1111(), __version__)}
    if meta:
        meta = dict(meta, model=info.record(), task=dict(record, id=task.id))
        text["sdbatch"] = json.dumps(meta, ensure_ascii=False)
    output.mkdir(parents=True, exist_ok=True)
    write_atomic(target, png_bytes(picture, text))
    return target
