"""Finding a model by path or by name (`demo`, `v1-5-pruned-emaonly`) in the weights folders."""

import os
from pathlib import Path

from .read import CheckpointError
from .source import is_diffusers_folder


def weights_dir() -> Path:
    """Where users drop weights: $SDBATCH_WEIGHTS, default ./weights."""
    return Path(os.environ.get("SDBATCH_WEIGHTS", "weights"))


SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent.parent / "weights"  # the checkout's weights/ (demo/)


def resolve_model(model: str | Path) -> Path:
    """A path as given, or a name looked up in the weights folder, then in the checkout's weights/
    (which holds the shipped `demo`). A folder holding `model.safetensors` stands for that file."""
    path = Path(model)
    if _exists(path):
        return _model_file(path)
    looked = []
    shown = str(model) if len(str(model)) <= 200 else str(model)[:199] + "…"
    if not is_name(model):  # a name is looked up inside the weights folders only
        raise CheckpointError(f"model {shown!r} not found")
    for base in dict.fromkeys((weights_dir(), SHIPPED_WEIGHTS)):
        for candidate in (base / path, base / f"{model}.safetensors", base / f"{model}.ckpt"):
            looked.append(str(candidate))
            if _exists(candidate):
                return _model_file(candidate)
    raise CheckpointError(f"model {shown!r} not found; looked for {', '.join(p[:300] for p in looked[:4])}")


def is_name(model: str | Path) -> bool:
    """Whether `model` can name a model inside the weights folders: not absolute, no `..`."""
    path = Path(model)
    return not path.is_absolute() and ".." not in path.parts


def _exists(path: Path) -> bool:
    """A path the OS cannot even look up (a name too long, a NUL) names no model."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _model_file(path: Path) -> Path:
    """The file a found path stands for, absolute: images and manifests record it, and a relative
    one (weights/demo/...) named nothing once `rerun` ran from another folder."""
    if path.is_dir() and not is_diffusers_folder(path) and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    return path.absolute()
