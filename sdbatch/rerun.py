"""`sdbatch rerun IMAGE`: render an image again from the recipe in its PNG metadata."""

import json
from pathlib import Path

from .errors import InputError
from .jobs import Task, task_id
from .output import A1111_SAMPLERS, a1111_parameters, parse_a1111_parameters, png_bytes, read_png_text, write_atomic


def task_from_image(path: Path) -> tuple[Task, str | None, dict]:
    """The task an image was rendered from, the model it names (if any) and its sdbatch metadata."""
    text = read_png_text(path)
    if "sdbatch" in text:
        meta = json.loads(text["sdbatch"])
        t = meta["task"]
        width, height = t["size"]
        task = Task(
            index=int(t.get("index", 0)),
            run=int(t.get("run", 0)),
            prompt=t["prompt"],
            negative=t["negative"],
            seed=int(t["seed"]),
            steps=int(t["steps"]),
            sampler=t["sampler"],
            karras=bool(t["karras"]),
            cfg=float(t["cfg"]),
            strength=t["strength"],
            width=int(width),
            height=int(height),
            init_image=t.get("init_image"),
            mask=t.get("mask"),
            id=t.get("id", ""),
        )
        return task, meta.get("model", {}).get("path"), meta
    if "parameters" in text:
        p = parse_a1111_parameters(text["parameters"])
        samplers = {v: k for k, v in A1111_SAMPLERS.items()}
        try:
            width, height = (int(v) for v in p["Size"].split("x"))
            strength = float(p["Denoising strength"]) if "Denoising strength" in p else None
            if strength is not None:
                raise InputError(f"{path}: an A1111 img2img image names no init image; rerun it from a job file")
            sampler = samplers.get(p["Sampler"].removesuffix(" Karras"))
            if sampler is None:
                raise InputError(f"{path}: sampler {p['Sampler']!r} has no sdbatch equivalent")
            task = Task(
                index=0,
                run=0,
                prompt=p["Prompt"],
                negative=p["Negative prompt"],
                seed=int(p["Seed"]),
                steps=int(p["Steps"]),
                sampler=sampler,
                karras=p.get("Schedule type") == "Karras" or p["Sampler"].endswith(" Karras"),
                cfg=float(p["CFG scale"]),
                strength=None,
                width=width,
                height=height,
            )
        except (KeyError, ValueError) as e:
            raise InputError(f"{path}: A1111 parameters without a usable {e}") from None
        return task, None, {}
    raise InputError(f"{path}: carries no generation parameters (no sdbatch or A1111 metadata)")


def rerun_image(image: Path, output: Path, model: str | None = None, device: str = "auto") -> Path:
    from .checkpoint import model_hash, model_sha256, resolve_model
    from .pipeline import Pipeline
    from .runner import _model_name, request_for, resolve_device

    task, named_model, meta = task_from_image(image)
    model = model or named_model
    if model is None:
        raise InputError(f"{image}: the metadata names no model file; pass --model")
    model_path = resolve_model(model)
    for key in ("init_image", "mask"):
        value = getattr(task, key)
        if value is not None and not Path(value).is_file():
            raise InputError(f"{image}: its {key} {value} no longer exists")
    device = resolve_device(device)
    import torch
    from PIL import Image

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipeline = Pipeline.from_file(model_path, device=device, dtype=dtype)
    images = [None if p is None else Image.open(p) for p in (task.init_image, task.mask)]
    [result] = pipeline.render([request_for(task, images[0], images[1])])
    if not result.ok:
        raise InputError(f"{image}: rendering failed again: {result.error}")
    short = model_hash(model_path)
    if meta:
        meta = dict(meta, model=dict(meta.get("model", {}), path=str(model_path), sha256=model_sha256(model_path)))
        meta["task"] = dict(meta["task"], id=task.id or task_id(task, model_sha256(model_path)))
    text = {"parameters": a1111_parameters(task, short, _model_name(model_path), _version())}
    if meta:
        text["sdbatch"] = json.dumps(meta, ensure_ascii=False)
    output.mkdir(parents=True, exist_ok=True)
    target = output / image.name
    if target.resolve() == image.resolve():
        raise InputError(f"{target} is the image itself; choose another --output")
    write_atomic(target, png_bytes(result.image, text))
    return target


def _version() -> str:
    from . import __version__

    return __version__
