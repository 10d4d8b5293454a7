"""`manifest.jsonl` (one JSON line per finished or failed task) and the output folder's lock.

Crash safety: an image is written atomically (sdbatch.files) and only then is its manifest line
appended (one write under a lock, fsynced). A kill at any moment leaves either no file or a whole
one, and a manifest whose lines are whole JSON objects (a torn last line from a power cut is
skipped on read and fenced off by the next append).
"""

import fcntl
import json
import os
import socket
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputLocked

MANIFEST = "manifest.jsonl"


def manifest_name(shard: tuple[int, int] | None) -> str:
    return MANIFEST if shard is None else f"manifest-shard-{shard[0]}-of-{shard[1]}.jsonl"


def lock_name(shard: tuple[int, int] | None) -> str:
    return ".sdbatch.lock" if shard is None else f".sdbatch-shard-{shard[0]}-of-{shard[1]}.lock"


@contextmanager
def output_lock(folder: Path, name: str = ".sdbatch.lock", wait: bool = False):
    """Hold an exclusive lock on the output folder for the whole run; the OS drops it when the
    process dies, so a killed run never leaves a stale lock behind. Shards lock their own name."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise OutputLocked(
                f"{folder} is being written by another sdbatch run ({holder}); "
                "wait for it to finish, or give this run another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
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
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return entries
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                self.skipped_lines += 1  # a line torn by a power cut: its image is rendered again
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def append(self, entry: dict) -> None:
        line = json.dumps(entry, ensure_ascii=False, sort_keys=False) + "\n"
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # shards of one job append to the same file
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = "\n" + line  # fence off a torn line so this one stays whole
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def read_manifests(folder: Path) -> list[dict]:
    """Entries of every manifest in the folder (one per shard, or the single one)."""
    entries = []
    for path in sorted(folder.glob("manifest*.jsonl")):
        entries.extend(Manifest(folder, path.name).read())
    return entries


def finished(entries: Iterable[dict], folder: Path) -> dict[str, dict]:
    """id -> entry of every image that is done: status ok and its file still there."""
    done = {}
    for entry in entries:
        if entry.get("status") == "ok" and isinstance(entry.get("file"), str) and (folder / entry["file"]).is_file():
            done[str(entry.get("id"))] = entry
    return done
