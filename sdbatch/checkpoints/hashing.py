"""File hashes, cached: a 4 GB checkpoint takes seconds to hash, and every plan needs its sha256."""

import hashlib
import json
import os
from pathlib import Path

from ..files import write_atomic


def cache_dir() -> Path:
    """$SDBATCH_CACHE, else $XDG_CACHE_HOME/sdbatch, else ~/.cache/sdbatch."""
    if os.environ.get("SDBATCH_CACHE"):
        return Path(os.environ["SDBATCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdbatch"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, cached by (real path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    entry = cache_dir() / "hashes" / (hashlib.sha1(str(path).encode()).hexdigest() + ".json")
    stamp = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        cached = json.loads(entry.read_text())
        if all(cached.get(k) == v for k, v in stamp.items()) and len(cached.get("sha256", "")) == 64:
            return cached["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    sha = digest.hexdigest()
    try:  # best effort: an unwritable cache only costs the next run the same few seconds
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(entry, json.dumps(stamp | {"sha256": sha}).encode())
    except OSError:
        pass
    return sha
