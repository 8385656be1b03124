"""`moe-sys tasks group` and the affinity heatmaps of `moe-sys plot` on a hand-made multitask run: the
known best groups, one valid config per group, one-line refusals of bad input; the affinity record's
matrices reach TensorBoard as scalars."""
import json

import numpy as np
import pytest

from moe_sys import cli
from moe_sys.config import dump_config, load_config
from moe_sys.train.metrics import _flatten

TASKS = ["S", "D", "N", "E"]
SETS = ["model.arch=vit", "model.vit.in_channels=1", "task.type=multitask", "task.multitask.tasks=[S,D,N,E]",
        "task.multitask.weights={S: 2.0, N: 0.5}", "logging.run_dir=runs/mt"]


def affinity_entry(z_NN, count=3):
    c_NN = np.corrcoef(np.random.default_rng(0).normal(size=(4, 9)))
    return {"tasks": TASKS, "lr": 1e-3, "lookahead": z_NN.tolist(), "cosine": c_NN.tolist(),
            "lookahead_mean": z_NN.tolist(), "cosine_mean": c_NN.tolist(),
            "measurements": {"lookahead": count, "cosine": count}}


def make_run(tmp_path, entry=True, cfg_sets=SETS):
    """S and D help each other, so do N and E; across the pairs they hurt (asymmetric on purpose)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config(None, cfg_sets)))
    z_NN = np.array([[0.0, 0.3, -0.1, -0.2], [0.2, 0.0, -0.3, -0.1], [-0.2, -0.1, 0.0, 0.4], [-0.1, -0.2, 0.1, 0.0]])
    records = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9, **({"affinity": affinity_entry(z_NN)} if entry else {})}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_group_picks_the_known_pairs_and_writes_a_config_per_group(tmp_path, capsys):
    run = make_run(tmp_path)
    assert cli.main(["tasks", "group", str(run), "--groups", "2", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "group 1: S, D  (serves S, D)" in printed and "group 2: N, E  (serves N, E)" in printed
    for g, members in ((1, ["S", "D"]), (2, ["N", "E"])):
        cfg = load_config(str(tmp_path / "out" / f"group_{g}.yaml"))
        assert cfg.task.multitask.tasks == members and cfg.logging.run_dir == f"runs/mt-group{g}"
        assert set(cfg.task.multitask.weights) <= set(members)  # other tasks' entries dropped
    assert cli.main(["tasks", "group", str(run), "--groups", "1"]) == 0  # default --out: RUN_DIR/groups
    assert (run / "groups" / "group_1.yaml").exists() and not (run / "groups" / "group_2.yaml").exists()


@pytest.mark.parametrize("case", ["no-affinity", "k-zero", "k-too-big", "not-a-dir", "lm-run"])
def test_group_refuses_bad_input_in_one_line(tmp_path, capsys, case):
    run = make_run(tmp_path, entry=case != "no-affinity",
                   cfg_sets=["logging.run_dir=runs/lm"] if case == "lm-run" else SETS)
    target = str(run / "metrics.jsonl") if case == "not-a-dir" else str(run)
    k = {"k-zero": "0", "k-too-big": "5"}.get(case, "2")
    assert cli.main(["tasks", "group", target, "--groups", k]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    needle = {"no-affinity": "metrics.jsonl: no lookahead affinity", "k-zero": "--groups 0", "k-too-big": "--groups 5",
              "not-a-dir": "not a run directory", "lm-run": "task.type is lm"}[case]
    assert needle in err, err


def test_plot_draws_the_affinity_heatmaps(tmp_path, capsys):
    run = make_run(tmp_path)
    assert cli.main(["plot", str(run)]) == 0
    assert (run / "plots" / "affinity.png").stat().st_size > 0
    assert str(run / "plots" / "affinity.png") in capsys.readouterr().out


def test_affinity_record_reaches_tensorboard_as_scalars():
    flat = _flatten({"step": 2, "affinity": affinity_entry(np.eye(4))})
    assert flat["affinity/lookahead_mean/2/2"] == 1.0 and flat["affinity/measurements/lookahead"] == 3.0
    assert not any(key.startswith("affinity/tasks") for key in flat)  # task names are not scalars
