"""YAML -> Config, with `--set a.b=v` overrides and one-line errors that name the key."""
from __future__ import annotations

import copy
import difflib
import os
from typing import Any, Dict, Iterable, Optional

import yaml
from pydantic import BaseModel, ValidationError

from moe_sys.config.schema import Config


class ConfigError(ValueError):
    """A config problem, worded for the user: the key path first, then what is wrong."""


def load_config(path: Optional[str], overrides: Iterable[str] = (), world_size: Optional[int] = None) -> Config:
    """Read YAML (None = defaults), apply overrides, validate types and cross-field rules."""
    raw: Dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
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
        raise ConfigError("\n".join(_describe(err) for err in e.errors())) from None
    problems = cfg.check(world_size)
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def apply_override(raw: Dict[str, Any], item: str) -> None:
    """`a.b.c=value`: value parsed as YAML (so numbers, bools, lists work); list items by index."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set moe.top_k=2")
    parts = key.strip().split(".")
    node: Any = raw
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[_index(part, key, len(node))]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
    parsed = yaml.safe_load(value)
    if isinstance(node, list):
        node[_index(parts[-1], key, len(node))] = parsed
    else:
        node[parts[-1]] = parsed


def _index(part: str, key: str, n: int) -> int:
    if not part.isdigit() or int(part) >= n:
        raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {n} items")
    return int(part)


def _describe(err: Dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key{_suggest(err['loc'])}"
    value = err.get("input")
    return f"{loc}: {err['msg']} (got {value!r})"


def _suggest(loc) -> str:
    """', did you mean X?' for the closest valid name in the section that holds the bad key."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return ""
        model = _section_type(field.annotation)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.5)
    valid = ", ".join(model.model_fields)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {valid}"


def _section_type(annotation: Any) -> Any:
    """The BaseModel inside Optional[...] / List[...] annotations, else the annotation itself."""
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_type(arg)
        if isinstance(found, type) and issubclass(found, BaseModel):
            return found
    return annotation


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
