"""The task-affinity heatmaps of `moe-sys plot` (affinity.png): the latest running means of TAG's
lookahead affinity and of the gradient cosine that a multitask run's probe wrote to metrics.jsonl
(moe_sys/tasks/affinity_probe.py)."""
from __future__ import annotations

from typing import Dict, List, Optional

import matplotlib.pyplot as plt
import numpy as np

PANELS = (("lookahead_mean", "lookahead Z[i -> j] = 1 - L_j(after a step on i) / L_j"),
          ("cosine_mean", "gradient cosine C[i, j]"))


def latest_affinity(records: List[Dict]) -> Optional[Dict]:
    """The ``affinity`` entry of the last record holding one (its means cover every measurement so far)."""
    found = [r for r in records if isinstance(r.get("affinity"), dict)]
    return found[-1]["affinity"] if found else None


def affinity_heatmaps(records: List[Dict], run_dir: str):
    entry = latest_affinity(records)
    if entry is None:
        return None
    tasks, panels = entry["tasks"], [(key, title) for key, title in PANELS if key in entry]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        m_NN = np.array(entry[key], dtype=float)
        if m_NN.shape != (len(tasks), len(tasks)):
            raise ValueError(f"affinity {key} is {m_NN.shape}, expected {len(tasks)} x {len(tasks)}")
        vmax = 1.0 if key == "cosine_mean" else max(float(np.abs(m_NN).max()), 1e-12)
        im = ax.imshow(m_NN, cmap="RdBu", vmin=-vmax, vmax=vmax)
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                ax.text(j, i, f"{m_NN[i, j]:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(m_NN[i, j]) > 0.6 * vmax else "black")
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set(xlabel="j (task helped)" if key == "lookahead_mean" else "j", ylabel="i (task stepped on)"
               if key == "lookahead_mean" else "i")
        count = entry.get("measurements", {}).get(key[:-len("_mean")], "?")
        ax.set_title(f"{title}\nmean of {count} measurements", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"Task affinity on the shared parameters (up to step {_last_step(records)})", fontsize=10)
    fig.tight_layout()
    return fig


def _last_step(records: List[Dict]) -> int:
    return [r for r in records if isinstance(r.get("affinity"), dict)][-1]["step"]
