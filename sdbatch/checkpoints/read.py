"""Reading one weights file lazily: its tensor names, shapes and header, and each tensor on demand.

Telling what a file is needs no torch. The safetensors header is read here directly (8-byte length,
then JSON). A `.ckpt/.pt/.pth/.bin` pickle is read by a restricted unpickler that knows only the
few globals a file of tensors names (OrderedDict, torch's tensor-rebuild functions, storage types):
it yields names and shapes, checks that every tensor's data is in the file, and refuses a pickle
that names anything else before anything is run. The tensors themselves are read later, only
through `torch.load(weights_only=True)`: no pickled code is ever executed.
"""

import io
import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import InputError

SHOW = 5  # how many offending keys an error message lists
MAX_HEADER = 100 * 2**20  # bytes of safetensors header JSON (SD 1.x: ~150 KB)
MAX_PICKLE = 64 * 2**20  # bytes of a checkpoint's pickle (SD 1.x: ~300 KB); the tensors are not in it


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


def require_regular_file(path: Path) -> None:
    """CheckpointError unless `path` (links followed) is a regular file: /dev/zero would be read or
    hashed for ever, a FIFO block in open()."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (a device, a FIFO, a socket): name a weights file")


def read_weights(path: str | Path) -> WeightsFile:
    """Open a weights file lazily, or raise CheckpointError saying why it is not one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a weights file")
    require_regular_file(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); was the download interrupted?")
    with path.open("rb") as f:
        head = f.read(256)
    if len(head) >= 9 and head[8:9] == b"{":  # first: a 128-byte header's length starts with 0x80 too
        return _read_safetensors(path, head, size)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return _read_torch(path, zip_format=head.startswith(b"PK"))
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
    if header_len > MAX_HEADER and 8 + header_len <= size:
        raise CheckpointError(f"{path}: corrupted safetensors header (it claims {header_len:,} bytes)")
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
        if not isinstance(metadata, dict):
            raise TypeError("__metadata__ is not a mapping")
        shapes = {k: _shape(v["shape"]) for k, v in header.items()}
        end = max((_offsets(v["data_offsets"])[1] for v in header.values()), default=0)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors header ({first_line(e)}); download it again") from None
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file (its tensors need {8 + header_len + end} bytes, the file has "
            f"{size}); download it again"
        )
    if 8 + header_len + end < size:  # safetensors itself refuses such a file when its tensors are read
        raise CheckpointError(
            f"{path}: damaged safetensors file ({size - 8 - header_len - end} bytes after its last tensor); "
            "download it again"
        )
    opened: list = []  # the memory map, opened (with torch) on the first tensor read

    def load(key: str) -> Any:
        if not opened:
            from safetensors import safe_open

            opened.append(safe_open(str(path), framework="pt", device="cpu"))
        return opened[0].get_tensor(key)

    tensors = {k: TensorRef(shape, partial(load, k)) for k, shape in shapes.items()}
    return WeightsFile(path, tensors, {str(k): str(v) for k, v in metadata.items()})


def _shape(value: Any) -> tuple[int, ...]:
    """A tensor shape from a file: up to 8 whole numbers, none negative."""
    if not isinstance(value, (list, tuple)) or len(value) > 8:
        raise ValueError(f"shape {str(value)[:40]} is not a list of at most 8 sizes")
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**48 for n in value):
        raise ValueError(f"shape {str(value)[:40]} holds something other than sizes")
    return tuple(value)


def _offsets(value: Any) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(n, int) for n in value):
        raise ValueError(f"data_offsets {str(value)[:40]} is not [begin, end]")
    if not 0 <= value[0] <= value[1]:
        raise ValueError(f"data_offsets {value} run backwards")
    return value[0], value[1]


def _read_torch(path: Path, zip_format: bool) -> WeightsFile:
    """Names and shapes from the pickle (no torch); tensors on demand through torch.load."""
    try:
        obj = _scan_zip(path) if zip_format else _scan_legacy(path)
    except _Refused as e:
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds Python objects other than tensors (it names "
            f"{e}). sdbatch never runs code from a checkpoint; convert the file to .safetensors with a "
            "tool you trust, or use a .safetensors release"
        ) from None
    except CheckpointError:
        raise
    except (
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        EOFError,
        OSError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        struct.error,
        RecursionError,
        MemoryError,
        NotImplementedError,  # zipfile: a compression method or version it does not know
    ) as e:
        raise CheckpointError(
            f"{path}: truncated or corrupted checkpoint ({first_line(e)}); download it again"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning / LDM training checkpoints wrap the weights
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    shapes = {k: v.shape for k, v in obj.items() if isinstance(k, str) and isinstance(v, _Tensor)}
    if not shapes:
        raise CheckpointError(f"{path}: holds no tensors (keys: {', '.join(map(str, list(obj)[:SHOW]))[:200]})")
    opened: list = []  # the whole file through torch.load, on the first tensor read

    def load(key: str) -> Any:
        if not opened:
            opened.append(_torch_load(path, zip_format))
        return opened[0][key]

    return WeightsFile(path, {k: TensorRef(shape, partial(load, k)) for k, shape in shapes.items()}, {})


def _torch_load(path: Path, zip_format: bool) -> dict:
    import torch

    try:
        # mmap keeps a multi-GB zip checkpoint out of RAM until each tensor is used (zip format only)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zip_format)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds Python objects other than tensors "
            f"({_unsupported_global(e)}). sdbatch never runs code from a checkpoint"
        ) from None
    except Exception as e:  # torch's reader raises many types on a damaged file
        raise CheckpointError(
            f"{path}: truncated or corrupted checkpoint ({first_line(e)}); download it again"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: changed while it was read (now a {type(obj).__name__})")
    return obj


# ----------------------------------------------------------------------------------------------------
# the restricted unpickler: what a file of tensors may name, as stand-ins that only record shapes


class _Refused(Exception):
    """The pickle names a global outside the allow-list; the message is its name."""


class _Tensor:
    """A tensor in the pickle: its shape, and the storage it views (checked against the file)."""

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any):
        self.shape = _shape(tuple(size))
        if not isinstance(storage, _Storage) or not isinstance(offset, int):
            raise ValueError("a tensor without its storage")
        if not isinstance(stride, (tuple, list)) or len(stride) != len(self.shape):
            raise ValueError(f"a tensor of shape {self.shape} with strides {str(stride)[:40]}")
        if all(self.shape):  # the last element it reads must be in its storage
            last = offset + sum((n - 1) * st for n, st in zip(self.shape, stride, strict=True) if isinstance(st, int))
            if offset < 0 or last >= storage.numel:
                raise ValueError(f"a tensor of shape {list(self.shape)} reaches past its storage")

    def __setstate__(self, state: Any) -> None:
        pass


class _Storage:
    def __init__(self, key: str, numel: int, itemsize: int):
        self.key, self.numel, self.itemsize = key, numel, itemsize


class _Marker:
    """A harmless stand-in for an allowed global that is not a function we emulate (a dtype, a
    storage type, torch.device): calling it, or setting its state, gives itself back."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> "_Marker":
        return self

    def __setstate__(self, state: Any) -> None:
        pass


def _parameter(data: Any, *rest: Any) -> Any:
    return data


def _from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    return func(*args)


_ITEMSIZE = {
    "Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1, "Byte": 1,
    "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16, "Untyped": 1,
}  # fmt: skip
_DTYPES = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"]
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _Tensor,
    ("torch._utils", "_rebuild_tensor"): _Tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch.nn.parameter", "Parameter"): _parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _from_type,
    ("torch", "Size"): tuple,
    ("torch", "Tensor"): _Marker("torch.Tensor"),
    ("torch", "device"): _Marker("torch.device"),
    ("torch.serialization", "_get_layout"): _Marker("torch.layout"),
    ("torch.storage", "UntypedStorage"): _Marker("UntypedStorage"),
    ("torch", "UntypedStorage"): _Marker("UntypedStorage"),
    ("_codecs", "encode"): lambda text, encoding="utf-8": str(text).encode(str(encoding)),
    ("builtins", "set"): set,
    ("builtins", "bytearray"): bytearray,
    ("__builtin__", "set"): set,  # protocol 2 spells builtins this way
    ("__builtin__", "bytearray"): bytearray,
    **{("torch", f"{kind}Storage"): _Marker(f"{kind}Storage") for kind in _ITEMSIZE},
    **{("torch", name): _Marker(name) for name in _DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, storages: dict[str, _Storage]):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}"[:120])
        return found

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise _Refused(f"a persistent object {str(pid)[:60]}")
        kind, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(numel, int) or numel < 0:
            raise ValueError(f"storage {key} of {numel!r} elements")
        itemsize = _ITEMSIZE.get(kind.name.removesuffix("Storage"), 1) if isinstance(kind, _Marker) else 1
        self.storages.setdefault(key, _Storage(key, numel, itemsize))
        return self.storages[key]


def _scan_zip(path: Path) -> Any:
    """The pickle of a zip checkpoint, unpickled with stand-ins; every storage must be in the zip."""
    with zipfile.ZipFile(path) as z:
        infos = {i.filename: i for i in z.infolist()}
        pickles = [n for n in infos if n.endswith("data.pkl") and n.count("/") == 1]
        if not pickles:
            raise CheckpointError(f"{path}: a zip file, but not a PyTorch checkpoint (no data.pkl in it)")
        prefix = pickles[0][: -len("data.pkl")]
        if infos[pickles[0]].file_size > MAX_PICKLE:
            raise CheckpointError(f"{path}: its pickle is {infos[pickles[0]].file_size:,} bytes; not a checkpoint")
        with z.open(pickles[0]) as f:
            data = f.read(MAX_PICKLE + 1)
        storages: dict[str, _Storage] = {}
        obj = _Unpickler(io.BytesIO(data), storages).load()
        for key, st in storages.items():
            info = infos.get(f"{prefix}data/{key}")
            if info is None or info.file_size < st.numel * st.itemsize:
                have = "missing" if info is None else f"{info.file_size:,} bytes, {st.numel * st.itemsize:,} needed"
                raise ValueError(f"the data of storage {key} is {have}")
    return obj


def _scan_legacy(path: Path) -> Any:
    """A pre-1.6 torch.save file: magic number, protocol, system info, then the object's pickle."""
    with path.open("rb") as raw:
        f = _Limited(raw, MAX_PICKLE)
        storages: dict[str, _Storage] = {}
        for _ in range(3):
            _Unpickler(f, storages).load()
        return _Unpickler(f, storages).load()


class _Limited:
    """A file that refuses to give more than `limit` bytes (a pickle that never ends is no checkpoint)."""

    def __init__(self, f: BinaryIO, limit: int):
        self._f, self._left = f, limit

    def _take(self, n: int) -> None:
        self._left -= n
        if self._left < 0:
            raise ValueError("the pickle goes on for more than 64 MB")

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n if n >= 0 else self._left + 1)
        self._take(len(data))
        return data

    def readline(self, n: int = -1) -> bytes:
        data = self._f.readline(n if n >= 0 else self._left + 1)
        self._take(len(data))
        return data


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
