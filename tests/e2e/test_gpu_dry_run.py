"""bench/gpu/run.sh --dry-run: every stage of the GPU validation runs at tiny sizes on the CPU and records
its status and figures, so a mistake in the script shows here rather than in scarce GPU time.

Costs about 45 s on 2 quiet cores once the compiled ops and DeepSpeed's CPU comm op are cached
(the rest of the suite builds both in the same TORCH_EXTENSIONS_DIR).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from bench.gpu.run import STAGES

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_runs_every_stage(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu/run.sh", "--dry-run", "--out", str(tmp_path), "--budget-s", "900"],
                          cwd=ROOT, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=1000)
    log = (tmp_path / "run.log").read_text()
    report = json.loads((tmp_path / "results.json").read_text())
    stages = report["stages"]
    assert report["mode"] == "dry-run" and list(stages) == list(STAGES)
    failed = {name: s["status"] for name, s in stages.items() if s["status"] != "ok"}
    assert not failed and proc.returncode == 0, f"{failed}\n{proc.stdout}\n{log[-4000:]}"
    for name, stage in stages.items():
        assert stage["dry_run_note"] in log, f"{name}: the log must say what the dry run leaves out"

    summary = report["summary"]
    assert summary["op_tests"]["cpu"]["passed"] > 0 and summary["op_tests"]["cpu"]["failed"] == 0
    assert {(row["E"], row["K"]) for row in summary["dispatch"]} == {(8, 2), (64, 8)}
    assert all(row["ours_GBps"] > 0 and row["speedup_vs_megatron"] > 0 for row in summary["dispatch"])
    assert [row["E"] for row in summary["moe_layer"]] == [8, 8]  # coarse and fine experts
    train = summary["train"]
    assert train["tokens_per_s"] > 0 and math.isfinite(train["mfu"]) and train["mfu"] > 0
    assert 0 < train["params_active"] < train["params_total"]  # top-2 of 8 experts: most are inactive
    assert stages["train"]["result"]["steps"] == 4
    assert set(summary["acceptance"]) == {"op_tests_pass_on_cuda", "dispatch_at_least_60pct_of_copy",
                                          "moe_layer_faster_than_deepspeed_at_every_E", "mfu_reported"}
    assert summary["acceptance"]["op_tests_pass_on_cuda"] is False  # a CPU run proves nothing about CUDA
