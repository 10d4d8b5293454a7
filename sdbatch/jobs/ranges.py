"""A1111 X/Y/Z-plot ranges: `1-8`, `1-8 (+3)`, `10-1 (-4)`, `0.2-0.8 [4]`, and comma mixtures."""

import math
import re
from fractions import Fraction

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
            raise RangeError(f"empty item in {_cut(text)!r}")
        values.extend(_parse_item(item, integer))
        if len(values) > MAX_AXIS_VALUES:
            raise RangeError(f"{_cut(text)!r} expands to more than {MAX_AXIS_VALUES:,} values")
    return values


def _number(text: str, integer: bool) -> int | float:
    text = text.strip()
    if len(text) > 40:
        raise RangeError(f"{text[:20]}…: a number of {len(text)} characters")
    if integer and re.fullmatch(r"[+-]?\d+", text):
        return int(text)  # exact: float() would round a 17-digit seed
    value = float(text)
    if not math.isfinite(value):
        raise RangeError(f"{text!r} is not a finite number")
    if integer:
        if value != int(value):
            raise RangeError(f"{text} is not a whole number")
        return int(value)
    return value


def _parse_item(item: str, integer: bool) -> list[int | float]:
    if _SINGLE.match(item):
        return [_number(item, integer)]
    m = _RANGE.match(item)
    if not m:
        raise RangeError(f"{_cut(item)!r} is neither a number nor a range like 1-8, 1-8 (+2) or 0.2-0.8 [4]")
    shown = _cut(item)
    try:
        start, end = _number(m["start"], integer), _number(m["end"], integer)
    except RangeError as e:
        raise RangeError(f"{shown!r}: {e}") from None
    if m["count"] is not None:
        count = int(m["count"]) if len(m["count"]) <= 7 else MAX_AXIS_VALUES + 1
        if count < 1:
            raise RangeError(f"{shown!r}: the count in [n] must be at least 1")
        if count > MAX_AXIS_VALUES:
            raise RangeError(f"{shown!r} asks for more than {MAX_AXIS_VALUES:,} values")
        if count == 1:
            return [start]
        if integer:  # exact integer arithmetic, rounded half to even as round() does
            return [round(start + Fraction(end - start) * i / (count - 1)) for i in range(count)]
        span = end - start
        if not math.isfinite(span):
            raise RangeError(f"{shown!r}: the ends are too far apart")
        return [_clean(start + span * i / (count - 1)) for i in range(count)]
    try:
        step = _number(m["step"], integer) if m["step"] is not None else (1 if end >= start else -1)
    except RangeError as e:
        raise RangeError(f"{shown!r}: step {e}") from None
    if step == 0:
        raise RangeError(f"{shown!r}: the step must be a non-zero number")
    if (end - start) * step < 0:
        raise RangeError(f"{shown!r}: a step of {m['step']} never goes from {m['start']} to {m['end']}")
    if integer:
        count = (end - start) // step + 1
    else:
        steps = (end - start) / step  # inf when the step is tiny against the span
        count = math.floor(steps + 1e-9) + 1 if math.isfinite(steps) and steps <= MAX_AXIS_VALUES else None
    if count is None or count > MAX_AXIS_VALUES:
        if count is None:
            raise RangeError(f"{shown!r} expands to more than {MAX_AXIS_VALUES:,} values")
        raise RangeError(f"{shown!r} expands to {count:,} values (at most {MAX_AXIS_VALUES:,})")
    if integer:
        return [start + i * step for i in range(count)]
    return [_clean(start + i * step) for i in range(count)]


def _cut(item: str) -> str:
    """An item as shown in a message: one line, not a screenful."""
    text = item.strip()
    return text if len(text) <= 40 else text[:39] + "…"


def _clean(value: float) -> float:
    """0.1 * 3 prints as 0.3, not 0.30000000000000004: values end up in file names and metadata."""
    return float(f"{value:.10g}")
