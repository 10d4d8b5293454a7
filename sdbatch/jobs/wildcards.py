"""Variants `{red|blue}` and wildcards `__name__` in prompts, expanded with the `dynamicprompts`
library (the engine of A1111's Dynamic Prompts extension) into one prompt per combination: each is
its own task, with its own id, file name and sheet cell, and its literal text is what the PNG and
the manifest carry. A1111's own syntax (`(x:1.2)`, `[a:b:5]`, `[a|b]`) passes through untouched.

Wildcard files are text files, one value per line (`#` comments and blank lines skipped), looked
up in the job's `wildcards:` folder, else `$SDBATCH_WEIGHTS/wildcards` (default `weights/wildcards`).
A wildcard without a file, or whose file holds no values, is an error at validate time: the
library itself would silently leave `__name__` in the prompt.
"""

import re
from pathlib import Path

from ..checkpoints.locate import weights_dir
from ..files import TooLarge, read_limited
from ..text import text_problem
from .ranges import MAX_AXIS_VALUES

MAX_WILDCARD_FILE = 16 * 2**20  # bytes; a wildcard file is a list someone wrote

WILDCARD = re.compile(r"__([A-Za-z0-9_\-./*]+?)__")
VARIANTS = re.compile(r"\{[^{}]*\|[^{}]*\}|\{[^{}]*\$\$")  # {a|b}, {2$$a|b|c}


def default_folder() -> Path:
    return weights_dir() / "wildcards"


def has_syntax(text: str) -> bool:
    """Whether a prompt uses variants or wildcards (plain prompts never touch the library)."""
    return bool(WILDCARD.search(text) or VARIANTS.search(text))


def expand(text: str, folder: Path | None) -> list[str]:
    """Every prompt `text` stands for, in the library's order, duplicates removed; ValueError (with
    the reason) for an unknown or empty wildcard or too many combinations."""
    if not has_syntax(text):
        return [text]
    folder = folder if folder is not None else default_folder()
    for name in dict.fromkeys(WILDCARD.findall(text)):
        _check_wildcard(name, folder)
    from dynamicprompts.generators import CombinatorialPromptGenerator
    from dynamicprompts.wildcards.wildcard_manager import WildcardManager

    generator = CombinatorialPromptGenerator(WildcardManager(folder))
    try:
        prompts = [str(p) for p in generator.generate(text, max_prompts=MAX_AXIS_VALUES + 1)]
    except Exception as e:
        raise ValueError(f"variants or wildcards do not parse ({type(e).__name__}: {e})") from None
    if len(prompts) > MAX_AXIS_VALUES:
        raise ValueError(f"variants and wildcards make more than {MAX_AXIS_VALUES:,} prompts")
    prompts = list(dict.fromkeys(p.strip() for p in prompts))
    for prompt in prompts:
        if problem := text_problem(prompt, multiline=True):
            raise ValueError(f"an expanded prompt {problem}")
    return prompts or [""]


def _check_wildcard(name: str, folder: Path) -> None:
    if "*" in name:  # a glob over wildcard files: at least one must exist
        if not list(folder.glob(name + ".txt")):
            raise ValueError(f"wildcard __{name}__ matches no file in {folder}")
        return
    path = folder / f"{name}.txt"
    if ".." in Path(name).parts or not path.is_file():
        raise ValueError(f"unknown wildcard __{name}__: no file {path}")
    try:
        text = read_limited(path, MAX_WILDCARD_FILE).decode("utf-8-sig", errors="replace")
    except TooLarge as e:
        raise ValueError(f"wildcard __{name}__: {path} is {e}") from None
    except OSError as e:
        raise ValueError(f"wildcard __{name}__: {path} cannot be read ({e.strerror or e})") from None
    values = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not values:
        raise ValueError(f"wildcard __{name}__: {path} holds no values (blank lines and # comments are skipped)")
