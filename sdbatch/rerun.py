"""`sdbatch rerun IMAGE`: render an image again from the recipe in its PNG metadata (our `sdbatch`
chunk, else A1111's `parameters` text), with the same rules a job file's values are held to."""

import json
from pathlib import Path
from typing import Any

from . import __version__
from .errors import InputError
from .files import content_sha256, write_atomic
from .jobs import Task
from .output.png import png_bytes, read_png_text
from .plan import ModelInfo
from .recipe import Recipe


def recipe_from_image(path: Path) -> tuple[Recipe, dict[str, Any]]:
    """The recipe an image was rendered from, and its sdbatch metadata ({} for an A1111 image)."""
    text = read_png_text(path)
    if "sdbatch" in text:
        try:
            meta = json.loads(text["sdbatch"])
            record = meta["task"]
            if not isinstance(record, dict):
                raise TypeError("task is not a mapping")
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}: its sdbatch metadata is damaged ({e})") from None
        return Recipe.from_record(record, where=f"{path}: "), meta
    if "parameters" in text:
        return Recipe.from_a1111(text["parameters"], where=f"{path}: "), {}
    raise InputError(f"{path}: carries no generation parameters (no sdbatch or A1111 metadata)")


def rerun_image(image: Path, output: Path, model: str | None = None, device: str = "auto") -> Path:
    recipe, meta = recipe_from_image(image)
    named = meta.get("model", {}).get("path") if isinstance(meta.get("model"), dict) else None
    if (model or named) is None:
        raise InputError(f"{image}: the metadata names no model file; pass --model")
    info = ModelInfo.of(model or named)
    for key in ("init_image", "mask"):
        value = getattr(recipe, key)
        if value is not None and not Path(value).is_file():
            raise InputError(f"{image}: its {key} {value} no longer exists")
    target = output / image.name
    if target.resolve() == image.resolve():
        raise InputError(f"{target} is the image itself; choose another --output")

    record = meta.get("task", {})
    task = Task(int(record.get("index", 0)), int(record.get("run", 0)), recipe.task_id(info.id, content_sha256), recipe)
    from .render import ModelSpec, build_renderer, parse_devices

    render = build_renderer(ModelSpec(str(info.path), None, parse_devices(device)[0]))
    [(picture, error)] = render([task])
    if picture is None:
        raise InputError(f"{image}: rendering failed again: {error}")
    text = {"parameters": recipe.to_a1111(info.a1111(), __version__)}
    if meta:
        meta = dict(meta, model=info.record(), task=dict(record, id=task.id))
        text["sdbatch"] = json.dumps(meta, ensure_ascii=False)
    output.mkdir(parents=True, exist_ok=True)
    write_atomic(target, png_bytes(picture, text))
    return target
