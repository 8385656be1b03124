"""YAML -> Config, with `--set a.b=v` overrides and one-line errors that name the key."""
from __future__ import annotations

import copy
import difflib
from typing import Any, Dict, Iterable, List, Optional

import yaml
from pydantic import BaseModel, ValidationError

from moe_sys.config import yaml_io
from moe_sys.config.schema import Config
from moe_sys.config.yaml_io import ConfigError

__all__ = ["ConfigError", "load_config", "deep_merge", "validate", "apply_override", "describe_errors", "dump_config"]


def load_config(path: Optional[str], overrides: Iterable[str] = (), world_size: Optional[int] = None) -> Config:
    """Read YAML (None = defaults), apply overrides, validate types and cross-field rules."""
    raw: Dict[str, Any] = {}
    if path is not None:
        raw = yaml_io.read_file(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = deep_merge(Config().model_dump(), raw)  # defaults filled in, so overrides can index lists
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, world_size)


def deep_merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    """base with over's values; nested mappings merge, everything else (lists too) is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def validate(raw: Dict[str, Any], world_size: Optional[int] = None) -> Config:
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("\n".join(describe_errors(e, Config))) from None
    problems = cfg.check(world_size)
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def apply_override(raw: Dict[str, Any], item: str) -> None:
    """`a.b.c=value`: value parsed as YAML (so numbers, bools, lists work); list items by index."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set moe.top_k=2")
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {key}: empty key name in {key!r} (keys are joined by single dots, e.g. moe.top_k)")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        node = node[_index(part, key, len(node))] if isinstance(node, list) else node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:depth + 1])} is a value, not a section")
    parsed = yaml_io.parse(value, f"--set {key}", lines=False)
    if isinstance(node, list):
        node[_index(parts[-1], key, len(node))] = parsed
    else:
        node[parts[-1]] = parsed


def _index(part: str, key: str, n: int) -> int:
    if not part.isdigit() or int(part) >= n:
        raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {n} items")
    return int(part)


# pydantic's errors for the `type:` of a tagged union (adapters.modules items): unknown, or missing.
TAG_ERRORS = ("union_tag_invalid", "union_tag_not_found")


def describe_errors(e: ValidationError, root: Any) -> List[str]:
    """One line per wrong key (pydantic may report several errors for one value). root: the
    validated type (a section class, or an annotation such as List[AnySpec])."""
    lines: Dict[str, str] = {}
    for err in e.errors():
        loc, holder, members = _walk(err["loc"], root)
        if err["type"] in TAG_ERRORS:  # the tag is the key at fault: `type: bogus`, or none given
            loc, holder = [*loc, err["ctx"]["discriminator"].strip("'")], members
        key = ".".join(map(str, loc))
        lines.setdefault(key, f"{key}: {_problem(err, holder)}")
    return list(lines.values())


def _problem(err: Dict[str, Any], holder: Any) -> str:
    """holder: the section class holding the key; for a tag error, the union's member classes."""
    if err["type"] == "extra_forbidden":
        return f"unknown key{_suggest(str(err['loc'][-1]), list(holder.model_fields) if holder else [])}"
    if err["type"] in TAG_ERRORS:
        tags = [_tag(m) for m in holder]
        given = err["ctx"].get("tag")
        return (f"unknown type {given!r}{_suggest(given, tags)}" if given is not None
                else f"missing; one of {', '.join(tags)}")
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(err.get("input"), dict):  # a whole section: its rule's message says what is wrong
        return msg
    shown = repr(err.get("input"))
    return f"{msg} (got {shown if len(shown) <= 80 else shown[:77] + '...'})"


def _suggest(name: str, names: List[str]) -> str:
    """', did you mean X?' for the closest valid name, else the valid names."""
    if not names:
        return ""
    match = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid: {', '.join(names)}"


def _walk(loc, root: Any):
    """Pydantic's error location as the user writes the key (the ``type`` tags pydantic inserts for
    tagged unions dropped), the section class that holds its last key (None if unknown), and the
    section classes the location's value may be."""
    out, here, holder = [], _sections(root), None
    for part in loc:
        if isinstance(part, int):
            out.append(part)
            continue
        tagged = [m for m in here if _tag(m) == part]
        if len(here) > 1 and tagged:  # the tag of a tagged union member, not a key
            here = tagged
            continue
        holder = here[0] if len(here) == 1 else None
        field = holder.model_fields.get(part) if holder is not None else None
        here = _sections(field.annotation) if field is not None else []
        out.append(part)
    return out, holder, here


def _tag(model: type) -> Any:
    field = model.model_fields.get("type")
    return field.default if field is not None else None


def _sections(annotation: Any) -> List[type]:
    """The BaseModel classes inside an annotation (Optional[...], List[...], tagged unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) or () for m in _sections(arg)]


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
