"""YAML with line marks: every key and list item knows its line, and duplicate keys are errors.
Problems found anywhere in a job are collected as `Problem`s and raised together as one JobError."""

from dataclasses import dataclass
from typing import Any

import yaml

from ..errors import InputError


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class JobError(InputError):
    """Everything wrong with a job file, one problem per line."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(problems, key=lambda p: (p.file, p.line))
        super().__init__("\n".join(map(str, self.problems)))


class LineDict(dict):
    """A mapping from the YAML file that remembers the line of each key (1-based)."""

    line: int = 0
    lines: dict


class LineList(list):
    line: int = 0
    lines: list


class _Loader(yaml.SafeLoader):
    duplicates: list


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict()
    result.line, result.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            key = str(key)
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
    loader = _Loader(text)
    loader.duplicates = []
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        raise JobError([Problem(file, line, "", f"not valid YAML: {e.problem or e.context}")]) from None
    except yaml.YAMLError as e:
        raise JobError([Problem(file, 0, "", f"not valid YAML: {e}")]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise JobError(
            [Problem(file, line, key, f"given twice (first on line {first})") for line, key, first in loader.duplicates]
        )
    return data
