"""Writing files so that a kill at any moment leaves either the old file or the whole new one.

Every file sdbatch writes (images, sheets, records, checkpoints, caches, training state) goes
through `write_atomic`: a hidden temp file next to the target named after this host and process,
flushed, fsynced and renamed over the target. `clean_temp_files` removes what dead processes left.
"""

import errno
import hashlib
import json
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path

from .errors import InputError

NAME_MAX = 255  # bytes in one file name on every filesystem we write to


def content_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes: what ids use for init images and masks (their contents, not names)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class TooLarge(ValueError):
    """A text file past the limit its reader set (`read_limited`)."""


def read_limited(path: str | Path, limit: int, head: bool = False) -> bytes:
    """The bytes of a text file someone wrote (a job, a prompt or wildcard file, an infotext), read
    to at most `limit` bytes: never the size the file system reports, which is 0 for /dev/zero, a
    FIFO or a /proc file, so no such path can fill the memory, and a FIFO with no writer reads as
    empty instead of waiting forever. TooLarge past the limit (`head`: the first `limit` bytes,
    whatever follows); OSError (IsADirectoryError, FileNotFoundError, ...) as open() raises it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO nobody writes to: no wait at open ...
    try:
        os.set_blocking(fd, True)  # ... and then end of file at once; a pipe being written is read
        with open(fd, "rb", closefd=False) as f:
            data = f.read(limit if head else limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise TooLarge(f"larger than {limit // 2**20} MB" if limit >= 2**20 else f"larger than {limit:,} bytes")
    return data


def temp_name(path: Path) -> Path:
    """`.NAME.tmp-HOST-PID`, unique per process; a name too long for that is shortened and keeps
    a hash of the whole name, so two long names never share a temp file."""
    suffix = f".tmp-{socket.gethostname()}-{os.getpid()}"
    name = path.name
    if len(f".{name}{suffix}".encode()) > NAME_MAX:
        room = NAME_MAX - len(suffix.encode()) - 1 - 9
        cut = name.encode()[:room].decode(errors="ignore")
        name = f"{cut}~{hashlib.sha256(path.name.encode(errors='surrogatepass')).hexdigest()[:8]}"
    return path.with_name(f".{name}{suffix}")


def write_atomic(path: str | Path, data: bytes | Callable[[Path], None], mode: int | None = None) -> Path:
    """Write `data` (bytes, or a function that writes the file at the path it is given) to `path`
    atomically. `mode` sets the permission bits (default: what open() would give, i.e. the umask's)."""
    path = Path(path)
    tmp = temp_name(path)
    tmp.unlink(missing_ok=True)  # a dead process's leftover (or a planted link): never written through
    try:
        if callable(data):
            data(tmp)
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
            with open(fd, "wb") as f:
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


def inside(folder: Path, name: str) -> Path | None:
    """`folder/name` if that names a place inside `folder` reached without following a link:
    a relative path with no `..`, no empty part, and no symbolic link on the way (the last part
    may not exist yet). Else None: a record that points elsewhere is not ours to trust or write."""
    if not isinstance(name, str) or not name or "\0" in name or name.startswith("/"):
        return None
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    path = folder
    for part in parts:
        path = path / part
        try:
            if os.path.islink(path):
                return None
        except (OSError, ValueError):
            return None
    return path


def no_link(path: Path) -> Path:
    """`path` itself, refused when it is a symbolic link: files sdbatch keeps in the output folder
    (locks, manifests, records, sheets/) are never written through a link to somewhere else."""
    if os.path.islink(path):
        raise InputError(f"{path} is a symbolic link; sdbatch never writes through links in its output folder")
    return path


def own_path(path: Path, folder: bool = False) -> Path:
    """`path`, a file (or with `folder`, a folder) sdbatch keeps in its output folder: refused in one
    line when it is a link, or something else (a folder where the manifest goes, a file named
    sheets), before anything is rendered, rather than failing on it after the images are made."""
    no_link(path)
    if not os.path.lexists(path):
        return path
    if folder and not os.path.isdir(path):
        raise InputError(f"{path}: is not a folder, where sdbatch keeps its folder; move it away")
    if not folder and os.path.isdir(path):
        raise InputError(f"{path}: is a folder, where sdbatch keeps its file; move it away")
    if not folder and not os.path.isfile(path):
        raise InputError(f"{path}: not a regular file (a FIFO, a device), where sdbatch keeps its file; move it away")
    return path


def prepare_folder(folder: Path) -> Path:
    """Create the output folder, or say in one line why it cannot be written (exit 2)."""
    if str(folder).strip() == "":
        raise InputError("--output: empty path; name a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"output folder {folder}: cannot create it ({_why(e)})") from None
    if not folder.is_dir():
        raise InputError(f"output folder {folder}: exists and is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"output folder {folder}: not writable (permissions, or a read-only filesystem)")
    return folder


def _why(e: OSError) -> str:
    if e.errno == errno.ENOTDIR:
        return "a part of the path is a file"
    return e.strerror or str(e)


def read_record(path: Path) -> dict:
    """A JSON object from one of sdbatch's record files (job.json, randoms.json); {} when it is
    missing or damaged (not JSON, not an object, nested past Python's limit): it is then rebuilt."""
    try:
        data = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}
