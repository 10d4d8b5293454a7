"""Contact sheets: a labelled grid per run of a job, with the axes its job asked for (or the ones
that vary), split into parts rather than ever growing past SHEET_MAX_SIDE."""

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..files import clean_temp_files, no_link, read_record, write_atomic
from ..prompts.networks import lora_label
from ..recipe import FIELDS
from .manifest import finished, read_manifests
from .names import slug
from .png import png_bytes

SHEETS = "sheets"
JOB_RECORD = "job.json"  # what `sdbatch sheets` needs to rebuild the contact sheets
SHEET_MAX_SIDE = 4096  # a contact sheet is never larger than this on either side
SHEET_MIN_CELL = 96  # cells are not shrunk below this; larger grids are split into parts
GAP = 4  # white space between cells
SHEET_MIN_UPSCALE = 128  # small images (the demo's 32 px) are enlarged to this, pixel for pixel


def make_sheets(folder: Path, title: str | None = None) -> list[Path]:
    """Contact sheets for every run in the folder's manifests (with the axes its job asked for)."""
    sheets = folder / SHEETS
    if sheets.is_dir() and not sheets.is_symlink():
        clean_temp_files(sheets)  # a sheet's temp file left by a run killed while writing it
    record = _read_record(folder / JOB_RECORD)
    runs = record.get("runs") if isinstance(record.get("runs"), list) else []
    wanted = {r.get("index"): _wanted(r.get("sheet")) for r in runs if isinstance(r, dict)}
    by_run: dict[int, dict[str, dict]] = {}
    for task_id, e in finished(read_manifests(folder), folder).items():  # whole images only, each id once
        run = e.get("run") if isinstance(e.get("run"), int) else 0
        by_run.setdefault(run, {})[task_id] = e
    written = []
    name = title or (record.get("name") if isinstance(record.get("name"), str) else None) or folder.name
    for run, items in sorted(by_run.items()):
        written.extend(build_sheets(folder, run, list(items.values()), wanted.get(run, {}), f"{name} · run {run}"))
    return written


def _read_record(path: Path) -> dict:
    """job.json, or {} when it is missing, damaged or a link (sheets then use what the images vary in)."""
    if path.is_symlink():
        return {}
    try:
        return read_record(path)
    except OSError:  # unreadable (a folder, permissions): sheets do without it
        return {}


def _wanted(sheet: Any) -> dict[str, str | None]:
    if not isinstance(sheet, dict):
        return {}
    return {k: v for k, v in sheet.items() if k in ("x", "y") and (v is None or isinstance(v, str))}


# the parameters that can vary between the images of a run: every recipe field
SHEET_AXES = FIELDS


def _axis_value(entry: dict, axis: str) -> Any:
    value = entry.get(axis)
    if axis == "size":
        return tuple(value) if isinstance(value, list) else value
    return value


def _label(axis: str, value: Any) -> str:
    try:
        return _label_of(axis, value)
    except (TypeError, IndexError, KeyError, ValueError):  # a damaged manifest line: show it as it is
        return str(value)


def _label_of(axis: str, value: Any) -> str:
    if value is None:
        return "none"
    if axis == "size":
        return f"{value[0]}x{value[1]}"
    if axis in ("init_image", "mask"):
        return Path(str(value)).stem
    if axis in ("prompt", "negative"):
        return str(value) or '""'
    if axis == "lora":
        return lora_label(value)
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
    varying = [a for a in varying if a in wanted.values() or not _follows_input(entries, a, varying)]
    x = wanted.get("x") if wanted.get("x") in varying else None
    y = wanted.get("y") if wanted.get("y") in varying else None
    rest = [a for a in varying if a not in (x, y)]
    if x is None and "x" not in wanted and rest:
        x = rest.pop()
    if y is None and "y" not in wanted and rest:
        y = rest.pop(0)
    return SheetSpec(x, y, rest)


def _follows_input(entries: list[dict], axis: str, varying: list[str]) -> bool:
    """Whether an axis only follows the init image (a mask paired from a folder, a size taken from
    the image): no axis of its own, else a folder of inputs would make a sheet per input."""
    if axis == "init_image" or "init_image" not in varying:
        return False
    seen: dict[str, str] = {}
    for e in entries:
        value = json.dumps(_axis_value(e, axis))
        if seen.setdefault(json.dumps(e.get("init_image")), value) != value:
            return False
    return True


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
    entries.sort(key=lambda e: e["index"] if isinstance(e.get("index"), int) else 0)  # the job's order
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


@dataclass
class _Grid:
    """Cell and margin sizes of one sheet, in pixels."""

    cw: int
    ch: int
    label_w: int
    header_h: int


def _grid(folder: Path, first: dict, spec: SheetSpec, columns: int, rows: int) -> _Grid:
    """Cells as large as the images (tiny ones enlarged), shrunk to fit SHEET_MAX_SIDE but never
    below SHEET_MIN_CELL: a grid that still does not fit is split into parts."""
    try:
        with Image.open(folder / first["file"]) as im:
            iw, ih = im.size
    except (OSError, ValueError, Image.DecompressionBombError):
        iw, ih = SHEET_MIN_UPSCALE, SHEET_MIN_UPSCALE
    scale = max(1, -(-SHEET_MIN_UPSCALE // max(iw, ih)))  # integer upscale for tiny images
    cw, ch = iw * scale, ih * scale
    label_w, header_h = max(160, cw) if spec.y else 0, 40 + (56 if spec.x else 0)
    shrink = min(1.0, (SHEET_MAX_SIDE - label_w) / (cw * columns), (SHEET_MAX_SIDE - header_h) / (ch * rows))
    if min(cw, ch) * shrink < SHEET_MIN_CELL:
        shrink = SHEET_MIN_CELL / min(cw, ch)
    return _Grid(max(1, int(cw * shrink)), max(1, int(ch * shrink)), label_w, header_h)


def _write_sheet(folder: Path, base: str, entries: list[dict], spec: SheetSpec, title: str) -> list[Path]:
    xs, ys = _values(entries, spec.x), _values(entries, spec.y)
    if spec.x is None and spec.y is None:  # nothing varies on this page but there are several images
        xs = list(range(len(entries)))
    cells = {}
    for i, e in enumerate(entries):
        xv = _axis_value(e, spec.x) if spec.x else (i if spec.y is None else None)
        yv = _axis_value(e, spec.y) if spec.y else None
        cells[(json.dumps(xv), json.dumps(yv))] = e
    g = _grid(folder, entries[0], spec, len(xs), len(ys))
    per_row = max(1, (SHEET_MAX_SIDE - g.label_w) // (g.cw + GAP))
    per_col = max(1, (SHEET_MAX_SIDE - g.header_h) // (g.ch + GAP))
    parts = [
        (xs[i : i + per_row], ys[j : j + per_col])
        for j in range(0, len(ys), per_col)
        for i in range(0, len(xs), per_row)
    ]
    written = []
    for n, (px, py) in enumerate(parts):
        path = folder / SHEETS / (base + (f"-part{n + 1}" if len(parts) > 1 else "") + ".png")
        no_link(path.parent).mkdir(exist_ok=True)
        write_atomic(path, png_bytes(_draw(folder, g, spec, px, py, cells, title)))
        written.append(path)
    return written


def _draw(folder: Path, g: _Grid, spec: SheetSpec, px: list, py: list, cells: dict, title: str) -> Image.Image:
    """One sheet: the title, the x labels across, the y labels down, and the images."""
    sheet = Image.new("RGB", (g.label_w + (g.cw + GAP) * len(px), g.header_h + (g.ch + GAP) * len(py)), "white")
    draw = ImageDraw.Draw(sheet)
    small = _font(13)
    draw.multiline_text((6, 4), _fit_text(draw, title, small, sheet.width - 12, 2), fill="black", font=small)
    if spec.x:
        draw.text((g.label_w + 4, 40), spec.x, fill="gray", font=small)
        for i, xv in enumerate(px):
            text = _fit_text(draw, _label(spec.x, xv), small, g.cw - 8, 2)
            draw.multiline_text((g.label_w + i * (g.cw + GAP) + 4, 58), text, fill="black", font=small)
    if spec.y:
        draw.text((6, g.header_h - 18), spec.y, fill="gray", font=small)
    for j, yv in enumerate(py):
        if spec.y:
            text = _fit_text(draw, _label(spec.y, yv), small, g.label_w - 12, max(1, g.ch // 16))
            draw.multiline_text((6, g.header_h + j * (g.ch + GAP) + 4), text, fill="black", font=small)
        for i, xv in enumerate(px):
            e = cells.get((json.dumps(xv if spec.x or spec.y is None else None), json.dumps(yv)))
            if e is None:
                continue
            try:
                with Image.open(folder / e["file"]) as im:
                    resample = Image.Resampling.NEAREST if g.cw >= im.width else Image.Resampling.LANCZOS
                    cell = im.convert("RGB").resize((g.cw, g.ch), resample)
            except (OSError, ValueError, Image.DecompressionBombError):  # damaged since it was checked
                cell = Image.new("RGB", (g.cw, g.ch), "lightgray")
            sheet.paste(cell, (g.label_w + i * (g.cw + GAP), g.header_h + j * (g.ch + GAP)))
    return sheet
