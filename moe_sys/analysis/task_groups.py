"""`moe-sys tasks group RUN_DIR --groups K`: TAG's task grouping (analysis/affinity.py select_groups) on
the mean lookahead affinity a multitask run's probe logged, and one config per chosen group.

Each config is the run's resolved config with ``task.multitask.tasks`` set to the group's members (and
the per-task entries of other tasks dropped), so training it trains one encoder adapter set and the
group's decoders: TAG's "one network per group". Groups may overlap (a member can help another without
being served by the group); every task is served, and evaluated, by the one group it is assigned to.
"""
from __future__ import annotations

import os
from typing import List, Optional

from moe_sys.analysis.affinity import MAX_TASKS, select_groups
from moe_sys.analysis.affinity_plot import latest_affinity
from moe_sys.analysis.plot import read_records
from moe_sys.config import ConfigError, dump_config, load_config, validate

PER_TASK_KEYS = ("decoders", "losses", "weights")  # task.multitask mappings keyed by task name


def group_run(run_dir: str, k: int, out_dir: Optional[str] = None) -> List[str]:
    """Choose at most ``k`` groups, write OUT/group_<g>.yaml for each; returns the lines to print.
    ValueError (one line, naming the file or argument) for a run without affinity or a bad k."""
    entry = latest_affinity(read_records(run_dir))
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if entry is None or "lookahead_mean" not in entry:
        raise ValueError(f"{metrics}: no lookahead affinity logged (train a multitask run with "
                         "task.multitask.affinity.every > 0, past warm-up's zero learning rate)")
    tasks = entry["tasks"]
    if not 1 <= k <= len(tasks) or len(tasks) > MAX_TASKS:
        raise ValueError(f"--groups {k}: must be between 1 and the run's {len(tasks)} tasks ({', '.join(tasks)})"
                         + (f"; grouping searches at most {MAX_TASKS} tasks" if len(tasks) > MAX_TASKS else ""))
    grouping = select_groups(entry["lookahead_mean"], k)
    out_dir = out_dir or os.path.join(run_dir, "groups")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir}: is a file; a directory is expected")
    base = _run_config(run_dir)
    os.makedirs(out_dir, exist_ok=True)
    count = entry.get("measurements", {}).get("lookahead", "?")
    lines = [f"TAG grouping of {', '.join(tasks)} into at most {k} groups, on the mean lookahead affinity "
             f"({count} measurements) of {metrics}: score {grouping.score:.4f}"]
    for g, members in enumerate(grouping.groups, 1):
        names = [tasks[t] for t in members]
        served = [tasks[t] for t in range(len(tasks)) if grouping.assignment[t] == g - 1]
        path = os.path.join(out_dir, f"group_{g}.yaml")
        with open(path, "w") as f:
            f.write(dump_config(_group_config(base, names, f"{base.logging.run_dir.rstrip('/')}-group{g}")))
        lines.append(f"  group {g}: {', '.join(names)}  (serves {', '.join(served)})  -> {path}")
    return lines


def _run_config(run_dir: str):
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not found (the run's resolved config is needed to write the group configs)")
    try:
        cfg = load_config(path)
    except ConfigError as e:
        raise ValueError(f"{path}: not a valid config ({str(e).splitlines()[0]})") from None
    if cfg.task.type != "multitask":
        raise ValueError(f"{path}: task.type is {cfg.task.type}, grouping needs a multitask run")
    return cfg


def _group_config(cfg, names: List[str], run_dir: str):
    raw = cfg.model_dump()
    spec = raw["task"]["multitask"]
    spec["tasks"] = names
    for key in PER_TASK_KEYS:
        spec[key] = {t: v for t, v in spec[key].items() if t in names}
    raw["logging"]["run_dir"] = run_dir
    return validate(raw)
