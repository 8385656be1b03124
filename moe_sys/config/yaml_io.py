"""Reading YAML for configs, sweep files and ``--set`` values: safe, strict, and one line per mistake.

PyYAML's ``safe_load`` lets the last of two equal keys win silently, reads ``1e-3`` as a string
(YAML 1.1 wants ``1.0e-3``), and its errors span several lines. Here a duplicate key is an error
naming it and its line, floats are read as YAML 1.2 and JSON read them, no ``!!python`` tag
constructs anything (SafeLoader), and every problem becomes one ``ConfigError`` line
``file:line:col: problem``.
"""
from __future__ import annotations

import os
import re
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem, worded for the user: the key path (or file) first, then what is wrong."""


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads YAML 1.2 floats (``1e-3``, ``1E6``)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key ([a, b]: 1); SafeLoader words that one itself
                continue
        return super().construct_mapping(node, deep)


StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _where(err: yaml.YAMLError, source: str, lines: bool) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    if mark is None:
        return source
    return f"{source}:{mark.line + 1}:{mark.column + 1}" if lines else f"{source} (column {mark.column + 1})"


def _problem(err: yaml.YAMLError) -> str:
    text = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    return " ".join((f"{context}: {text}" if context else text).split())


def parse(text: str, source: str, lines: bool = True) -> Any:
    """YAML text -> Python values; ``source`` names it in the error (a file, or ``--set KEY``, whose
    one-line value gets a column but no line number)."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{_where(e, source, lines)}: not valid YAML: {_problem(e)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None


def read_file(path: str, what: str = "config file") -> Any:
    """The YAML document in ``path``; a missing file, a directory, non-UTF-8 bytes or an empty
    document are ConfigErrors naming the file."""
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a directory, not a {what}")
    if not os.path.isfile(path):
        raise ConfigError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: not a text file (it holds NUL bytes)")
    raw = parse(text, path)
    if raw is None:
        raise ConfigError(f"{path}: empty {what} (nothing but comments or blank lines)")
    return raw
