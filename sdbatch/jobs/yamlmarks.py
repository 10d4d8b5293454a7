"""YAML with line marks: every key and list item knows its line, and duplicate keys are errors.
Problems found anywhere in a job are collected as `Problem`s and raised together as one JobError.

Hostile documents are refused while they are read, before anything large is built: nesting deeper
than MAX_DEPTH (which would exhaust Python's stack), and aliases (`&a` ... `*a`) whose expansion
holds more than MAX_NODES nodes or MAX_CHARS characters of text (a "billion laughs" document is a
few hundred bytes that expand to gigabytes)."""

from dataclasses import dataclass
from typing import Any

import yaml

from ..errors import InputError
from ..text import printable

MAX_DEPTH = 64  # a job nests 5 or 6 levels (runs -> run -> prompt -> {file: ...})
MAX_NODES = 2_000_000  # expanded (aliases counted as often as they are used); 100,000 values per axis
MAX_CHARS = 64 * 2**20  # characters of text, expanded the same way

MAX_MESSAGE = 800  # characters of one problem's message


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        field = self.field if len(self.field) <= 60 else self.field[:59] + "…"
        message = self.message  # a 5,000-digit number or name from the file is echoed in part
        if len(message) > MAX_MESSAGE:
            message = f"{message[: MAX_MESSAGE - 40]}… ({len(message) - MAX_MESSAGE + 40:,} more characters)"
        return f"{where}: {field}: {message}" if field else f"{where}: {message}"


class JobError(InputError):
    """Everything wrong with a job file, one problem per line."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(dict.fromkeys(problems), key=lambda p: (p.file, p.line))  # each once
        # one line per problem, printable whatever the file or its paths are called
        super().__init__("\n".join(printable(str(p)).replace("\n", " ") for p in self.problems))


class LineDict(dict):
    """A mapping from the YAML file that remembers the line of each key (1-based)."""

    line: int = 0
    lines: dict


class LineList(list):
    line: int = 0
    lines: list


class _Limit(yaml.MarkedYAMLError):
    """A document too deep or too large once its aliases are expanded."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that counts what it composes: depth, and the expanded size of every node (an
    alias costs the whole size of what it names), so a hostile document fails at its first node
    past a limit, before it is constructed or walked."""

    duplicates: list

    def __init__(self, text: str):
        super().__init__(text)
        self.depth = 0
        self.sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, characters), once composed
        self.total = [0, 0]  # of the document so far, aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None and id(node) not in self.sizes:
                raise _Limit(None, None, f"alias *{event.anchor} refers to itself", event.start_mark)
            node = super().compose_node(parent, index)  # undefined aliases: yaml's own error
            self._count(node, event.start_mark)
            return node
        mark = self.peek_event().start_mark
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Limit(None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
        node = super().compose_node(parent, index)
        self.depth -= 1
        if isinstance(node, yaml.ScalarNode):
            size = (1, len(node.value))
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
            size = (1 + sum(self.sizes[id(c)][0] for c in children), sum(self.sizes[id(c)][1] for c in children))
        self.sizes[id(node)] = size
        if parent is None:  # the document's root: its size is the whole expansion
            self._check(size, mark)
        return node

    def _count(self, node: Any, mark: Any) -> None:
        """An alias: the whole size of the node it names is added again."""
        nodes, chars = self.sizes[id(node)]
        self.total[0] += nodes
        self.total[1] += chars
        self._check(tuple(self.total), mark)

    def _check(self, size: tuple, mark: Any) -> None:
        if size[0] > MAX_NODES or size[1] > MAX_CHARS or self.total[0] > MAX_NODES or self.total[1] > MAX_CHARS:
            raise _Limit(
                None,
                None,
                f"its aliases (&name / *name) expand to more than {MAX_NODES:,} values or "
                f"{MAX_CHARS // 2**20} MB of text; write the values out, or split the job",
                mark,
            )

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        """A value yaml cannot build (a date like 2024-13-45, an integer of 5,000 digits) is an
        error at its line, not a crash."""
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, OverflowError, TypeError, ArithmeticError) as e:
            problem = f"cannot read the value {node.value[:40]!r} ({e})" if isinstance(node.value, str) else str(e)
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict()
    result.line, result.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            key = str(key)[:200]
        line = key_node.start_mark.line + 1
        if key in result:
            loader.duplicates.append((line, key, result.lines[key]))
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = line
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line, result.lines = node.start_mark.line + 1, [child.start_mark.line + 1 for child in node.value]
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def parse_yaml(text: str, file: str) -> Any:
    loader = None
    try:
        loader = _Loader(text)  # refuses control characters in the raw text at once
        loader.duplicates = []
        data = loader.get_single_data()
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1 if isinstance(e.position, int) else 0
        raise JobError([Problem(file, line, "", _unprintable(e.character))]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        raise JobError([Problem(file, line, "", f"not valid YAML: {e.problem or e.context}")]) from None
    except yaml.YAMLError as e:
        raise JobError([Problem(file, 0, "", f"not valid YAML: {str(e).splitlines()[0]}")]) from None
    finally:
        if loader is not None:
            loader.dispose()
    if loader.duplicates:
        raise JobError(
            [Problem(file, line, key, f"given twice (first on line {first})") for line, key, first in loader.duplicates]
        )
    return data


def _unprintable(character: Any) -> str:
    code = character if isinstance(character, int) else ord(character) if isinstance(character, str) else None
    if code == 0:
        return "holds a NUL character (a binary file, or text saved as UTF-16?); a job file is UTF-8 text"
    if code is None:
        return "holds a character YAML does not allow"
    return f"holds the control character U+{code:04X}, which YAML does not allow in a file; remove it"
