"""Pictures of a metric run for `moe-sys plot`: retrieval metrics over steps, and queries with their
five nearest test images (green frame: same class, red: another class) from the last evaluation."""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

SAMPLE_FILE = "retrieval_sample.npz"  # written by moe_sys.tasks.metric at every evaluation; matplotlib is
# imported inside the functions so the training ranks that import this constant do not load it


def retrieval_curves(records: List[Dict], run_dir: str):
    import matplotlib.pyplot as plt

    evals = [r for r in records if "retrieval" in r]
    if not evals:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    steps = [r["step"] for r in evals]
    for key in ("unified/R@1", "hmean/R@1", "unified/MAP@R"):
        left.plot(steps, [r["retrieval"].get(key, np.nan) for r in evals], "o-", label=key)
    left.set(title="retrieval on the test classes", xlabel="step", ylim=(0, 1))
    left.legend(fontsize=8)
    domains = sorted({k.split("/")[1] for r in evals for k in r["retrieval"] if k.startswith("domain/")})
    for name in domains:
        right.plot(steps, [r["retrieval"].get(f"domain/{name}/R@1", np.nan) for r in evals], "o-", label=name)
    right.set(title="R@1 per domain", xlabel="step", ylim=(0, 1))
    if domains:
        right.legend(fontsize=7, ncol=2)
    return fig


def neighbours(records: List[Dict], run_dir: str):
    path = os.path.join(run_dir, SAMPLE_FILE)
    if not os.path.exists(path):
        return None
    import matplotlib.pyplot as plt

    sample = np.load(path)
    queries, found, match = sample["queries"], sample["neighbours"], sample["match"]
    rows, k = found.shape[:2]
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.2 * (k + 1), 1.2 * rows), squeeze=False)
    for q in range(rows):
        _show(axes[q, 0], queries[q], "black", str(sample["query_domains"][q]))
        for j in range(k):
            _show(axes[q, j + 1], found[q, j], "green" if match[q, j] else "red", "")
    axes[0, 0].set_title("query", fontsize=8)
    for j in range(k):
        axes[0, j + 1].set_title(f"#{j + 1}", fontsize=8)
    return fig


def _show(ax, image_CHW: np.ndarray, colour: str, label: str) -> None:
    image = image_CHW[0] if image_CHW.shape[0] == 1 else image_CHW.transpose(1, 2, 0)
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_ylabel(label, fontsize=6)
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(2.5)
