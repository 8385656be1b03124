"""`moe-sys plot RUN_DIR`: PNGs of a run's routing and losses from its metrics.jsonl.

  expert_load.png   per MoE layer, expert x step heatmap of load relative to uniform (1 = balanced)
  domain_usage.png  per MoE layer, domain x expert share of each domain's routed slots
                    (mean over the last quarter of the logged steps)
  balance.png       max/mean load and coefficient of variation per layer over steps
  losses.png        LM and validation loss; balancing and z losses
  retrieval.png     metric runs: retrieval metrics over steps, unified and per domain
  neighbours.png    metric runs: queries and their top-5 neighbours at the last evaluation
  affinity.png      multitask runs with affinity.every: lookahead and gradient-cosine task affinity
                    (latest running means)
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")  # files only; no display needed on clusters
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from moe_sys.analysis.affinity_plot import affinity_heatmaps  # noqa: E402
from moe_sys.analysis.retrieval_plot import neighbours, retrieval_curves  # noqa: E402


def read_records(run_dir: str) -> List[Dict]:
    """metrics.jsonl's records; a ValueError / FileNotFoundError naming the file (and line) otherwise."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: not a run directory" if os.path.exists(run_dir)
                                else f"run directory not found: {run_dir}")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (has this run logged any step?)")
    records = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                records.append(_record(line, f"{path}:{number}"))
    return records


def _record(line: bytes, where: str) -> Dict:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a JSON record ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ValueError(f"{where}: a metrics record is a JSON object with an integer 'step'")
    return record


def domain_names(run_dir: str, count: int) -> List[str]:
    """Names from the run's resolved config (domain ids are indices into data.domains)."""
    path = os.path.join(run_dir, "config.yaml")
    if os.path.exists(path):
        try:
            with open(path) as f:
                names = [d["name"] for d in yaml.safe_load(f)["data"]["domains"]]
        except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a resolved config with data.domains ({type(e).__name__})") from None
        if len(names) == count:
            return names
    return [str(i) for i in range(count)]


def plot_run(run_dir: str, out_dir: Optional[str] = None) -> List[str]:
    """Write every plot the run's metrics allow; returns the files written."""
    records = read_records(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no records")
    out_dir = out_dir or os.path.join(run_dir, "plots")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir}: is a file; a directory is expected")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, draw in (("expert_load", expert_load), ("domain_usage", domain_usage), ("balance", balance),
                       ("losses", losses), ("retrieval", retrieval_curves), ("neighbours", neighbours),
                       ("affinity", affinity_heatmaps)):
        try:
            fig = draw(records, run_dir)
        except (KeyError, TypeError, ValueError, IndexError) as e:  # records of another shape than we log
            plt.close("all")
            raise ValueError(f"{run_dir}/metrics.jsonl: cannot draw {name}: unexpected records "
                             f"({type(e).__name__}: {e})") from None
        if fig is not None:
            path = os.path.join(out_dir, f"{name}.png")
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    return written


def _with(records: List[Dict], key: str) -> List[Dict]:
    return [r for r in records if key in r]


def expert_load(records: List[Dict], run_dir: str):
    rows = _with(records, "expert_load")
    if not rows:
        return None
    load_SLE = np.array([r["expert_load"] for r in rows])
    steps = [r["step"] for r in rows]
    S, L, E = load_SLE.shape
    fig, axes = plt.subplots(L, 1, figsize=(8, 1.2 + 0.25 * E * L), squeeze=False, sharex=True)
    vmax = max(2.0, float((load_SLE * E).max()))
    for layer, ax in enumerate(axes[:, 0]):
        im = ax.imshow((load_SLE[:, layer, :] * E).T, aspect="auto", cmap="magma", vmin=0, vmax=vmax,
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, E - 0.5, -0.5), interpolation="nearest")
        ax.set_ylabel(f"layer {layer}\nexpert")
        ax.set_yticks(range(E))
    axes[-1, 0].set_xlabel("step")
    fig.colorbar(im, ax=axes[:, 0], label="load / uniform load")
    fig.suptitle("Expert load per layer (1 = balanced)")
    return fig


def mean_usage(records: List[Dict]) -> np.ndarray:
    """domain_expert_usage averaged over records, each domain over the steps whose batches held it
    (a step without a domain logs a zero row for it). [L, A, E]"""
    usage_RLAE = np.array([r["domain_expert_usage"] for r in records])
    present_RLA1 = usage_RLAE.sum(-1, keepdims=True) > 0
    return (usage_RLAE * present_RLA1).sum(0) / np.maximum(present_RLA1.sum(0), 1)


def domain_usage(records: List[Dict], run_dir: str):
    rows = _with(records, "domain_expert_usage")
    if not rows:
        return None
    tail = rows[-max(1, len(rows) // 4):]
    usage_LAE = mean_usage(tail)
    L, A, E = usage_LAE.shape
    names = domain_names(run_dir, A)
    fig, axes = plt.subplots(1, L, figsize=(1.0 + 0.45 * E * L, 1.2 + 0.45 * A), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        ax.imshow(usage_LAE[layer], cmap="Blues", vmin=0, vmax=max(0.5, usage_LAE.max()), aspect="equal")
        for a in range(A):
            for e in range(E):
                value = usage_LAE[layer, a, e]
                ax.text(e, a, f"{value * 100:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if value > 0.35 else "black")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks(range(E))
        ax.set_xlabel("expert")
        ax.set_yticks(range(A))
        ax.set_yticklabels(names if layer == 0 else [])
    fig.suptitle(f"Share of each domain's routed slots per expert, % (steps {tail[0]['step']}-{tail[-1]['step']})",
                 fontsize=10)
    return fig


def balance(records: List[Dict], run_dir: str):
    rows = _with(records, "load_cv")
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    for layer in range(len(rows[0]["load_cv"])):
        left.plot(steps, [r["load_max_mean"][layer] for r in rows], label=f"layer {layer}")
        right.plot(steps, [r["load_cv"][layer] for r in rows], label=f"layer {layer}")
    left.set(title="max / mean expert load", xlabel="step")
    right.set(title="coefficient of variation of expert load", xlabel="step")
    left.legend(fontsize=8)
    return fig


def losses(records: List[Dict], run_dir: str):
    train = _with(records, "lm_loss")
    if not train:  # a metric run: retrieval_curves draws its evaluation
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    left.plot([r["step"] for r in train], [r["lm_loss"] for r in train], label="train LM loss")
    val = _with(records, "val_loss")
    if val:
        left.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    left.set(title="language-model loss", xlabel="step")
    left.legend(fontsize=8)
    names = sorted({name for r in train for name in r.get("router_losses", {})})
    for name in names:
        right.plot([r["step"] for r in train], [r.get("router_losses", {}).get(name, np.nan) for r in train], label=name)
    right.set(title="router losses (weighted, summed over layers)", xlabel="step")
    if names:
        right.legend(fontsize=8)
    return fig
