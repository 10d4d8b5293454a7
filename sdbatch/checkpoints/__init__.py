"""Weights on disk: reading files safely (read), what a file is (kinds), a single file or a
diffusers folder behind one type (source), finding models by name (locate), hashing (hashing),
and loading into our networks (load).

Everything but loading is torch-free, so that validating and planning a job read a model's header,
config and hash without importing torch; `load_model` and `save_checkpoint` import it on first use.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..models.configs import SDConfig
from .hashing import cache_dir, file_sha256
from .kinds import Kind, detect_kind
from .locate import SHIPPED_WEIGHTS, is_name, resolve_model, weights_dir
from .read import CheckpointError, TensorRef, WeightsFile, read_weights
from .source import (
    CONFIG_METADATA_KEY,
    DEFAULTS_METADATA_KEY,
    DiffusersFolder,
    ModelSource,
    SingleFile,
    check_model_files,
    config_from_diffusers,
    is_diffusers_folder,
    open_model,
    spot_shapes,
)

if TYPE_CHECKING:
    from .load import LoadedModel, check_tensors, load_model, save_checkpoint


def model_config(path: str | Path) -> SDConfig:
    """The config `load_model` would use for this model, read without loading any tensor."""
    return open_model(path).config()


def model_defaults(path: str | Path) -> dict[str, Any]:
    """Settings the model's maker recommends (e.g. {"cfg": 4.0}); empty when it names none."""
    return open_model(path).defaults()


def model_sha256(path: str | Path) -> str:
    return open_model(path).sha256()


def model_hash(path: str | Path) -> str:
    """The short 'Model hash' A1111 writes into PNG parameters: the first 10 hex digits of the sha256."""
    return model_sha256(path)[:10]


def describe(path: str | Path) -> tuple[Kind, dict[str, tuple[int, ...]], dict[str, str]]:
    """Kind, shapes and metadata of a file or diffusers folder without loading any tensor data."""
    source = open_model(path)
    return source.kind, source.shapes(), source.metadata()


def __getattr__(name: str):
    if name in ("LoadedModel", "check_tensors", "load_model", "save_checkpoint", "IGNORED_KEYS"):
        from . import load

        return getattr(load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CONFIG_METADATA_KEY",
    "DEFAULTS_METADATA_KEY",
    "SHIPPED_WEIGHTS",
    "CheckpointError",
    "DiffusersFolder",
    "Kind",
    "LoadedModel",
    "ModelSource",
    "SingleFile",
    "TensorRef",
    "WeightsFile",
    "cache_dir",
    "check_model_files",
    "check_tensors",
    "config_from_diffusers",
    "describe",
    "detect_kind",
    "file_sha256",
    "is_diffusers_folder",
    "is_name",
    "load_model",
    "model_config",
    "model_defaults",
    "model_hash",
    "model_sha256",
    "open_model",
    "read_weights",
    "resolve_model",
    "save_checkpoint",
    "spot_shapes",
    "weights_dir",
]
