"""Reading one weights file lazily: its tensor names, shapes and header, and each tensor on demand.

The safetensors header is read here directly (8-byte length, then JSON), so telling what a file is
needs no torch. `.ckpt/.pt/.pth/.bin` files go only through `torch.load(weights_only=True)`: no
pickled code is ever executed.
"""

import json
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import InputError

SHOW = 5  # how many offending keys an error message lists


class CheckpointError(InputError):
    """A weights file or folder that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TensorRef:
    """A tensor not read yet: its shape is known from the header, its data is read on `load()`."""

    shape: tuple[int, ...]
    load: Callable[[], Any]


@dataclass
class WeightsFile:
    path: Path
    tensors: dict[str, TensorRef]
    metadata: dict[str, str]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: ref.shape for k, ref in self.tensors.items()}


def read_weights(path: str | Path) -> WeightsFile:
    """Open a weights file lazily, or raise CheckpointError saying why it is not one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a weights file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); was the download interrupted?")
    with path.open("rb") as f:
        head = f.read(256)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return _read_torch(path, zip_format=head.startswith(b"PK"))
    if len(head) >= 9 and head[8:9] == b"{":
        return _read_safetensors(path, head, size)
    raise CheckpointError(f"{path}: not a weights file ({_describe_unknown(head)})")


def _describe_unknown(head: bytes) -> str:
    text = head.decode("utf-8", errors="replace")
    if text.startswith("version https://git-lfs"):
        return "a Git LFS pointer, not the weights: run `git lfs pull` in its repository"
    if "<html" in text.lower() or "<!doctype" in text.lower():
        return "an HTML page, probably a failed or login-walled download"
    if text.isprintable() or all(c.isprintable() or c.isspace() for c in text):
        return f"a text file starting with {text[:40]!r}"
    return f"unknown format, first bytes {head[:8].hex(' ')}"


def _read_safetensors(path: Path, head: bytes, size: int) -> WeightsFile:
    header_len = int.from_bytes(head[:8], "little")
    if 8 + header_len > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file (its header alone needs {8 + header_len} bytes, "
            f"the file has {size}); download it again"
        )
    with path.open("rb") as f:
        f.seek(8)
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        metadata = header.pop("__metadata__", None) or {}
        shapes = {k: tuple(int(n) for n in v["shape"]) for k, v in header.items()}
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors header ({first_line(e)}); download it again") from None
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file (its tensors need {8 + header_len + end} bytes, the file has "
            f"{size}); download it again"
        )
    opened: list = []  # the memory map, opened (with torch) on the first tensor read

    def load(key: str) -> Any:
        if not opened:
            from safetensors import safe_open

            opened.append(safe_open(str(path), framework="pt", device="cpu"))
        return opened[0].get_tensor(key)

    tensors = {k: TensorRef(shape, partial(load, k)) for k, shape in shapes.items()}
    return WeightsFile(path, tensors, {str(k): str(v) for k, v in metadata.items()})


def _read_torch(path: Path, zip_format: bool) -> WeightsFile:
    import torch

    try:
        # mmap keeps a multi-GB zip checkpoint out of RAM until each tensor is used (zip format only)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zip_format)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds Python objects other than tensors "
            f"({_unsupported_global(e)}). sdbatch never runs code from a checkpoint; convert the file to "
            ".safetensors with a tool you trust, or use a .safetensors release"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{path}: truncated or corrupted checkpoint ({first_line(e)}); download it again"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning / LDM training checkpoints wrap the weights
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {
        k: TensorRef(tuple(v.shape), partial(_identity, v))
        for k, v in obj.items()
        if isinstance(k, str) and isinstance(v, torch.Tensor)
    }
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (keys: {', '.join(map(str, list(obj)[:SHOW]))})")
    return WeightsFile(path, tensors, {})


def _identity(tensor: Any) -> Any:
    return tensor


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]


def _unsupported_global(error: BaseException) -> str:
    for line in str(error).splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip()[:200]
    return first_line(error)
