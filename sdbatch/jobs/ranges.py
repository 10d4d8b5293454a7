"""A1111 X/Y/Z-plot ranges: `1-8`, `1-8 (+3)`, `10-1 (-4)`, `0.2-0.8 [4]`, and comma mixtures."""

import math
import re

MAX_AXIS_VALUES = 100_000


class RangeError(ValueError):
    """A range such as `1-8 (+2)` that cannot be expanded; the message says why."""


_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_RANGE = re.compile(
    rf"^\s*(?P<start>{_NUMBER})\s*-\s*(?P<end>{_NUMBER})\s*"
    rf"(?:\(\s*(?P<step>{_NUMBER})\s*\)|\[\s*(?P<count>\d+)\s*\])?\s*$"
)
_SINGLE = re.compile(rf"^\s*{_NUMBER}\s*$")


def parse_range(text: str, integer: bool) -> list[int | float]:
    """Expand one X/Y/Z-plot item list: `1-8` (step 1), `1-8 (+3)` (given step, ends inclusive when
    reached), `0.2-0.8 [4]` (that many evenly spaced values, ends included), and comma-separated
    mixtures of those and plain numbers. Integer fields round `[n]` values to the nearest integer."""
    values: list[int | float] = []
    for item in text.split(","):
        if not item.strip():
            raise RangeError(f"empty item in {text!r}")
        values.extend(_parse_item(item, integer))
        if len(values) > MAX_AXIS_VALUES:
            raise RangeError(f"{text!r} expands to more than {MAX_AXIS_VALUES:,} values")
    return values


def _number(text: str, integer: bool) -> int | float:
    if integer and re.fullmatch(r"\s*[+-]?\d+\s*", text):
        return int(text)  # exact: float() would round a 17-digit seed
    value = float(text)
    if not math.isfinite(value):
        raise RangeError(f"{text!r} is not a finite number")
    if integer:
        if value != int(value):
            raise RangeError(f"{text.strip()} is not a whole number")
        return int(value)
    return value


def _parse_item(item: str, integer: bool) -> list[int | float]:
    if _SINGLE.match(item):
        return [_number(item, integer)]
    m = _RANGE.match(item)
    if not m:
        raise RangeError(f"{item.strip()!r} is neither a number nor a range like 1-8, 1-8 (+2) or 0.2-0.8 [4]")
    start, end = float(m["start"]), float(m["end"])
    if integer and (start != int(start) or end != int(end)):
        raise RangeError(f"{item.strip()!r}: the ends of an integer range must be whole numbers")
    if m["count"] is not None:
        count = int(m["count"])
        if count < 1:
            raise RangeError(f"{item.strip()!r}: the count in [n] must be at least 1")
        if count > MAX_AXIS_VALUES:
            raise RangeError(f"{item.strip()!r} asks for more than {MAX_AXIS_VALUES:,} values")
        raw = [start] if count == 1 else [start + (end - start) * i / (count - 1) for i in range(count)]
        return [round(v) for v in raw] if integer else [_clean(v) for v in raw]
    step = float(m["step"]) if m["step"] is not None else (1.0 if end >= start else -1.0)
    if step == 0 or not math.isfinite(step):
        raise RangeError(f"{item.strip()!r}: the step must be a non-zero number")
    if integer and step != int(step):
        raise RangeError(f"{item.strip()!r}: an integer range needs a whole-number step")
    if (end - start) * step < 0:
        raise RangeError(f"{item.strip()!r}: a step of {m['step']} never goes from {m['start']} to {m['end']}")
    count = math.floor((end - start) / step + 1e-9) + 1
    if count > MAX_AXIS_VALUES:
        raise RangeError(f"{item.strip()!r} expands to {count:,} values (at most {MAX_AXIS_VALUES:,})")
    if integer:
        return [int(start) + i * int(step) for i in range(count)]
    return [_clean(start + i * step) for i in range(count)]


def _clean(value: float) -> float:
    """0.1 * 3 prints as 0.3, not 0.30000000000000004: values end up in file names and metadata."""
    return float(f"{value:.10g}")
