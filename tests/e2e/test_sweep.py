"""`moe-sys sweep` on a 2x2 grid of the tiny config: three points train, the fourth cannot (top_k > experts)
and is reported while the others finish; a rerun trains nothing."""
import csv
import json
import os
import time

import yaml

from tests.e2e.conftest import TINY, run_cli

GRID = {"moe.num_experts": [4, 8], "moe.top_k": [2, 6]}  # (4 experts, top-6) does not validate
NAMES = ["num_experts-4__top_k-2", "num_experts-4__top_k-6", "num_experts-8__top_k-2", "num_experts-8__top_k-6"]


def _results(out_dir):
    with open(out_dir / "results.csv") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def test_grid_runs_reports_failure_and_rerun_does_nothing(tmp_path, quick_sets):
    out_dir = tmp_path / "sweep"
    # --set values are YAML ("false" is a bool); a sweep file's `set` holds the values themselves
    fixed = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in quick_sets[1::2])}
    # one rank per point: what is under test is the sweep (its points, report, plots, rerun), not EP
    fixed.update({"train.steps": 4, "train.eval_every": 2, "logging.log_every": 1, "model.n_layers": 2,
                  "data.seq_len": 64, "train.micro_batch_size": 4, "checkpoint.save_final": False,
                  "parallel.procs": 1, "parallel.ep_size": 1})
    spec = tmp_path / "grid.yaml"
    spec.write_text(json.dumps({"base": TINY, "out_dir": str(out_dir), "set": fixed, "grid": GRID}))

    proc = run_cli("sweep", str(spec))
    assert proc.returncode == 1, proc.stderr[-3000:]  # not every point finished
    rows = _results(out_dir)
    assert list(rows) == NAMES
    bad = rows.pop("num_experts-4__top_k-6")
    assert bad["status"] == "failed" and bad["reason"] == "config error: moe.top_k: 6 exceeds moe.num_experts=4"
    for name, row in rows.items():
        assert row["status"] == "finished", (name, row, proc.stderr[-3000:])
        assert 0 < float(row["val_loss"]) < 6 and float(row["tokens_per_s"]) > 0 and float(row["load_imbalance"]) >= 0
    table = (out_dir / "results.md").read_text()
    assert "| num_experts-8__top_k-6 | finished | 8 | 6 |" in table and "top_k: 6 exceeds" in table
    assert (out_dir / "val_loss_vs_num_experts.png").stat().st_size > 10_000
    assert (out_dir / "tokens_per_s_vs_ep_size.png").exists()

    finished = [out_dir / "points" / name / "metrics.jsonl" for name in rows]
    before = [os.stat(p).st_mtime_ns for p in finished]
    start = time.perf_counter()
    proc = run_cli("sweep", str(spec))
    assert proc.returncode == 1
    assert time.perf_counter() - start < 15, "the rerun trained something"
    assert "4 points, 3 finished, 1 to run" in proc.stderr
    assert [os.stat(p).st_mtime_ns for p in finished] == before
    assert _results(out_dir) == {**rows, "num_experts-4__top_k-6": bad}
