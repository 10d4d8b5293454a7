"""File names of images: a template filled in from the task, reduced to safe characters and a
safe length. Also what user text may hold at all (no lone surrogates, no control characters), since
that text ends up in file names, folder names, PNG chunks and terminal output."""

import re
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..prompts.networks import lora_label
from ..recipe import FIELDS

DEFAULT_TEMPLATE = "{index:05d}-{seed}-{slug}"
FOLDER_TEMPLATE = "{index:05d}-{source}-{seed}"  # the default when init images come from a folder
# tokens: every recipe field, plus where the task stands in its job, a short form of its prompt, and
# the stem of its init image (`source`)
TOKENS = (*FIELDS, "index", "run", "id", "slug", "width", "height", "source")
# A file name, `.png` included, is at most this many bytes: the plan may append `-` and a 64-digit
# task id to a name that collides, and the result must stay within the 255 bytes of a file name.
MAX_NAME_BYTES = 180
MAX_FORMAT_WIDTH = 200  # widths and precisions in a template's format specs ({seed:>999999999} is refused)
_FORMAT_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)


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
    values["lora"] = lora_label(r.lora)
    return values | {
        "index": task.index,
        "run": task.run,
        "id": task.id,
        "slug": slug(r.prompt),
        "width": r.width,
        "height": r.height,
        "source": "" if r.init_image is None else Path(r.init_image).stem,
    }


def template_problem(template: str, samples: Iterable[dict[str, Any]] = ()) -> str | None:
    """What is wrong with a file-name template, or None. Only plain fields (`{seed}`, not
    `{prompt.__class__}` or `{prompt[0]}`), no nested fields, widths and precisions of at most
    MAX_FORMAT_WIDTH, no `c` (a character from a number), and it must format each of `samples`
    (token values of the job's real types): so a template never fails halfway through a job."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        return f"bad template ({e}); fields: {', '.join(TOKENS)}"
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in TOKENS:
            if re.match(r"\w+[.\[]", name) and re.match(r"\w+", name)[0] in TOKENS:
                return f"{{{name}}}: only plain fields such as {{seed}}, no attribute or index access"
            shown = "{}" if not name else f"{{{name}}}"
            return f"bad template (unknown field {shown}); fields: {', '.join(TOKENS)}"
        if conversion not in (None, "s", "r", "a"):
            return f"{{{name}!{conversion}}}: unknown conversion; use !s, !r or none"
        if "{" in spec or "}" in spec:
            return f"{{{name}:{spec}}}: fields inside a format spec are not allowed"
        if any(len(d) > 3 or int(d) > MAX_FORMAT_WIDTH for d in re.findall(r"\d+", spec)):
            return f"{{{name}:{spec}}}: widths and precisions are at most {MAX_FORMAT_WIDTH}"
        if spec.endswith("c"):
            return f"{{{name}:{spec}}}: the c format (a character from a number) is not allowed"
    for sample in samples:
        try:
            template.format(**sample)
        except _FORMAT_ERRORS as e:
            return f"bad template ({e}) for a task with {_describe(sample)}"
    return None


def _describe(sample: dict[str, Any]) -> str:
    """The values of a sample whose types decide formatting, e.g. `cfg 7.5, strength ''`."""
    return ", ".join(f"{k} {sample[k]!r}" for k in ("seed", "cfg", "steps", "strength") if k in sample)


def file_name(template: str, task: Any) -> str:
    """The template filled in from the task, reduced to safe characters and at most MAX_NAME_BYTES
    (cut at a character boundary), with `.png` added."""
    try:
        text = template.format(**tokens(task))
    except _FORMAT_ERRORS as e:  # jobs check templates when loaded; this guards other callers
        raise InputError(f"filename template {template!r}: {e}") from None
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-") or task.id
    return cut_utf8(name, MAX_NAME_BYTES - len(".png")).rstrip(".") + ".png"


def cut_utf8(text: str, limit: int) -> str:
    """`text` cut to at most `limit` bytes of UTF-8, never inside a character."""
    data = text.encode("utf-8", errors="surrogatepass")
    return text if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore")
