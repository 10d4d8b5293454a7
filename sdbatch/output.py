"""What a run leaves on disk: PNGs that carry their recipe, the manifest, contact sheets, the lock.

Crash safety: an image is written to a hidden temp file, flushed and renamed, and only then is its
manifest line appended (one write under a lock, fsynced). A kill at any moment leaves either no
file or a whole one, and a manifest whose lines are whole JSON objects (a torn last line from a
power cut is skipped on read and fenced off by the next append).
"""

import fcntl
import json
import os
import re
import socket
import textwrap
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from .errors import InputError
from .jobs import AXES

MANIFEST = "manifest.jsonl"
SHEETS = "sheets"
A1111_SAMPLERS = {"euler_a": "Euler a", "euler": "Euler", "ddim": "DDIM", "ddpm": "DDPM", "dpmpp_2m": "DPM++ 2M"}
SHEET_MAX_SIDE = 4096  # a contact sheet is never larger than this on either side
SHEET_MIN_CELL = 96  # cells are not shrunk below this; larger grids are split into parts
GAP = 4  # white space between cells
SHEET_MIN_UPSCALE = 128  # small images (the demo's 32 px) are enlarged to this, pixel for pixel


class OutputLocked(Exception):
    """Another run holds the output folder (exit code 75, so cron can tell it apart)."""


# ----------------------------------------------------------------------------------------------------
# names


def slug(text: str, limit: int = 40) -> str:
    """A short file-name-safe form of a prompt: lowercase letters, digits and dashes."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(words) > limit:
        words = words[:limit].rsplit("-", 1)[0] if "-" in words[:limit] else words[:limit]
    return words or "empty"


def file_name(template: str, task: Any) -> str:
    """The template filled in from the task, reduced to safe characters, with `.png` added."""
    fields = {
        "index": task.index,
        "seed": task.seed,
        "slug": slug(task.prompt),
        "id": task.id,
        "cfg": task.cfg,
        "steps": task.steps,
        "sampler": task.sampler,
        "strength": task.strength if task.strength is not None else "",
        "width": task.width,
        "height": task.height,
        "run": task.run,
    }
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", template.format(**fields)).strip(".-") or task.id
    return name[:200] + ".png"


# ----------------------------------------------------------------------------------------------------
# A1111 "parameters" text


def _quote(value: str) -> str:
    """As A1111's infotext_utils.quote: JSON-quote a value only when it holds , : or a newline."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def a1111_parameters(task: Any, model_hash: str, model_name: str, version: str) -> str:
    """The `parameters` PNG text A1111 writes (create_infotext), which its PNG Info tab and civitai read."""
    params: dict[str, Any] = {
        "Steps": task.steps,
        "Sampler": A1111_SAMPLERS.get(task.sampler, task.sampler),
        "Schedule type": "Karras" if task.karras else None,
        "CFG scale": _number(task.cfg),
        "Seed": task.seed,
        "Size": f"{task.width}x{task.height}",
        "Model hash": model_hash,
        "Model": model_name,
        "Denoising strength": _number(task.strength) if task.strength is not None else None,
        "Version": f"sdbatch {version}",
    }
    body = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {task.negative}" if task.negative else ""
    return f"{task.prompt}{negative}\n{body}".strip()


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """A1111's parse_generation_parameters, to the raw strings: Prompt, Negative prompt and the
    `Key: value` pairs of the last line."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        value = value.strip()
        if len(value) > 1 and value[0] == '"' and value[-1] == '"':
            value = json.loads(value)
        result[key.strip()] = value
    return result


# ----------------------------------------------------------------------------------------------------
# files


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def write_atomic(path: Path, data: bytes) -> None:
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def png_bytes(image: Image.Image, text: dict[str, str]) -> bytes:
    import io

    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)  # tEXt, or iTXt when the text is not Latin-1 (as A1111 does)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=4)
    return buffer.getvalue()


def read_png_text(path: str | Path) -> dict[str, str]:
    try:
        with Image.open(path) as im:
            im.load()
            return dict(getattr(im, "text", {}) or {})
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: not an image Pillow can read ({e})") from None


def clean_temp_files(folder: Path) -> int:
    """Remove temp files this host's dead processes left behind; returns how many."""
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


# ----------------------------------------------------------------------------------------------------
# manifest


class Manifest:
    """`manifest.jsonl`: one JSON object per finished image (or failed task), appended in order."""

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


# ----------------------------------------------------------------------------------------------------
# contact sheets


SHEET_AXES = AXES  # the parameters that can vary between the images of a run


def _axis_value(entry: dict, axis: str) -> Any:
    value = entry.get(axis)
    if axis == "size":
        return tuple(value) if isinstance(value, list) else value
    return value


def _label(axis: str, value: Any) -> str:
    if value is None:
        return "none"
    if axis == "size":
        return f"{value[0]}x{value[1]}"
    if axis in ("init_image", "mask"):
        return Path(str(value)).name
    if axis in ("prompt", "negative"):
        return str(value) or '""'
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass
class SheetSpec:
    x: str | None
    y: str | None
    pages: list[str]


def sheet_axes(entries: list[dict], wanted: dict[str, str | None]) -> SheetSpec:
    """X, Y and page axes: those asked for, else the last varying axis (usually seed) across and the
    first one (usually prompt) down; every other varying axis gets one sheet per value."""
    varying = [a for a in SHEET_AXES if len({json.dumps(_axis_value(e, a)) for e in entries}) > 1]
    x = wanted.get("x") if wanted.get("x") in varying else None
    y = wanted.get("y") if wanted.get("y") in varying else None
    rest = [a for a in varying if a not in (x, y)]
    if x is None and "x" not in wanted and rest:
        x = rest.pop()
    if y is None and "y" not in wanted and rest:
        y = rest.pop(0)
    return SheetSpec(x, y, rest)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int, lines: int) -> str:
    """Wrap to `width` pixels in at most `lines` lines, ending in … when cut."""
    chars = max(4, int(width / max(1.0, draw.textlength("abcdefghij", font=font) / 10)))
    wrapped = textwrap.wrap(text.replace("\n", " "), chars) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: max(1, chars - 1)] + "…"
    return "\n".join(wrapped)


def build_sheets(folder: Path, run: int, entries: list[dict], wanted: dict[str, str | None], title: str) -> list[Path]:
    """Contact sheets of one run's finished images under `folder/sheets/`; returns their paths."""
    entries = [e for e in entries if e.get("status") == "ok" and (folder / e["file"]).is_file()]
    entries.sort(key=lambda e: e.get("index", 0))  # the job's order, not the order images finished in
    if len(entries) < 2:
        return []
    spec = sheet_axes(entries, wanted)
    shared = [
        f"{a} {_label(a, _axis_value(entries[0], a))}"
        for a in SHEET_AXES
        if len({json.dumps(_axis_value(e, a)) for e in entries}) == 1 and _axis_value(entries[0], a) not in (None, "")
    ]
    title = f"{title} | {', '.join(shared)}" if shared else title
    pages: dict[tuple, list[dict]] = {}
    for e in entries:
        pages.setdefault(tuple(json.dumps(_axis_value(e, a)) for a in spec.pages), []).append(e)
    written = []
    for key, page in pages.items():
        page_title = ", ".join(f"{a}={_label(a, json.loads(v))}" for a, v in zip(spec.pages, key, strict=True))
        base = f"run{run}" + (f"-{slug(page_title, 60)}" if page_title else "")
        written.extend(_write_sheet(folder, base, page, spec, title + (f" | {page_title}" if page_title else "")))
    return written


def _values(entries: list[dict], axis: str | None) -> list:
    if axis is None:
        return [None]
    seen: dict[str, Any] = {}
    for e in entries:
        seen.setdefault(json.dumps(_axis_value(e, axis)), _axis_value(e, axis))
    return list(seen.values())


def _write_sheet(folder: Path, base: str, entries: list[dict], spec: SheetSpec, title: str) -> list[Path]:
    xs, ys = _values(entries, spec.x), _values(entries, spec.y)
    if spec.x is None and spec.y is None:  # nothing varies on this page but there are several images
        xs = list(range(len(entries)))
    cells = {}
    for i, e in enumerate(entries):
        xv = _axis_value(e, spec.x) if spec.x else (i if spec.y is None else None)
        yv = _axis_value(e, spec.y) if spec.y else None
        cells[(json.dumps(xv), json.dumps(yv))] = e
    with Image.open(folder / entries[0]["file"]) as first:
        iw, ih = first.size
    scale = max(1, -(-SHEET_MIN_UPSCALE // max(iw, ih)))  # integer upscale for tiny images
    cw, ch = iw * scale, ih * scale
    label_w, header_h = max(160, cw) if spec.y else 0, 40 + (56 if spec.x else 0)
    # how many columns / rows fit at full size; below the minimum cell size, split into parts
    shrink = min(1.0, (SHEET_MAX_SIDE - label_w) / (cw * len(xs)), (SHEET_MAX_SIDE - header_h) / (ch * len(ys)))
    if min(cw, ch) * shrink < SHEET_MIN_CELL:
        shrink = SHEET_MIN_CELL / min(cw, ch)
    cw, ch = max(1, int(cw * shrink)), max(1, int(ch * shrink))
    per_row = max(1, (SHEET_MAX_SIDE - label_w) // (cw + GAP))
    per_col = max(1, (SHEET_MAX_SIDE - header_h) // (ch + GAP))
    parts = [
        (xs[i : i + per_row], ys[j : j + per_col])
        for j in range(0, len(ys), per_col)
        for i in range(0, len(xs), per_row)
    ]
    written = []
    for n, (px, py) in enumerate(parts):
        name = base + (f"-part{n + 1}" if len(parts) > 1 else "") + ".png"
        sheet = Image.new("RGB", (label_w + (cw + GAP) * len(px), header_h + (ch + GAP) * len(py)), "white")
        draw = ImageDraw.Draw(sheet)
        small = _font(13)
        draw.multiline_text((6, 4), _fit_text(draw, title, small, sheet.width - 12, 2), fill="black", font=small)
        if spec.x:
            draw.text((label_w + 4, 40), spec.x, fill="gray", font=small)
            for i, xv in enumerate(px):
                text = _fit_text(draw, _label(spec.x, xv), small, cw - 8, 2)
                draw.multiline_text((label_w + i * (cw + GAP) + 4, 58), text, fill="black", font=small)
        if spec.y:
            draw.text((6, header_h - 18), spec.y, fill="gray", font=small)
        for j, yv in enumerate(py):
            if spec.y:
                text = _fit_text(draw, _label(spec.y, yv), small, label_w - 12, max(1, ch // 16))
                draw.multiline_text((6, header_h + j * (ch + GAP) + 4), text, fill="black", font=small)
            for i, xv in enumerate(px):
                e = cells.get((json.dumps(xv if spec.x or spec.y is None else None), json.dumps(yv)))
                if e is None:
                    continue
                with Image.open(folder / e["file"]) as im:
                    resample = Image.Resampling.NEAREST if cw >= im.width else Image.Resampling.LANCZOS
                    cell = im.convert("RGB").resize((cw, ch), resample)
                    sheet.paste(cell, (label_w + i * (cw + GAP), header_h + j * (ch + GAP)))
        path = folder / SHEETS / name
        path.parent.mkdir(exist_ok=True)
        import io

        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG", compress_level=4)
        write_atomic(path, buffer.getvalue())
        written.append(path)
    return written
