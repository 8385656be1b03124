"""End to end: the tiny config trains across 2 EP ranks, logs every metric, and resumes exactly."""
import os

from tests.e2e.conftest import TINY, read_metrics, run_cli

METRIC_KEYS = {"step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "tokens_per_s", "expert_load",
               "dropped_fraction"}


def test_tiny_config_loss_falls_and_metrics_complete(tmp_path, quick_sets):
    run_dir = tmp_path / "run"
    proc = run_cli("train", TINY, *quick_sets, "--set", f"logging.run_dir={run_dir}", "--set", "train.steps=60",
                   "--set", "train.eval_every=30", "--set", "logging.log_every=1", "--set", "logging.tensorboard=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launcher: deepspeed, 2 ranks" in proc.stderr
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 61))
    for r in records:
        assert METRIC_KEYS <= r.keys(), METRIC_KEYS - r.keys()
        assert len(r["expert_load"]) == 4 and all(len(layer) == 8 for layer in r["expert_load"])
        assert abs(sum(r["expert_load"][0]) - 1.0) < 1e-4
    first, last = records[0]["lm_loss"], sum(r["lm_loss"] for r in records[-5:]) / 5
    assert last < first - 1.5, (first, last)  # bytes start near ln(256)=5.5; 60 steps reach ~3
    assert records[-1]["val_loss"] < records[29]["val_loss"]
    assert os.listdir(run_dir / "tensorboard")
    assert (run_dir / "config.yaml").read_text().startswith("model:")
    ckpt = run_dir / "checkpoints" / "step_00000060"
    assert (ckpt / "layer_3_expert_7_mp_rank_00_model_states.pt").exists()  # expert-sharded files


def test_resume_is_bit_exact_at_ep2(tmp_path, quick_sets):
    common = [*quick_sets, "--set", "train.steps=8", "--set", "train.eval_every=100", "--set",
              "logging.log_every=1", "--set", "checkpoint.every=0"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_cli("train", TINY, *common, "--set", f"logging.run_dir={straight}").returncode == 0
    proc = run_cli("train", TINY, *common, "--set", f"logging.run_dir={stopped}", "--set", "train.stop_after=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(stopped)] == [1, 2, 3, 4]
    proc = run_cli("train", TINY, *common, "--set", f"logging.run_dir={stopped}", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_metrics(straight), read_metrics(stopped)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for key in ("loss", "lm_loss", "aux_loss", "z_loss", "lr", "expert_load"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])


def test_resume_without_checkpoint_fails_clearly(tmp_path, quick_sets):
    proc = run_cli("train", TINY, *quick_sets, "--set", f"logging.run_dir={tmp_path / 'empty'}", "--resume")
    assert proc.returncode != 0
    assert "no checkpoint in" in proc.stderr
