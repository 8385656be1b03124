"""A sweep file: a base config, fixed overrides, and a grid that expands into named points.

```yaml
base: ../tiny.yaml                  # relative to this file
out_dir: runs/sweeps/experts        # default: runs/sweeps/<file name>
set: {train.steps: 300}             # applied to every point
grid:                               # every combination is one point, in this order
  moe.num_experts: [4, 8, 16]
  moe.top_k: [1, 2]
```

A point's name is built from its grid values only (``num_experts-4__top_k-1``), so it names the
same run on every invocation: that is how a rerun finds the points it already finished.
"""
from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional

from pydantic import Field, ValidationError

from moe_sys.config import ConfigError, yaml_io
from moe_sys.config.loader import describe_errors
from moe_sys.config.section import Section

# What a plot's y axis can show: a column of results.csv (moe_sys.sweep.report).
Metric = Literal["val_loss", "loss", "tokens_per_s", "load_imbalance"]


class _Spec(Section):
    """Strict types and unknown keys refused, as in config sections."""


class PlotSpec(_Spec):
    x: str = Field(description="config key on the x axis, e.g. moe.num_experts")
    y: Metric


class SlurmSpec(_Spec):
    args: List[str] = Field(default_factory=list, description="extra sbatch options, e.g. --partition=gpu")
    max_parallel: Optional[int] = Field(None, gt=0, description="array tasks running at once (sbatch --array=...%N)")


DEFAULT_PLOTS = [PlotSpec(x="moe.num_experts", y="val_loss"), PlotSpec(x="parallel.ep_size", y="tokens_per_s"),
                 PlotSpec(x="moe.router.type", y="load_imbalance")]


class SweepSpec(_Spec):
    base: str = Field(description="config file the grid varies; relative to the sweep file")
    out_dir: Optional[str] = Field(None, description="where points and results go; None = runs/sweeps/<file name>")
    set: Dict[str, Any] = Field(default_factory=dict, description="overrides applied to every point")
    grid: Dict[str, List[Any]] = Field(min_length=1, description="config key -> values; the points are all combinations")
    plots: List[PlotSpec] = Field(default_factory=lambda: list(DEFAULT_PLOTS))
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)


@dataclass(frozen=True)
class Point:
    name: str
    values: Dict[str, Any]  # grid key -> this point's value


@dataclass(frozen=True)
class Sweep:
    spec: SweepSpec
    spec_path: str
    base_path: str
    out_dir: str
    points: List[Point]


def load_sweep(path: str) -> Sweep:
    """Read and check a sweep file; expand its grid."""
    raw = yaml_io.read_file(path, "sweep file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (base, grid, ...), got {type(raw).__name__}")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("\n".join(f"{path}: {line}" for line in describe_errors(e, SweepSpec))) from None
    for key, values in spec.grid.items():
        if not values:
            raise ConfigError(f"{path}: grid.{key}: needs at least one value")
    stem = os.path.splitext(os.path.basename(path))[0]
    return Sweep(spec=spec, spec_path=path, base_path=os.path.normpath(os.path.join(os.path.dirname(path), spec.base)),
                 out_dir=spec.out_dir or os.path.join("runs", "sweeps", stem), points=expand(spec.grid))


def expand(grid: Dict[str, List[Any]]) -> List[Point]:
    """All combinations, the first key varying slowest; names unique or a ConfigError."""
    labels = _labels(list(grid))
    points = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        name = "__".join(f"{labels[k]}-{_format(v)}" for k, v in values.items())
        points.append(Point(name, values))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"grid: values that differ only in punctuation give the same point names: {names}")
    return points


def overrides(point: Point, fixed: Dict[str, Any], run_dir: str) -> List[str]:
    """``--set`` items for a point (values as JSON, which the YAML override parser reads back exactly)."""
    items = {**fixed, **point.values, "logging.run_dir": run_dir}
    return [f"{key}={json.dumps(value)}" for key, value in items.items()]


def _labels(keys: List[str]) -> Dict[str, str]:
    """The last part of each key (``moe.top_k`` -> ``top_k``), the whole key where two would clash."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (short if last.count(short) == 1 else k) for k, short in zip(keys, last)}


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, (list, tuple)):
        text = "+".join(_format(v) for v in value)
    elif isinstance(value, dict):
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)
