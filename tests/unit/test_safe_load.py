"""Nothing moe-sys loads can run code; RNG states round-trip without pickles; the run-directory rules.

Every load path gets a file whose unpickling would create a marker file: the marker never appears and
the refusal names the file. (Resume's model, expert, optimizer and RNG files: tests/e2e/test_checkpoint_damage.py.)
"""
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from moe_sys import safe_load
from moe_sys.safe_load import UnsafeFileError
from tests.e2e.conftest import REPO, TINY


class _Marker:
    """Unpickling calls open(path, "w"): the file appearing means the pickle ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_marker_pickle(path, marker, fmt="torch"):
    payload = {"module": {"w": torch.zeros(2)}, "payload": _Marker(marker)}
    if fmt == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_load_torch_refuses_a_pickle_that_runs_code(tmp_path, fmt):
    path, marker = tmp_path / "evil.pt", tmp_path / "marker"
    write_marker_pickle(path, marker, fmt)
    with pytest.raises(UnsafeFileError, match=f"{path}: "):
        safe_load.load_torch(str(path))
    with pytest.raises(UnsafeFileError, match=str(path)):
        safe_load.check_torch(str(path))
    assert not marker.exists()
    torch.save({"module": {"w": torch.ones(3)}, "step": 4}, path)  # plain tensors and containers load
    assert safe_load.load_torch(str(path))["module"]["w"].tolist() == [1.0, 1.0, 1.0]


def test_deepspeed_checkpoint_engine_loads_through_the_safe_loader(tmp_path):
    """The patch point every DeepSpeed model / expert / optimizer load goes through."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    safe_load.make_engine_loads_safe(engine)
    path, marker = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", tmp_path / "marker"
    write_marker_pickle(path, marker)
    with pytest.raises(UnsafeFileError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt: refused"):
        engine.checkpoint_engine.load(str(path), map_location="cpu")
    assert not marker.exists()


def test_init_from_refuses_a_checkpoint_that_runs_code(tmp_path):
    from moe_sys.weights import io
    from tests.unit.test_adapters import tiny_lm

    marker = tmp_path / "marker"
    write_marker_pickle(tmp_path / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(UnsafeFileError, match="mp_rank_00_model_states.pt: refused to load"):
        io.load_model_weights(tiny_lm(), str(tmp_path))  # what train.init_from calls
    assert not marker.exists()


def test_adapters_load_from_refuses_a_file_that_is_not_safetensors(tmp_path):
    from moe_sys.adapters import inject, io
    from tests.unit.test_adapters import DOMAINS, add, tiny_lm

    model = tiny_lm()
    add(model, {"type": "lora", "name": "a", "targets": ["layers.*.attn.qkv"], "rank": 2})
    io.save_adapters(model, str(tmp_path / "adapters"))
    marker = tmp_path / "marker"
    write_marker_pickle(tmp_path / "adapters" / io.ADAPTER_FILE, marker)
    with pytest.raises(UnsafeFileError, match="adapters.safetensors: not a readable safetensors file"):
        inject.attach(tiny_lm(), str(tmp_path / "adapters"), DOMAINS)  # what adapters.load_from calls
    assert not marker.exists()


@pytest.mark.parametrize("method", ["average", "upcycle"])
def test_merge_inputs_that_run_code_are_refused(tmp_path, method):
    marker, model_dir = tmp_path / "marker", tmp_path / "model"
    model_dir.mkdir()
    write_marker_pickle(model_dir / "mp_rank_00_model_states.pt", marker)
    args = (["average", str(model_dir), str(model_dir)] if method == "average"
            else ["upcycle", "--base", str(model_dir), "--config", TINY])
    proc = subprocess.run([sys.executable, "-m", "moe_sys.cli", "merge", *args, "--out", str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "mp_rank_00_model_states.pt: refused to load: it would run code" in proc.stderr
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_states_round_trip_as_safetensors(tmp_path):
    from moe_sys.train import checkpoint

    torch.manual_seed(5), np.random.seed(6), random.seed(7)
    np.random.randn()  # numpy's cached gaussian is part of its state
    path = tmp_path / "rng_rank00000.safetensors"
    checkpoint._save_rng(str(path))
    expected = _draws()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    checkpoint._load_rng(str(tmp_path), 0)
    assert _draws() == expected
    legacy = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(legacy, tmp_path / "rng_rank00001.pt")  # what older checkpoints hold: still loads
    expected = _draws()
    checkpoint._load_rng(str(tmp_path), 1)
    assert _draws() == expected


def test_run_dir_rules(tmp_path):
    from moe_sys.train.run_dir import RunDirError, prepare

    run = tmp_path / "run"
    assert prepare(str(run), resume=False, overwrite=False) is None  # nothing there yet
    run.mkdir()
    (run / "config.yaml").write_text("x")  # what a sweep writes before training: not a used run
    assert prepare(str(run), resume=False, overwrite=False) is None
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match="already holds a run \\(metrics.jsonl\\).*--resume.*--overwrite"):
        prepare(str(run), resume=False, overwrite=False)
    assert prepare(str(run), resume=True, overwrite=False) is None
    aside = prepare(str(run), resume=False, overwrite=True)
    assert not run.exists() and sorted(os.listdir(aside)) == ["config.yaml", "metrics.jsonl"]
    assert os.path.basename(aside).startswith("run.old-")
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match="is a file"):
        prepare(str(tmp_path / "file"), resume=False, overwrite=False)


def test_prune_goes_by_step_number_and_keeps_what_latest_names(tmp_path):
    from moe_sys.train import checkpoint

    root = tmp_path / "checkpoints"
    for step in (5, 10, 20, 100000000):
        (root / f"step_{step:08d}").mkdir(parents=True)
    checkpoint._prune(str(tmp_path), 2, "step_00000005")
    assert sorted(os.listdir(root)) == ["step_00000005", "step_00000020", "step_100000000"]


def test_a_fresh_metrics_writer_starts_empty(tmp_path):
    from moe_sys.train.metrics import MetricsWriter

    (tmp_path / "metrics.jsonl").write_text('{"step": 9}\n')
    MetricsWriter(str(tmp_path), tensorboard=False).write({"step": 1})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
