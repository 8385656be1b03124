"""The state of each point of a sweep, read from its run directory (nothing else is kept).

A point is finished when its run directory holds the same resolved config the sweep file gives it
now and metrics up to the last step, so a rerun skips it. A point whose run stopped early (failed)
or whose config changed since (pending) runs again from scratch. Points whose config does not
validate fail without starting anything, with the config error as their reason.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import List, Optional

from moe_sys.config import Config, ConfigError, dump_config, load_config
from moe_sys.sweep.spec import Point, Sweep, overrides

FINISHED, FAILED, PENDING = "finished", "failed", "pending"
LOG = "train.log"


@dataclass
class PointState:
    point: Point
    run_dir: str
    cfg: Optional[Config]  # None: the config does not validate (see reason)
    state: str
    reason: str = ""

    @property
    def config_path(self) -> str:
        return os.path.join(self.run_dir, "config.yaml")


def plan(sweep: Sweep) -> List[PointState]:
    """Resolve every point's config and find out which points are finished. A grid none of whose
    points validates is a mistake in the sweep file (a key or base that does not exist, say): a
    ConfigError naming the file and the first point's problem, before anything runs."""
    states = [_state(sweep, point) for point in sweep.points]
    if all(s.cfg is None for s in states):
        first = states[0].reason.removeprefix("config error: ").splitlines()[0]
        raise ConfigError(f"{sweep.spec_path}: no point of the grid has a valid config; {states[0].point.name}: {first}")
    return states


def _state(sweep: Sweep, point: Point) -> PointState:
    run_dir = os.path.join(sweep.out_dir, "points", point.name)
    try:
        cfg = load_config(sweep.base_path, overrides(point, sweep.spec.set, run_dir))
    except ConfigError as e:
        return PointState(point, run_dir, None, FAILED, f"config error: {e}")
    state = PointState(point, run_dir, cfg, PENDING)
    if not _ran_this_config(state):
        return state
    records = read_metrics(run_dir)
    if records and records[-1].get("step") == cfg.train.steps:
        state.state = FINISHED
    elif os.path.exists(os.path.join(run_dir, LOG)):
        state.state, state.reason = FAILED, failure_reason(os.path.join(run_dir, LOG))
    return state


def _ran_this_config(p: PointState) -> bool:
    """Whether the run directory belongs to the point's config as the sweep file gives it now."""
    try:
        with open(p.config_path) as f:
            return f.read() == dump_config(p.cfg)
    except FileNotFoundError:
        return False


def reset(p: PointState) -> None:
    """A fresh run directory holding the point's resolved config (or, if invalid, the reason)."""
    shutil.rmtree(p.run_dir, ignore_errors=True)
    os.makedirs(p.run_dir)
    if p.cfg is None:
        with open(os.path.join(p.run_dir, LOG), "w") as f:
            f.write(p.reason + "\n")
        return
    with open(p.config_path, "w") as f:
        f.write(dump_config(p.cfg))


def read_metrics(run_dir: str) -> List[dict]:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def failure_reason(log_path: str) -> str:
    """The most telling line of a failed run's log: its last error line, else its last line."""
    with open(log_path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if re.search(r"(Error|Exception)\b|error:", line)]
    return (errors or lines or ["no output"])[-1][:300]
