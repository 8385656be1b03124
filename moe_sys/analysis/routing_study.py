"""The routing study of docs/routing.md: balancing methods and routing levels on the embedded corpus.

    python -m moe_sys.analysis.routing_study [--out runs/routing_study] [--img docs/img] [--report-only]

Every row is ``moe-sys train configs/routing_study.yaml`` with the row's overrides (same model, data,
steps and seed), run one after another; finished rows are not rerun. Then a markdown table
(results.md) and two figures are written.

Columns (each averaged over MoE layers and the last quarter of the logged steps, except val_loss):
  val_loss     held-out LM loss at the last step
  max/mean     max expert load / mean load (1 = balanced, E = collapse)
  CV           coefficient of variation of the expert loads
  I(dom;exp)   mutual information between a slot's domain and its expert, bits (0 = experts shared
               evenly by the domains; log2(3) = 1.58 = each domain has experts of its own)
  top-K share  share of a domain's slots on its K most used experts (K/E = no preference, 1 = fixed)
  unrouted     share of chosen slots dropped (expert choice: tokens no expert took)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from moe_sys.analysis.plot import mean_usage, read_records

BASE = "configs/routing_study.yaml"
Z = "{type: z, coef: 0.001}"


def _losses(*terms: str) -> str:
    return "moe.balance.losses=[" + ", ".join(terms) + "]"


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    overrides: List[str]


ROWS = [
    Row("none", "token top-2, no balancing loss", [_losses(Z)]),
    Row("switch", "token top-2, Switch aux 1e-2", [_losses("{type: switch, coef: 0.01}", Z)]),
    Row("seq", "token top-2, sequence aux 1e-2", [_losses("{type: seq, coef: 0.01}", Z)]),
    Row("global", "token top-2, global-batch aux 1e-2", [_losses("{type: global, coef: 0.01}", Z)]),
    Row("bias", "token top-2, aux-loss-free bias u=1e-3", [_losses(Z), "moe.balance.bias.enabled=true"]),
    Row("expert_choice", "expert choice, C=T*K/E (non-causal)",
        [_losses(Z), "moe.router.type=expert_choice", "moe.router.allow_noncausal=true"]),
    Row("example", "example-level top-2, Switch aux 1e-2 (non-causal)",
        ["moe.router.type=example", "moe.router.allow_noncausal=true"]),
    Row("task_embedding", "task-level top-2, learned task embedding, Switch aux 1e-2", ["moe.router.type=task"]),
    Row("task_table", "task-level, fixed table code->{0,1} prose->{2,3} data->{4,5}",
        ["moe.router.type=task", "moe.router.task_table=[[0, 1], [2, 3], [4, 5]]", "moe.balance.losses=[]"]),
]


def run_row(row: Row, out_dir: str, seed: Optional[int]) -> None:
    """Train the row unless its run directory already holds a finished run."""
    run_dir = os.path.join(out_dir, row.name)
    if finished(run_dir):
        return
    print(f"training {row.name}: {row.what}", flush=True)
    extra = [f"logging.run_dir={run_dir}", *([f"train.seed={seed}"] if seed is not None else [])]
    sets = [item for o in [*row.overrides, *extra] for item in ("--set", o)]
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{row.name}.log"), "w") as log:
        code = subprocess.call([sys.executable, "-m", "moe_sys.cli", "train", BASE, *sets], stdout=log,
                               stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"row {row.name} failed (exit {code}); see {out_dir}/{row.name}.log")


def finished(run_dir: str) -> bool:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    records = read_records(run_dir)
    with open(os.path.join(run_dir, "config.yaml")) as f:
        steps = int(next(line for line in f if line.strip().startswith("steps:")).split(":")[1])
    return bool(records) and records[-1]["step"] == steps and "val_loss" in records[-1]


def specialization(usage_AE: np.ndarray, p_a: np.ndarray, top_k: int):
    """(I(domain; expert) in bits, mean share of a domain's slots on its top_k experts)."""
    joint = p_a[:, None] * usage_AE
    p_e = joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log2(joint[nz] / (p_a[:, None] * p_e[None, :])[nz])).sum())
    share = float(np.sort(usage_AE, axis=1)[:, -top_k:].sum(1).mean())
    return mi, share


def summarize(run_dir: str, domain_weights: np.ndarray, top_k: int) -> Dict[str, float]:
    records = read_records(run_dir)
    tail = records[-max(1, len(records) // 4):]
    usage_LAE = mean_usage(tail)
    spec = [specialization(u, domain_weights, top_k) for u in usage_LAE]
    return {
        "val_loss": [r["val_loss"] for r in records if "val_loss" in r][-1],
        "max/mean": float(np.mean([r["load_max_mean"] for r in tail])),
        "CV": float(np.mean([r["load_cv"] for r in tail])),
        "I(dom;exp)": float(np.mean([s[0] for s in spec])),
        "top-K share": float(np.mean([s[1] for s in spec])),
        "unrouted": float(np.mean([r["dropped_fraction"] for r in tail])),
        "tokens/s": float(np.median([r["tokens_per_s"] for r in records[1:]])),
    }


def write_table(results: Dict[str, Dict[str, float]], path: str) -> str:
    columns = list(next(iter(results.values())))
    lines = ["| row | what | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    what = {row.name: row.what for row in ROWS}
    for name, values in results.items():
        cells = [f"{values[c]:.0f}" if c == "tokens/s" else f"{values[c]:.3f}" for c in columns]
        lines.append(f"| {name} | {what[name]} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(table)
    return table


def figures(out_dir: str, img_dir: str, names: List[str]) -> List[str]:
    """Two small PNGs for the doc: domain x expert usage (last layer) per row, and load CV over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe_sys.analysis.plot import domain_names

    os.makedirs(img_dir, exist_ok=True)
    runs = {n: read_records(os.path.join(out_dir, n)) for n in names}
    cols = 3
    fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, figsize=(10, 1.35 * ((len(names) + cols - 1) // cols) + 0.6),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        tail = runs[name][-max(1, len(runs[name]) // 4):]
        usage_AE = mean_usage(tail)[-1]
        im = ax.imshow(usage_AE, cmap="Blues", vmin=0, vmax=0.6, aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_yticks(range(usage_AE.shape[0]))
        ax.set_yticklabels(domain_names(os.path.join(out_dir, name), usage_AE.shape[0]), fontsize=7)
        ax.set_xticks(range(usage_AE.shape[1]))
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Share of each domain's routed slots per expert 0-7 (last MoE layer, last quarter of training)",
                 fontsize=10)
    fig.tight_layout()
    fig.colorbar(im, ax=axes, shrink=0.6, label="share")
    usage_path = os.path.join(img_dir, "routing_domain_usage.png")
    fig.savefig(usage_path, dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    for name in names:
        rows = [r for r in runs[name] if "load_cv" in r]
        ax.plot([r["step"] for r in rows], [float(np.mean(r["load_cv"])) for r in rows], label=name)
    ax.set(xlabel="step", ylabel="load CV (mean over layers)", title="Expert-load imbalance during training")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    cv_path = os.path.join(img_dir, "routing_load_cv.png")
    fig.savefig(cv_path, dpi=80)
    plt.close(fig)
    return [usage_path, cv_path]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/routing_study")
    parser.add_argument("--img", default="docs/img")
    parser.add_argument("--rows", nargs="*", default=[r.name for r in ROWS], help="subset of rows, in table order")
    parser.add_argument("--report-only", action="store_true", help="do not train; report the finished rows")
    parser.add_argument("--seed", type=int, help="another train.seed (model initialisation), to see the "
                        "run-to-run spread; runs go to OUT/seedN")
    args = parser.parse_args(argv)
    if args.seed is not None:
        args.out = os.path.join(args.out, f"seed{args.seed}")
    from moe_sys.config import load_config

    cfg = load_config(BASE)
    weights = np.array([d.weight for d in cfg.data.domains])
    rows = [r for r in ROWS if r.name in args.rows]
    if not args.report_only:
        for row in rows:
            run_row(row, args.out, args.seed)
    done = [r.name for r in rows if finished(os.path.join(args.out, r.name))]
    results = {n: summarize(os.path.join(args.out, n), weights / weights.sum(), cfg.moe.top_k) for n in done}
    print(write_table(results, os.path.join(args.out, "results.md")))
    for path in figures(args.out, args.img, done):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
