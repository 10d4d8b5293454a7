"""A1111's extra-network tags in prompts: `<lora:name:weight>`, `<lora:name:te:unet>`.

A1111 (`modules/extra_networks.py`) takes every `<word:args>` out of the positive prompt before
anything else reads it (prompt editing, emphasis, CLIP), so the text CLIP sees has no tag left
(`"a cat <lora:x:1>"` is encoded as `"a cat "`). Args are split at ':'; an item with '=' is named
(`te=0.5`, `unet=1`). The text-encoder weight defaults to 1, the UNet weight to the text
encoder's. `lyco` is A1111's alias of `lora`. The negative prompt is not parsed for tags: there
A1111 feeds them to CLIP as text, and so do we.

Torch-free: jobs check tags when they are read.
"""

import math
import re
from dataclasses import dataclass

TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's re_extra_net
LORA_KINDS = ("lora", "lyco")
MAX_WEIGHT = 100.0  # |weight|; A1111 sets no bound, but beyond this any model's output is noise
NAME_FORBIDDEN = set("/\\\0")  # a LoRA is named by its file's stem, never by a path
TAG_FORBIDDEN = set(":<>=")  # would not survive being written as a <lora:name:w> tag


@dataclass(frozen=True)
class LoraTag:
    """One LoRA of a prompt: its name (a file stem) and its text-encoder and UNet weights."""

    name: str
    te: float
    unet: float

    def text(self) -> str:
        """The tag as A1111 writes it (one weight when both are equal)."""
        weights = _number(self.te) if self.te == self.unet else f"{_number(self.te)}:{_number(self.unet)}"
        return f"<lora:{self.name}:{weights}>"


def lora_label(loras: "list | tuple") -> str:
    """A set of LoRAs as a short label, `add_detail 0.6, grain 0.3:1` (te:unet when they differ),
    for contact sheets and the `{lora}` file-name token; `none` for no LoRA."""
    parts = []
    for name, te, unet in loras:
        weights = _number(te) if te == unet else f"{_number(te)}:{_number(unet)}"
        parts.append(f"{name} {weights}")
    return ", ".join(parts) or "none"


def strip_networks(text: str) -> str:
    """The prompt as CLIP sees it: every `<kind:args>` tag removed (A1111's parse_prompt)."""
    return TAG.sub("", text)


def has_networks(text: str) -> bool:
    return TAG.search(text) is not None


def lora_tags(text: str) -> list[LoraTag]:
    """The LoRA tags of a positive prompt, in order. ValueError naming the tag for anything sdbatch
    cannot apply: another kind of network (`<hypernet:...>`), a weight that is not a number, `dyn`."""
    return [_tag(m.group(1), m.group(2), m.group(0)) for m in TAG.finditer(text)]


def name_problem(name: object) -> str | None:
    """Why `name` cannot name a LoRA or embedding file (None when it can)."""
    if not isinstance(name, str) or not name.strip():
        return f"a LoRA name must be text, got {name!r}"
    if NAME_FORBIDDEN & set(name) or name.strip() in (".", ".."):
        return f"{name!r} is a path; name a LoRA by its file name without extension (found in the loras folder)"
    if not name.isprintable():
        return f"{name!r} holds control characters"
    if TAG_FORBIDDEN & set(name):
        return f"{name!r}: a LoRA name cannot hold : < > or = (it could not be written as an A1111 tag)"
    return None


def weight_problem(value: object) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or abs(value) > MAX_WEIGHT:
        return f"weight {value!r} must be a number from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}"
    return None


def _tag(kind: str, args: str, shown: str) -> LoraTag:
    shown = shown if len(shown) <= 80 else shown[:79] + "…"
    if kind not in LORA_KINDS:
        raise ValueError(f"{shown}: sdbatch applies <lora:...> networks only, not {kind!r}")
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in args.split(":"):
        parts = item.split("=")
        if len(parts) == 2:
            named[parts[0].strip()] = parts[1].strip()
        else:
            positional.append(item.strip())
    unknown = sorted(set(named) - {"te", "unet"})
    if "dyn" in named or len(positional) > 3:
        raise ValueError(f"{shown}: dynamic LoRA dimension (dyn) is not supported")
    if unknown:
        raise ValueError(f"{shown}: unknown argument {unknown[0]!r} (known: te, unet)")
    if not positional or (problem := name_problem(positional[0])):
        raise ValueError(f"{shown}: {problem if positional else 'names no LoRA'}")
    try:
        te = _weight(named.get("te", positional[1] if len(positional) > 1 else "1"))
        unet = _weight(named.get("unet", positional[2] if len(positional) > 2 else None), te)
    except ValueError as e:
        raise ValueError(f"{shown}: {e}") from None
    return LoraTag(positional[0], te, unet)


def _weight(text: str | None, default: float = 1.0) -> float:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"weight {text!r} is not a number") from None
    if problem := weight_problem(value):
        raise ValueError(problem)
    return value


def _number(value: float) -> str:
    """7.0 as "7", else the shortest text that reads back as the same float."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
