"""`manifest.jsonl` (one JSON line per finished or failed task) and the output folder's locks.

Crash safety: an image is written atomically (sdbatch.files) and only then is its manifest line
appended (one checked write under a lock, fsynced; a write that fails part-way is cut back off).
A kill at any moment leaves either no file or a whole one, and a manifest whose lines are whole
JSON objects (a torn last line from a power cut is skipped on read and fenced off by the next
append). A kill between an image's rename and its line leaves an image without a line: the next
run adopts it by the task id in its `sdbatch` chunk (sdbatch.plan) instead of rendering it again.

What resume trusts is checked, cheaply: an `ok` line counts only while its file is a regular file
inside the folder (no `..`, no absolute path, no link), of the size the line recorded, and a whole
PNG (signature, header and end chunk).
"""

import errno
import fcntl
import json
import os
import socket
import stat
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from ..errors import InputError, OutputLocked
from ..files import inside, no_link

MANIFEST = "manifest.jsonl"
RUN_LOCK = ".sdbatch.lock"  # a plain run holds it exclusively, the shards of one split shared
GATE = ".sdbatch-gate.lock"  # held for an instant while a run takes its locks, so two never race
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def manifest_name(shard: tuple[int, int] | None) -> str:
    return MANIFEST if shard is None else f"manifest-shard-{shard[0]}-of-{shard[1]}.jsonl"


def lock_name(shard: tuple[int, int] | None) -> str:
    return RUN_LOCK if shard is None else f".sdbatch-shard-{shard[0]}-of-{shard[1]}.lock"


def _split_name(n: int) -> str:
    return f".sdbatch-split-{n}.lock"


def _open_lock(folder: Path, name: str) -> int:
    path = no_link(folder / name)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise InputError(f"output folder {folder}: cannot create {name} ({e.strerror or e})") from None


def _who(shard: tuple[int, int] | None) -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}" + (f", shard {shard[0]}/{shard[1]}" if shard else "")


def _take(fd: int, how: int, folder: Path, name: str, wait: bool = False) -> None:
    try:
        fcntl.flock(fd, how | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        raise OutputLocked(
            f"{folder} is being written by another sdbatch run ({holder}); "
            "wait for it to finish, or give this run another --output"
        ) from None


def _note_holder(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{text}\n".encode(), 0)


@contextmanager
def output_lock(folder: Path, name: str = RUN_LOCK, wait: bool = False) -> Iterator[None]:
    """One exclusive lock file in the folder; the OS drops it when the process dies, so a killed
    run never leaves a stale lock behind."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(folder, name)
    try:
        _take(fd, fcntl.LOCK_EX, folder, name, wait)
        _note_holder(fd, _who(None))
        yield
    finally:
        os.close(fd)


@contextmanager
def run_lock(folder: Path, shard: tuple[int, int] | None = None) -> Iterator[None]:
    """The locks of one run writing `folder` (OutputLocked, exit 75, when another run could collide):
    a plain run excludes every other run; the shards i/n of one split run together, but exclude a
    plain run, a second copy of the same shard, and shards of a split into another n."""
    folder.mkdir(parents=True, exist_ok=True)
    with ExitStack() as held:
        gate = _open_lock(folder, GATE)
        held.callback(os.close, gate)
        fcntl.flock(gate, fcntl.LOCK_EX)  # released below, once this run holds its locks
        try:
            fds = []
            held.callback(lambda: [os.close(fd) for fd in fds])
            fds.append(_open_lock(folder, RUN_LOCK))
            _take(fds[-1], fcntl.LOCK_SH if shard else fcntl.LOCK_EX, folder, RUN_LOCK)
            _note_holder(fds[-1], _who(shard))
            if shard is not None:
                for other in folder.glob(".sdbatch-split-*.lock"):
                    if other.name != _split_name(shard[1]):
                        _probe(folder, other.name, shard)
                fds.append(_open_lock(folder, _split_name(shard[1])))
                _take(fds[-1], fcntl.LOCK_SH, folder, _split_name(shard[1]))
                fds.append(_open_lock(folder, lock_name(shard)))
                _take(fds[-1], fcntl.LOCK_EX, folder, lock_name(shard))
                _note_holder(fds[-1], _who(shard))
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield


def _probe(folder: Path, name: str, shard: tuple[int, int]) -> None:
    """Refuse to start while shards of another split of this folder are running."""
    fd = _open_lock(folder, name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        n = name.removeprefix(".sdbatch-split-").removesuffix(".lock")
        raise OutputLocked(
            f"{folder} is being written by shards of a split into {n}; this run's --shard "
            f"{shard[0]}/{shard[1]} would render the same images. Use the same n, or wait for them"
        ) from None
    finally:
        os.close(fd)


class Manifest:
    """One JSON object per finished image (or failed task), appended in order."""

    def __init__(self, folder: Path, name: str = MANIFEST):
        self.path = folder / name
        self.skipped_lines = 0

    def read(self) -> list[dict]:
        entries = []
        self.skipped_lines = 0
        if os.path.islink(self.path):
            return entries  # not ours: never trusted, never written through
        try:
            data = self.path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return entries
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError):
                self.skipped_lines += 1  # a line torn by a power cut: its image is rendered again
                continue
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                entries.append(entry)
            else:
                self.skipped_lines += 1
        return entries

    def append(self, entry: dict) -> None:
        """Append one line, whole or not at all: a short or failed write (disk full) is cut back off,
        so the manifest stays valid, and the OSError is raised for the caller to report."""
        line = json.dumps(entry, ensure_ascii=False, sort_keys=False) + "\n"
        no_link(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # shards of one job append to the same file
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = "\n" + line  # fence off a torn line so this one stays whole
            data = memoryview(line.encode("utf-8", errors="surrogateescape"))
            try:
                while data:
                    n = os.write(fd, data)
                    if n <= 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    data = data[n:]
                os.fsync(fd)
            except OSError:
                with suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def read_manifests(folder: Path) -> list[dict]:
    """Entries of every manifest in the folder (one per shard, or the single one)."""
    entries = []
    for path in sorted(folder.glob("manifest*.jsonl")):
        entries.extend(Manifest(folder, path.name).read())
    return entries


def whole_png(path: Path, size: int | None = None) -> bool:
    """A regular file (not a link) holding a whole PNG: signature and header at the start, the end
    chunk at the end, and `size` bytes when a size is given. Cheap: two small reads."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO must not block the open
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (size is not None and st.st_size != size) or st.st_size < 57:
            return False
        head = os.pread(fd, 16, 0)
        tail = os.pread(fd, 12, st.st_size - 12)
    except OSError:
        return False
    finally:
        os.close(fd)
    return head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR" and tail == PNG_END


def intact(entry: dict, folder: Path) -> bool:
    """An `ok` line resume may rely on: its file inside the folder, whole, of the recorded size."""
    if entry.get("status") != "ok":
        return False
    path = inside(folder, entry.get("file"))
    size = entry.get("bytes")
    return path is not None and whole_png(path, size if isinstance(size, int) and size >= 0 else None)


def finished(entries: Iterable[dict], folder: Path) -> dict[str, dict]:
    """id -> entry of every image that is done: an `ok` line whose file is still there and whole."""
    done = {}
    for entry in entries:
        if intact(entry, folder):
            done[entry["id"]] = entry
    return done
