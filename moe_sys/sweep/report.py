"""A sweep's results: results.csv (one row per point), results.md (the same as a table, the failures
with their reasons, the plots) and one PNG per plot of the sweep file.

Columns, from each finished point's metrics.jsonl:
  val_loss        the last evaluation's held-out loss
  loss            mean training loss over the last 5 logged steps
  tokens_per_s    median over logged steps, the first left out (it includes warm-up)
  load_imbalance  max expert load / mean load - 1, averaged over MoE layers and the last 5 logged
                  steps (0 = perfectly even; E - 1 = every token on one expert)
"""
from __future__ import annotations

import csv
import os
import statistics
from typing import Any, Dict, List, Optional

from moe_sys.sweep.points import FINISHED, PointState, read_metrics
from moe_sys.sweep.spec import PlotSpec, Sweep

METRICS = ["val_loss", "loss", "tokens_per_s", "load_imbalance"]
_MISSING = object()


def summarize(run_dir: str) -> Dict[str, Optional[float]]:
    """The metric columns for one run directory (None where the run logged nothing to compute it)."""
    records = read_metrics(run_dir)
    tail = records[-5:]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    speed = [r["tokens_per_s"] for r in records[1:]] or [r["tokens_per_s"] for r in records]
    loads = [x for x in (_imbalance(r.get("expert_load") or []) for r in tail) if x is not None]
    return {"val_loss": val[-1] if val else None,
            "loss": statistics.fmean(r["loss"] for r in tail) if tail else None,
            "tokens_per_s": statistics.median(speed) if speed else None,
            "load_imbalance": statistics.fmean(loads) if loads else None}


def _imbalance(load_LE: List[List[float]]) -> Optional[float]:
    per_layer = [max(layer) / statistics.fmean(layer) - 1 for layer in load_LE if sum(layer) > 0]
    return statistics.fmean(per_layer) if per_layer else None


def write_report(sweep: Sweep, states: List[PointState]) -> None:
    os.makedirs(sweep.out_dir, exist_ok=True)
    keys = list(sweep.spec.grid)
    rows = [_row(p, keys) for p in states]
    columns = ["name", "status", *keys, *METRICS, "reason"]
    with open(os.path.join(sweep.out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    made = [_plot(sweep, plot, states, rows) for plot in sweep.spec.plots]
    with open(os.path.join(sweep.out_dir, "results.md"), "w") as f:
        f.write(_markdown(sweep, columns[:-1], rows, [m for m in made if m]))


def _row(p: PointState, keys: List[str]) -> Dict[str, Any]:
    metrics = summarize(p.run_dir) if p.state == FINISHED else dict.fromkeys(METRICS)
    return {"name": p.point.name, "status": p.state, **p.point.values, **metrics, "reason": p.reason}


def _markdown(sweep: Sweep, columns: List[str], rows: List[Dict[str, Any]], plots: List[str]) -> str:
    lines = [f"# Sweep {os.path.basename(sweep.out_dir)}", "",
             f"Base config `{sweep.base_path}`, grid from `{sweep.spec_path}`.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    failed = [row for row in rows if row["status"] != FINISHED]
    if failed:
        lines += ["", "## Not finished", ""]
        lines += [f"- `{row['name']}` ({row['status']}): {row['reason'] or 'never ran'}" for row in failed]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _plot(sweep: Sweep, plot: PlotSpec, states: List[PointState], rows: List[Dict[str, Any]]) -> Optional[str]:
    """One line (or set of markers) per combination of the other grid keys; None if nothing to show."""
    series: Dict[str, List[tuple]] = {}
    others = [k for k in sweep.spec.grid if k != plot.x]
    for p, row in zip(states, rows):
        x = _lookup(p.cfg.model_dump(), plot.x) if p.cfg is not None else _MISSING
        if row["status"] != FINISHED or row[plot.y] is None or x is _MISSING:
            continue
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={p.point.values[k]}" for k in others) or plot.y
        series.setdefault(label, []).append((x, row[plot.y]))
    if not series:
        return None
    name = f"{plot.y}_vs_{plot.x.rsplit('.', 1)[-1]}.png"
    _draw(series, plot, os.path.join(sweep.out_dir, name))
    return name


def _draw(series: Dict[str, List[tuple]], plot: PlotSpec, path: str) -> None:
    """Lines over a numeric key (experts, EP size); grouped bars over a categorical one (router type)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for pts in series.values() for x, _ in pts)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    (_lines if numeric else _bars)(ax, series)
    ax.set_xlabel(plot.x)
    ax.set_ylabel(plot.y)
    ax.set_title(f"{plot.y} vs {plot.x.rsplit('.', 1)[-1]}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes, off the data
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _lines(ax, series: Dict[str, List[tuple]]) -> None:
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    # Ticks at the values that were run, on a log scale when they span a wide range.
    ticks = sorted({x for pts in series.values() for x, _ in pts})
    if ticks[0] > 0 and ticks[-1] / ticks[0] >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()


def _bars(ax, series: Dict[str, List[tuple]]) -> None:
    categories = list(dict.fromkeys(str(x) for pts in series.values() for x, _ in pts))
    width = 0.8 / len(series)
    for i, (label, pts) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar([categories.index(str(x)) + offset for x, _ in pts], [y for _, y in pts], width, label=label)
    ax.set_xticks(range(len(categories)), categories)


def _lookup(tree: Dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node
