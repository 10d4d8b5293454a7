"""File names of images: a template filled in from the task, reduced to safe characters."""

import re
from typing import Any

from ..recipe import FIELDS

DEFAULT_TEMPLATE = "{index:05d}-{seed}-{slug}"
# tokens: every recipe field, plus where the task stands in its job and a short form of its prompt
TOKENS = (*FIELDS, "index", "run", "id", "slug", "width", "height")


def slug(text: str, limit: int = 40) -> str:
    """A short file-name-safe form of a prompt: lowercase letters, digits and dashes."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(words) > limit:
        words = words[:limit].rsplit("-", 1)[0] if "-" in words[:limit] else words[:limit]
    return words or "empty"


def tokens(task: Any) -> dict[str, Any]:
    """What a template may name, for one task."""
    r = task.recipe
    values = {name: "" if getattr(r, name) is None else getattr(r, name) for name in FIELDS}
    values["size"] = f"{r.width}x{r.height}"
    return values | {
        "index": task.index,
        "run": task.run,
        "id": task.id,
        "slug": slug(r.prompt),
        "width": r.width,
        "height": r.height,
    }


def file_name(template: str, task: Any) -> str:
    """The template filled in from the task, reduced to safe characters, with `.png` added."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", template.format(**tokens(task))).strip(".-") or task.id
    return name[:200] + ".png"
