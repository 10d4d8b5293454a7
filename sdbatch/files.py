"""Writing files so that a kill at any moment leaves either the old file or the whole new one.

Every file sdbatch writes (images, sheets, records, checkpoints, caches, training state) goes
through `write_atomic`: a hidden temp file next to the target named after this host and process,
flushed, fsynced and renamed over the target. `clean_temp_files` removes what dead processes left.
"""

import hashlib
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path


def content_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes: what ids use for init images and masks (their contents, not names)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def write_atomic(path: str | Path, data: bytes | Callable[[Path], None], mode: int | None = None) -> Path:
    """Write `data` (bytes, or a function that writes the file at the path it is given) to `path`
    atomically. `mode` sets the permission bits (default: what open() would give, i.e. the umask's)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        if callable(data):
            data(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def clean_temp_files(folder: Path) -> int:
    """Remove temp files this host's dead processes left in `folder`; returns how many."""
    removed = 0
    host = socket.gethostname()
    for tmp in folder.glob(".*.tmp-*"):
        m = re.search(r"\.tmp-(.+)-(\d+)$", tmp.name)
        if not m or m[1] != host:
            continue
        if int(m[2]) != os.getpid() and _alive(int(m[2])):
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
