"""Sweep files: grid expansion and names, point states read from run directories, running with
failures (a stand-in for `moe-sys train` that is a real process but trains nothing), the report."""
import csv
import glob
import json
import os
import sys

import pytest

from moe_sys.config import ConfigError
from moe_sys.sweep import load_sweep, points, report, run
from moe_sys.sweep.spec import expand, overrides

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def _spec(tmp_path, grid, **extra):
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps({"base": TINY, "out_dir": str(tmp_path / "out"), "grid": grid, **extra}))
    return load_sweep(str(path))


def test_expand_order_and_stable_names():
    pts = expand({"moe.num_experts": [4, 8], "moe.router.type": ["topk", "expert_choice"]})
    assert [p.name for p in pts] == ["num_experts-4__type-topk", "num_experts-4__type-expert_choice",
                                     "num_experts-8__type-topk", "num_experts-8__type-expert_choice"]
    assert pts[1].values == {"moe.num_experts": 4, "moe.router.type": "expert_choice"}
    odd = expand({"train.lr": [0.001], "train.betas": [[0.9, 0.95]], "moe.capacity_factor": [None], "x.flag": [True]})
    assert odd[0].name == "lr-0.001__betas-0.9+0.95__capacity_factor-null__flag-true"


def test_clashing_labels_use_the_whole_key_and_names_must_differ():
    assert expand({"a.type": [1], "b.type": [2]})[0].name == "a.type-1__b.type-2"
    with pytest.raises(ConfigError, match="same point names"):
        expand({"data.seed": ["a b", "a_b"]})


def test_spec_errors_name_the_key(tmp_path):
    (tmp_path / "bad.yaml").write_text("base: x.yaml\ngrid: {moe.top_k: []}\n")
    with pytest.raises(ConfigError, match="grid.moe.top_k: needs at least one value"):
        load_sweep(str(tmp_path / "bad.yaml"))
    (tmp_path / "bad.yaml").write_text("base: x.yaml\ngird: {moe.top_k: [1]}\n")
    with pytest.raises(ConfigError, match="gird: unknown key; did you mean 'grid'"):
        load_sweep(str(tmp_path / "bad.yaml"))


def test_overrides_round_trip_values(tmp_path):
    sweep = _spec(tmp_path, {"train.lr": [0.0005], "data.domains": [[{"name": "code"}]]}, set={"train.steps": 7})
    state = points.plan(sweep)[0]
    assert state.cfg.train.lr == 0.0005 and state.cfg.train.steps == 7
    assert [d.name for d in state.cfg.data.domains] == ["code"]
    assert state.cfg.logging.run_dir == os.path.join(str(tmp_path / "out"), "points", state.point.name)
    assert overrides(state.point, {}, "r")[-1] == 'logging.run_dir="r"'


def _fake_train(monkeypatch, fail=()):
    """Replace `moe-sys train` by a process that writes the metrics a finished run leaves (or fails)."""
    calls = []

    def command(config_path):
        run_dir = os.path.dirname(config_path)
        calls.append(os.path.basename(run_dir))
        if os.path.basename(run_dir) in fail:
            return [sys.executable, "-c", "import sys; print('RuntimeError: boom'); sys.exit(3)"]
        import yaml

        cfg = yaml.safe_load(open(config_path))
        steps, experts = cfg["train"]["steps"], cfg["moe"]["num_experts"]
        record = {"loss": 3.0, "tokens_per_s": 100.0, "expert_load": [[1 / experts] * experts]}
        lines = [dict(record, step=s, val_loss=4.0 / experts) for s in range(1, steps + 1)]
        script = f"open({os.path.join(run_dir, 'metrics.jsonl')!r}, 'w').write({''.join(json.dumps(r) + chr(10) for r in lines)!r})"
        return [sys.executable, "-c", script]

    monkeypatch.setattr(run, "train_command", command)
    return calls


def test_failures_do_not_stop_others_and_reruns_skip_finished(tmp_path, monkeypatch):
    sweep = _spec(tmp_path, {"moe.num_experts": [2, 4], "moe.top_k": [1, 3]}, set={"train.steps": 3})
    calls = _fake_train(monkeypatch, fail={"num_experts-4__top_k-1"})
    assert run.run_local(sweep) == 1
    assert calls == ["num_experts-2__top_k-1", "num_experts-4__top_k-1", "num_experts-4__top_k-3"]
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    assert rows["num_experts-4__top_k-1"]["reason"] == "RuntimeError: boom"
    assert rows["num_experts-2__top_k-3"]["reason"] == "config error: moe.top_k: 3 exceeds moe.num_experts=2"
    assert rows["num_experts-4__top_k-3"]["status"] == "finished"
    assert float(rows["num_experts-4__top_k-3"]["val_loss"]) == 1.0
    assert float(rows["num_experts-4__top_k-3"]["load_imbalance"]) == 0.0

    calls = _fake_train(monkeypatch)  # the fault is gone
    assert run.run_local(sweep) == 1  # (2, 3) still does not validate
    assert calls == ["num_experts-4__top_k-1"]  # retried alone; finished points are skipped
    assert [s.state for s in points.plan(sweep)] == ["finished", "failed", "finished", "finished"]


def test_changed_config_runs_again(tmp_path, monkeypatch):
    sweep = _spec(tmp_path, {"moe.top_k": [1]}, set={"train.steps": 2})
    _fake_train(monkeypatch)
    assert run.run_local(sweep) == 0
    assert points.plan(sweep)[0].state == "finished"
    longer = _spec(tmp_path, {"moe.top_k": [1]}, set={"train.steps": 3})
    assert points.plan(longer)[0].state == "pending"


def test_report_tables_and_plots(tmp_path, monkeypatch):
    grid = {"moe.num_experts": [4, 8, 32], "parallel.ep_size": [1, 2], "moe.router.type": ["topk", "expert_choice"]}
    sweep = _spec(tmp_path, grid, set={"train.steps": 2, "moe.router.allow_noncausal": True})
    _fake_train(monkeypatch)
    assert run.run_local(sweep) == 0
    out = tmp_path / "out"
    table = (out / "results.md").read_text()
    assert table.count("| finished |") == 12 and "![val_loss_vs_num_experts.png]" in table
    for png in ("val_loss_vs_num_experts.png", "tokens_per_s_vs_ep_size.png", "load_imbalance_vs_type.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    assert report(sweep) == 0


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "sweeps", "*.yaml"))), ids=os.path.basename)
def test_example_sweeps_expand_to_valid_configs(path):
    sweep = load_sweep(path)
    states = points.plan(sweep)
    assert len(states) >= 4
    assert [s.reason for s in states if s.cfg is None] == []
