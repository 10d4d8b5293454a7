"""Variants `{red|blue}` and wildcards `__name__` in prompts, expanded with the `dynamicprompts`
library (the engine of A1111's Dynamic Prompts extension) into one prompt per combination: each is
its own task, with its own id, file name and sheet cell, and its literal text is what the PNG and
the manifest carry. A1111's own syntax (`(x:1.2)`, `[a:b:5]`, `[a|b]`) passes through untouched.

Wildcard files are text files, one value per line (`#` comments and blank lines skipped), looked
up in the job's `wildcards:` folder, else `$SDBATCH_WEIGHTS/wildcards` (default `weights/wildcards`).
A wildcard without a file, or whose file holds no values, is an error at validate time: the
library itself would silently leave `__name__` in the prompt.

The library never opens a file itself: sdbatch reads the folder's `*.txt` files once, each to a
size limit and all of them to a total, and hands it their values. So a wildcard named through a
glob (`__*__`) or inside another wildcard's file meets the same limits as one named in the prompt,
and no name (`__../x__`) reaches outside the folder.
"""

import os
import re
import stat
from functools import lru_cache
from pathlib import Path

from ..checkpoints.locate import weights_dir
from ..files import TooLarge, read_limited
from ..text import text_problem
from .ranges import MAX_AXIS_VALUES

MAX_WILDCARD_FILE = 16 * 2**20  # bytes; a wildcard file is a list someone wrote
MAX_WILDCARD_BYTES = 64 * 2**20  # all the folder's files together
MAX_WILDCARD_FILES = 10_000

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
    names = list(dict.fromkeys(WILDCARD.findall(text)))
    pantry = _pantry(folder, _listing(folder)) if names else {}
    seen = set(names)
    for name in names:  # grows with the names the reached files give (nested wildcards), each once
        for found in _check_wildcard(name, folder, pantry):
            for nested in WILDCARD.findall("\n".join(pantry[found])):
                if nested not in seen:
                    seen.add(nested)
                    names.append(nested)
    from dynamicprompts.generators import CombinatorialPromptGenerator
    from dynamicprompts.wildcards.wildcard_manager import WildcardManager

    manager = WildcardManager(root_map={"": [{k: list(v) for k, v in pantry.items()}]} if pantry else None)
    generator = CombinatorialPromptGenerator(manager)
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


def _listing(folder: Path) -> tuple[tuple[str, str, int, int], ...]:
    """(name, path, size, mtime) of every `*.txt` under `folder` (hidden files and folders skipped,
    linked folders not followed: no loops); what `_pantry` is cached by, so an edited file is read again."""
    found: list[tuple[str, str, int, int]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if filename.startswith(".") or not filename.endswith(".txt"):
                continue
            path = os.path.join(dirpath, filename)
            name = Path(os.path.relpath(path, folder)).with_suffix("").as_posix()
            try:
                st = os.stat(path)
            except OSError:
                st = None  # a dangling link: refused if named
            found.append(
                (name, path, st.st_size if st else -1, st.st_mtime_ns if st and stat.S_ISREG(st.st_mode) else -1)
            )
            if len(found) > MAX_WILDCARD_FILES:
                raise ValueError(f"wildcard folder {folder} holds more than {MAX_WILDCARD_FILES:,} files")
    return tuple(found)


@lru_cache(maxsize=2)
def _pantry(folder: Path, listing: tuple[tuple[str, str, int, int], ...]) -> dict[str, tuple[str, ...] | str]:
    """name -> its values (as the library reads a text file: stripped lines, no blank or `#` ones),
    or -> why it cannot be used (not a regular file, too large, unreadable)."""
    pantry: dict[str, tuple[str, ...] | str] = {}
    total = 0
    for name, path, _size, mtime in listing:
        if mtime < 0:
            pantry[name] = f"{path} is not a regular file"
            continue
        try:
            data = read_limited(path, MAX_WILDCARD_FILE)
        except TooLarge as e:
            pantry[name] = f"{path} is {e}"
            continue
        except OSError as e:
            pantry[name] = f"{path} cannot be read ({e.strerror or e})"
            continue
        total += len(data)
        if total > MAX_WILDCARD_BYTES:
            raise ValueError(f"wildcard folder {folder} holds more than {MAX_WILDCARD_BYTES // 2**20} MB of text")
        try:  # as job and prompt files: a byte that is not UTF-8 would reach the prompt as U+FFFD
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            pantry[name] = f"{path}:{line} is not UTF-8 text (save it as UTF-8)"
            continue
        pantry[name] = tuple(v for line in text.splitlines() if (v := line.strip()) and not v.startswith("#"))
    return pantry


def _check_wildcard(name: str, folder: Path, pantry: dict[str, tuple[str, ...] | str]) -> list[str]:
    """The files a name (from the prompt or a wildcard file) reaches: a glob must match some, a
    name must be one; each must be readable within the limits, and hold values (a glob: some)."""
    if "*" in name:
        pattern = re.compile(".*".join(re.escape(part) for part in name.split("*")) + "$")
        matched = [n for n in pantry if pattern.match(n)]
        if not matched:
            raise ValueError(f"wildcard __{name}__ matches no file in {folder}")
    else:
        matched = [name]
        if name not in pantry:
            raise ValueError(f"unknown wildcard __{name}__: no file {folder / (name + '.txt')}")
    for found in matched:
        if isinstance(pantry[found], str):
            raise ValueError(f"wildcard __{found}__: {pantry[found]}")
    if not any(pantry[found] for found in matched):  # a glob may reach empty files, not only those
        where = folder / (matched[0] + ".txt") if len(matched) == 1 else f"every file it matches in {folder}"
        raise ValueError(f"wildcard __{name}__: {where} holds no values (blank lines and # comments are skipped)")
    return matched
