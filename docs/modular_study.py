"""The measured comparison in docs/modular.md: a dense base, then adapters on it, same budget per row.

    python docs/modular_study.py [--out runs/modular_study] [--steps 150] [--base-steps 150] [--seeds 42,43]

1. Trains the dense tiny model (configs/tiny.yaml with moe.enabled=false) for --base-steps.
2. Every row starts from that checkpoint (train.init_from), freezes it, and trains only its adapters
   for --steps with the same data order, batch, learning-rate schedule and evaluation batches, once
   per adapter seed (train.seed: adapter init, dropout, routing noise; the data stay the same).
3. Times one training step of every row in this process (forward, backward, AdamW on the trainable
   parameters; batch 8 x 128, one rank), the rows interleaved round-robin so that other load on the
   machine hits them alike.
4. Prints a markdown table (also written to OUT/results.md): held-out loss overall and per domain at
   the last step (mean over seeds; +- half the range), trainable parameters, step time.
Runs that finished are reused (delete OUT/<row> to redo one).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = ["code", "prose", "data"]
FFN_LINEARS = ["layers.*.ffn.gate", "layers.*.ffn.up", "layers.*.ffn.down"]
LORA = {"rank": 8, "alpha": 16}
ROWS = {  # the base's own row is its last evaluation (same validation batches)
    "+ one LoRA (FFN, r=8)": [{"type": "lora", "name": "lora", "targets": FFN_LINEARS, **LORA}],
    "+ per-domain LoRAs (task routing)": [{"type": "lora", "name": "domains", "targets": FFN_LINEARS, **LORA,
                                           "slots": DOMAINS, "select": "domain"}],
    "+ LoRA-expert mixture (token top-2 of 4)": [{"type": "mixture", "name": "moe", "num_experts": 4, "top_k": 2,
                                                  "expert": {"kind": "lora", **LORA}}],
    "+ SMEAR (4 LoRA experts)": [{"type": "smear", "name": "smear", "num_experts": 4, "segments": 4,
                                  "expert": {"kind": "lora", **LORA}}],
    "+ ensemble of the 4 LoRA experts": [{"type": "smear", "name": "ensemble", "num_experts": 4, "segments": 4,
                                          "aggregation": "outputs", "expert": {"kind": "lora", **LORA}}],
}
COMMON = ["moe.enabled=false", "train.eval_batches=16", "train.eval_every=50", "checkpoint.every=0",
          "logging.progress_bar=false", "logging.tensorboard=false"]


def train(run_dir: str, sets: list) -> str:
    """`moe-sys train` (2 CPU ranks, EP=2); returns its log. Skipped when the run already finished."""
    log_path = os.path.join(run_dir, "train.log")
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and os.path.exists(log_path):
        with open(log_path) as f:
            return f.read()
    os.makedirs(run_dir, exist_ok=True)
    args = [a for s in COMMON + sets + [f"logging.run_dir={run_dir}"] for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "moe_sys.cli", "train", "configs/tiny.yaml", *args], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{run_dir} failed:\n{proc.stderr[-3000:]}")
    with open(log_path, "w") as f:
        f.write(proc.stderr)
    return proc.stderr


def summarize(run_dir: str, log: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    last = [r for r in records if "val_loss" in r][-1]
    counts = re.search(r"adapters \[.*\]: ([\d,]+) trainable of ([\d,]+) parameters", log)
    return {"val": last["val_loss"], **last["val_loss_domain"],
            "trainable": int(counts.group(1).replace(",", "")) if counts else 0}


def step_times(rounds: int = 5, iters: int = 4) -> dict:
    """Median ms of one adapter training step per row, measured interleaved in this process."""
    import torch

    from moe_sys.adapters.inject import inject
    from moe_sys.config import load_config
    from moe_sys.config.adapters import AdaptersConfig
    from moe_sys.models.transformer import TransformerLM, lm_loss

    cfg = load_config(os.path.join(REPO, "configs/tiny.yaml"), ["moe.enabled=false", "parallel.ep_size=1"])
    steps = {}
    for name, modules in ROWS.items():
        torch.manual_seed(0)
        model = TransformerLM(cfg.model, cfg.moe, num_domains=len(DOMAINS))
        inject(model, AdaptersConfig.model_validate({"modules": modules}), DOMAINS)
        steps[name] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3))
    tokens, domains, ones = torch.randint(0, 256, (8, 128)), torch.arange(8) % len(DOMAINS), torch.ones(8, 128)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (model, optimizer) in steps.items():
            start = time.perf_counter()
            for _ in range(iters):
                out = model(tokens, domains)
                loss = lm_loss(out.logits_BSV, tokens, ones) + sum(v for r in out.routings for v in r.losses.values())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            times[name].append((time.perf_counter() - start) / iters)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/modular_study")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--base-steps", type=int, default=150)
    parser.add_argument("--seeds", default="42,43", help="adapter seeds (train.seed), comma-separated")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    base_dir = os.path.join(out, "base")
    rows = {"frozen base, no adapter": [summarize(base_dir, train(base_dir, [f"train.steps={args.base_steps}"]))]}
    for seed in args.seeds.split(","):
        for i, (name, modules) in enumerate(ROWS.items()):
            run_dir = os.path.join(out, f"row{i}" + ("" if seed == "42" else f"-seed{seed}"))
            sets = [f"train.init_from={base_dir}", f"train.steps={args.steps}", f"train.seed={seed}",
                    f"adapters.modules={json.dumps(modules)}"]
            rows.setdefault(name, []).append(summarize(run_dir, train(run_dir, sets)))
    table = render(rows, step_times(), args)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    print(table)


def render(rows: dict, step_ms: dict, args) -> str:
    head = "| row | val loss | " + " | ".join(DOMAINS) + " | trainable params | step (ms) |"
    lines = [head, "|" + "---|" * (len(DOMAINS) + 4)]
    for name, runs in rows.items():
        val = [r["val"] for r in runs]
        spread = f" ± {(max(val) - min(val)) / 2:.3f}" if len(runs) > 1 else ""
        per_domain = [f"{statistics.mean(r[d] for r in runs):.3f}" for d in DOMAINS]
        cells = [f"{statistics.mean(val):.3f}{spread}", *per_domain,
                 f"{runs[0]['trainable']:,}", f"{step_ms[name]:.0f}" if name in step_ms else "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\n(base: {args.base_steps} steps; each row: {args.steps} steps per seed, "
                                f"seeds {args.seeds})\n")


if __name__ == "__main__":
    main()
