"""A1111's `parameters` text (infotext): the grammar only. Which keys mean what is the recipe's
business (`sdbatch.recipe.A1111_KEYS`).

The text is the prompt's lines, then `Negative prompt: ...` lines, then one last line of
`Key: value` pairs separated by `, `; values holding `,`, `:` or a newline are JSON-quoted.
"""

import contextlib
import json
import re
from typing import Any


def quote(value: Any) -> str:
    """As A1111's infotext_utils.quote: JSON-quote a value only when it holds , : or a newline."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def number_text(value: float) -> int | float:
    """7.0 is written 7, as A1111 does."""
    return int(value) if float(value).is_integer() else value


def format_infotext(prompt: str, negative: str, pairs: dict[str, Any]) -> str:
    """Pairs whose value is None are left out; so is the negative line when there is none."""
    body = ", ".join(f"{k}: {quote(v)}" for k, v in pairs.items() if v is not None)
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{body}".strip()


_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """A1111's parse_generation_parameters, to raw strings: (prompt, negative, {key: value}).
    Lines the Dynamic Prompts extension appends after the parameters (`Template: ...`, `Negative
    Template: ...`, each possibly several lines) are cut off first, as that extension does when
    A1111 reads the text, and kept as the pairs `Template` and `Negative Template`."""
    text, templates = _split_templates(text.strip())
    *lines, last = text.split("\n")
    if len(_PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        part = negative if in_negative else prompt
        if part or line:  # A1111 adds a line break only after some text: leading empty lines vanish
            part.append(line)
    pairs = {}
    for key, value in _PAIR.findall(last):
        value = value.strip()
        if not value:  # A1111 skips a key with no value (its v[0] raises): `Schedule type: ,` is no key
            continue
        if len(value) > 1 and value[0] == '"' and value[-1] == '"':
            with contextlib.suppress(json.JSONDecodeError):  # A1111 keeps such a value as written
                value = json.loads(value)
        pairs[key.strip()] = value
    return "\n".join(prompt), "\n".join(negative), pairs | templates


def _split_templates(text: str) -> tuple[str, dict[str, str]]:
    lines = text.split("\n")
    for i in range(1, len(lines)):
        if lines[i].startswith("Template:") and len(_PAIR.findall(lines[i - 1])) >= 3:
            template, _, negative = "\n".join(lines[i:]).partition("\nNegative Template:")
            found = {"Template": template.removeprefix("Template:").strip()}
            if negative.strip():
                found["Negative Template"] = negative.strip()
            return "\n".join(lines[:i]), found
    return text, {}


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """The infotext as one mapping, `Prompt` and `Negative prompt` included (for display)."""
    prompt, negative, pairs = parse_infotext(text)
    return {"Prompt": prompt, "Negative prompt": negative} | pairs
