"""The training runs of the study scripts (docs/*_study.py): `moe-sys train` in its own run directory,
skipped when it already finished, so a study resumes where it stopped. RUN/train.log keeps the run's
stderr; RUN/done marks a finished run and holds its wall seconds."""
from __future__ import annotations

import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(config: str, run_dir: str, sets: list) -> None:
    """`moe-sys train CONFIG --set ...` (the config's CPU ranks) into ``run_dir``; exits naming the run on failure."""
    if finished(run_dir):
        return
    os.makedirs(run_dir, exist_ok=True)
    args = [a for s in sets + [f"logging.run_dir={run_dir}"] for a in ("--set", s)]
    print(f"{time.strftime('%H:%M:%S')} train {os.path.basename(run_dir)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moe_sys.cli", "train", config, "--overwrite", *args], cwd=REPO,
                          capture_output=True, text=True)
    with open(os.path.join(run_dir, "train.log"), "w") as f:
        f.write(proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"{run_dir} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(run_dir, "done"), "w") as f:
        f.write(f"{time.perf_counter() - start:.1f}\n")


def finished(run_dir: str) -> bool:
    return os.path.exists(os.path.join(run_dir, "done"))


def wall_s(run_dir: str) -> float:
    with open(os.path.join(run_dir, "done")) as f:
        return float(f.read())
