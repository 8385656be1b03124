"""Dense vs MoE at equal active parameters (docs/routing.md): Switch's headline on the embedded corpus.

    python -m moe_sys.analysis.dense_vs_moe [--out runs/dense_vs_moe] [--seeds 42 7] [--report-only]

Every row is ``moe-sys train configs/routing_study.yaml`` (the routing study's model, data, steps and
Switch aux 1e-2 + z-loss 1e-3) with the row's overrides, trained once per seed (``train.seed``: the
model initialisation; the data order is ``data.seed``'s, the same in every run) by the routing study's
runner; finished runs are not rerun. Equal active size: every token passes through FFN weights of
width d_ff = 256 in each layer, as one dense FFN, one top-1 expert of width 256, or two top-2 experts
of width 128 (plus the MoE router's [D, E] gate).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from typing import Dict, List

from moe_sys.analysis.plot import read_records
from moe_sys.analysis.routing_study import BASE, Row, finished, run_row

ROWS = [
    Row("dense", "dense SwiGLU FFN, d_ff 256 (DP=2)", ["moe.enabled=false", "parallel.ep_size=1"]),
    Row("top1", "8 experts of width 256, top-1 (EP=2)", ["moe.top_k=1", "moe.d_expert=256"]),
    Row("top2", "8 experts of width 128, top-2 (EP=2)", ["moe.top_k=2", "moe.d_expert=128"]),
]


def parameter_counts(overrides: List[str]) -> Dict[str, int]:
    """total and active (per token) parameters of the row's single-device model, embeddings included."""
    from moe_sys.config import load_config
    from moe_sys.models.transformer import TransformerLM

    cfg = load_config(BASE, overrides)
    model = TransformerLM(cfg.model, cfg.moe)
    total = sum(p.numel() for p in model.parameters())
    idle = sum(sum(p.numel() for p in layer.experts.parameters()) * (1 - layer.top_k / layer.num_experts)
               for layer in model.moe_layers())
    return {"total": total, "active": int(total - idle)}


def summarize(run_dir: str) -> Dict[str, float]:
    records = read_records(run_dir)
    val_loss = [r["val_loss"] for r in records if "val_loss" in r][-1]
    return {"val_loss": val_loss, "val_ppl": math.exp(val_loss),
            "step_s": statistics.median(r["step_time_s"] for r in records[1:])}


def report(out_dir: str, seeds: List[int]) -> str:
    lines = ["| row | what | total params | active params | " + " | ".join(f"val_loss seed {s}" for s in seeds)
             + " | mean val_loss | mean val ppl | step s (median) |",
             "|---|---|---|---|" + "---|" * len(seeds) + "---|---|---|"]
    for row in ROWS:
        runs = [os.path.join(out_dir, f"seed{s}", row.name) for s in seeds]
        if not all(finished(r) for r in runs):
            continue
        results = [summarize(r) for r in runs]
        counts = parameter_counts(row.overrides)
        losses = [r["val_loss"] for r in results]
        lines.append(f"| {row.name} | {row.what} | {counts['total']:,} | {counts['active']:,} | "
                     + " | ".join(f"{v:.3f}" for v in losses)
                     + f" | {statistics.mean(losses):.3f} | {statistics.mean(r['val_ppl'] for r in results):.2f}"
                     f" | {statistics.median(r['step_s'] for r in results):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/dense_vs_moe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7], help="train.seed values (42 = the config's)")
    parser.add_argument("--report-only", action="store_true", help="do not train; report the finished runs")
    args = parser.parse_args(argv)
    if not args.report_only:
        for seed in args.seeds:
            for row in ROWS:
                run_row(row, os.path.join(args.out, f"seed{seed}"), seed)
    table = report(args.out, args.seeds)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
