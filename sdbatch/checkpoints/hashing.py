"""File hashes, cached: a 4 GB checkpoint takes seconds to hash, and every plan needs its sha256."""

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..files import write_atomic
from .read import CheckpointError, require_regular_file


def cache_dir() -> Path:
    """$SDBATCH_CACHE, else $XDG_CACHE_HOME/sdbatch, else ~/.cache/sdbatch."""
    if os.environ.get("SDBATCH_CACHE"):
        return Path(os.environ["SDBATCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdbatch"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, cached by (real path, size, mtime)."""
    return _cached(path, "file", lambda f: f)


def addnet_sha256(path: str | Path) -> str:
    """A1111's "addnet" hash of a .safetensors file: the sha256 of the bytes after the 8-byte length
    and the JSON header, so that editing a LoRA's metadata keeps its hash (`Lora hashes` uses it)."""

    def body(f: BinaryIO) -> BinaryIO:
        header = int.from_bytes(f.read(8), "little")
        if 8 + header > os.fstat(f.fileno()).st_size:
            raise CheckpointError(f"{path}: not a safetensors file (its header length is past the end)")
        f.seek(8 + header)
        return f

    return _cached(path, "addnet", body)


def _cached(path: str | Path, part: str, seek: Callable[[BinaryIO], BinaryIO]) -> str:
    path = Path(path).resolve()
    stat = path.stat()
    require_regular_file(path)
    name = str(path) if part == "file" else f"{path}#{part}"  # file hashes keep their old cache entries
    entry = cache_dir() / "hashes" / (hashlib.sha1(os.fsencode(name)).hexdigest() + ".json")
    stamp = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        cached = json.loads(entry.read_text())
        if all(cached.get(k) == v for k, v in stamp.items()) and len(cached.get("sha256", "")) == 64:
            return cached["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as f:
        seek(f)
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    sha = digest.hexdigest()
    try:  # best effort: an unwritable cache only costs the next run the same few seconds
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(entry, json.dumps(stamp | {"sha256": sha}).encode())
    except OSError:
        pass
    return sha
