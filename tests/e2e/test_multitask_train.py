"""End to end: a tiny multitask run (task-conditioned adapters, mixed batches, uncertainty weighting)
logs per-task losses and dense metrics, and a run resumed from its step-3 checkpoint redoes steps 4-6
with identical losses and evaluation."""
import shutil

import yaml

from tests.e2e.conftest import read_metrics, run_cli

TINY_MULTITASK = {
    "model": {"arch": "vit", "d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32,
              "vit": {"image_size": 32, "patch_size": 8, "in_channels": 1}},
    "moe": {"enabled": False},
    "adapters": {"modules": [
        {"type": "task_attention", "name": "taa", "targets": ["blocks.1.attn"], "max_tokens": 17},
        {"type": "task_norm", "name": "tsn", "targets": ["blocks.1.norm1", "blocks.1.norm2"]},
        {"type": "conditional_bottleneck", "name": "cb", "targets": ["blocks.1"]}]},
    "task": {"type": "multitask", "multitask": {
        "tasks": ["S", "D", "N", "E", "G"], "mode": "mixed", "weighting": "uncertainty", "domains": ["latin", "arrows"],
        "num_train": 20, "num_test": 6, "baseline": {"S/miou": 0.3, "D/rmse": 0.2, "N/mean_angle": 20.0,
                                                     "E/l1": 0.05, "G/acc": 0.5}}},
    "train": {"steps": 6, "micro_batch_size": 4, "lr": 1.0e-2, "warmup_steps": 1, "eval_every": 3},
    "parallel": {"procs": 2, "ep_size": 1},
    "checkpoint": {"every": 3, "keep": 2},
    "logging": {"log_every": 1},
}
TASKS = ("S", "D", "N", "E", "G")


def test_multitask_run_logs_tasks_and_resumes_exactly(tmp_path, quick_sets):
    config = tmp_path / "multitask.yaml"
    config.write_text(yaml.safe_dump(TINY_MULTITASK))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = run_cli("train", str(config), *quick_sets, "--set", f"logging.run_dir={straight}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(straight, resumed)
    proc = run_cli("train", str(config), *quick_sets, "--set", f"logging.run_dir={resumed}",
                   "--resume=step_00000003")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a[3:], b[3:]):
        assert all(ra[f"{t}_loss"] == rb[f"{t}_loss"] for t in TASKS) and ra["loss"] == rb["loss"], ra["step"]
    metrics = ["S/miou", "D/rmse", "D/abs_rel", "N/mean_angle", "E/l1", "G/acc", "delta_m"]
    assert all(a[5][k] == b[5][k] for k in metrics) and a[5]["log_var"] == b[5]["log_var"]
    assert a[5]["log_var"] != a[2]["log_var"] and "images_per_s" in a[5]
