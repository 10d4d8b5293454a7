"""What user text may hold, and how text read from files is printed. One home for both, free of
imports, so that the recipe's rules, the job loader, the CLI and the PNG reader agree."""

import re
import unicodedata

_BAD_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # one-line text: names, paths, keys
_BAD_TEXT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")  # prompts may hold tabs and newlines


def text_problem(text: str, multiline: bool = False) -> str | None:
    """Why a piece of user text cannot be used, or None. Lone surrogates (`"\\ud800"` in YAML or
    JSON) cannot be written to a file, a file name or a PNG chunk; control characters corrupt
    names, metadata and terminals. `multiline` allows tabs and line breaks (prompts)."""
    m = (_BAD_TEXT if multiline else _BAD_LINE).search(text)
    if m is None:
        return None
    code = ord(m[0])
    if 0xD800 <= code <= 0xDFFF:
        return f"holds a lone surrogate \\u{code:04x}, which is not a character (text decoded wrongly?)"
    if code == 0:
        return "holds a NUL character (\\x00)"
    if m[0] in "\n\r" and not multiline:
        return "holds a line break; it must be one line"
    if m[0] == "\r":  # prompts may hold line breaks, written \n: A1111's infotext splits lines there
        return "holds a carriage return (\\r); write a line break as \\n"
    return f"holds the control character U+{code:04X}; remove it"


def printable(text: str) -> str:
    """Text safe to print: control characters and lone surrogates shown as escapes, so that
    metadata read from a file can neither break the output's encoding nor drive the terminal."""
    return "".join(
        c if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cs") else repr(c)[1:-1] for c in str(text)
    )
