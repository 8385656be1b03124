"""Damaged checkpoints: ONE tiny training run saves two checkpoints; copies of it are damaged in every
way the issue lists. Each kind either resumes from the previous intact checkpoint with a warning
naming the file, or (``--resume=strict``) is refused with one line naming it; nothing older changes."""
import hashlib
import os
import shutil

import pytest

from moe_sys.train import checkpoint, manifest
from moe_sys.train.manifest import CheckpointError
from tests.e2e.conftest import TINY, read_metrics, run_cli

STEP2, STEP4 = "step_00000002", "step_00000004"
SMALL = ["model.n_layers=2", "model.d_model=64", "model.d_ff=128", "model.max_seq_len=32", "data.seq_len=32",
         "train.micro_batch_size=4", "train.steps=4", "train.warmup_steps=2", "train.eval_every=100",
         "checkpoint.every=2", "checkpoint.keep=0", "logging.log_every=1", "logging.progress_bar=false",
         "logging.tensorboard=false"]


def _sets(run_dir, cache):
    return [item for s in SMALL + [f"logging.run_dir={run_dir}", f"data.cache_dir={cache}"] for item in ("--set", s)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("damage")
    run_dir = base / "run"
    proc = run_cli("train", TINY, *_sets(run_dir, base / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(run_dir / "checkpoints" / STEP4)) == sorted(os.listdir(run_dir / "checkpoints" / STEP2))
    return base, run_dir


@pytest.fixture
def copy(trained, tmp_path):
    """A fresh copy of the trained run directory to damage."""
    _, run_dir = trained
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def _sums(tag_dir):
    return {name: hashlib.sha256((tag_dir / name).read_bytes()).hexdigest() for name in sorted(os.listdir(tag_dir))}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


DAMAGE = {  # name -> (how, the file the message must name)
    "truncated model states": (lambda t: _truncate(t / "mp_rank_00_model_states.pt"), "mp_rank_00_model_states.pt"),
    "missing expert file": (lambda t: os.remove(t / "layer_1_expert_3_mp_rank_00_model_states.pt"),
                            "layer_1_expert_3_mp_rank_00_model_states.pt"),
    "changed optimizer bytes": (lambda t: _flip_byte(t / "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                                "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    "truncated rng state": (lambda t: _truncate(t / "rng_rank00001.safetensors"), "rng_rank00001.safetensors"),
    "damaged manifest": (lambda t: (t / "manifest.json").write_bytes(b"\x00\xff{garbage"), "manifest.json"),
}


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_or_is_refused(copy, kind):
    damage, named = DAMAGE[kind]
    damage(copy / "checkpoints" / STEP4)
    older = _sums(copy / "checkpoints" / STEP2)
    warnings = []
    assert checkpoint.choose(str(copy), "auto", warnings.append) == STEP2
    assert len(warnings) == 1 and named in warnings[0] and STEP4 in warnings[0], warnings
    with pytest.raises(CheckpointError, match=named):
        checkpoint.choose(str(copy), "strict")
    assert _sums(copy / "checkpoints" / STEP2) == older


@pytest.mark.parametrize("latest", [b"garbage\n", b"\x89PNG\x00\xff\xfe", b"", b"step_00000006"])
def test_bad_latest_takes_the_newest_intact_checkpoint(copy, latest):
    (copy / "checkpoints" / "latest").write_bytes(latest)
    warnings = []
    assert checkpoint.choose(str(copy), "auto", warnings.append) == STEP4
    assert len(warnings) == 1 and ("latest" in warnings[0] or "step_00000006" in warnings[0]), warnings
    with pytest.raises(CheckpointError, match="latest|step_00000006"):
        checkpoint.choose(str(copy), "strict")


def test_no_intact_checkpoint_is_refused(copy):
    for tag in (STEP2, STEP4):
        _truncate(copy / "checkpoints" / tag / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        checkpoint.choose(str(copy), "auto", lambda line: None)


def test_a_checkpoint_that_would_run_code_is_refused_before_loading(copy, tmp_path):
    """A crafted file with a matching manifest (someone else's checkpoint): refused, nothing runs."""
    from tests.unit.test_safe_load import write_marker_pickle

    marker, tag_dir = tmp_path / "marker", copy / "checkpoints" / STEP4
    for name, replaces in [("mp_rank_00_model_states.pt", None),  # model
                           ("layer_0_expert_0_mp_rank_00_model_states.pt", None),  # experts
                           ("zero_pp_rank_0_mp_rank_00_optim_states.pt", None),  # optimizer
                           ("rng_rank00000.pt", "rng_rank00000.safetensors")]:  # RNG, as older versions wrote it
        saved = {n: (tag_dir / n).read_bytes() for n in (name, replaces) if n and (tag_dir / n).exists()}
        if replaces:
            os.remove(tag_dir / replaces)
        write_marker_pickle(tag_dir / name, marker)
        manifest.write(str(tag_dir))
        with pytest.raises(CheckpointError, match=f"{name}: refused to load: it would run code"):
            checkpoint.choose(str(copy), "strict")
        for n in (name, replaces):
            if n and n not in saved:
                os.remove(tag_dir / n)
        for n, data in saved.items():
            (tag_dir / n).write_bytes(data)
    assert not marker.exists()


def test_resume_passes_over_a_damaged_checkpoint_and_strict_refuses(trained, copy):
    """Through the CLI: strict refuses with one line before any rank starts; the default resumes from the
    older checkpoint with a warning line and continues the metrics from there."""
    base, _ = trained
    _truncate(copy / "checkpoints" / STEP4 / "mp_rank_00_model_states.pt")
    older = _sums(copy / "checkpoints" / STEP2)
    proc = run_cli("train", TINY, *_sets(copy, base / "cache"), "--resume=strict")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "mp_rank_00_model_states.pt" in errors[0], proc.stderr[-2000:]
    assert "starting" not in proc.stderr  # no rank started

    proc = run_cli("train", TINY, *_sets(copy, base / "cache"), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"warning: checkpoint {STEP4} is damaged" in proc.stderr and "mp_rank_00_model_states.pt" in proc.stderr
    assert [r["step"] for r in read_metrics(copy)] == [1, 2, 3, 4]
    assert _sums(copy / "checkpoints" / STEP2) == older
    assert manifest.verify(str(copy / "checkpoints" / STEP4))  # saved again, whole this time


def test_a_used_run_dir_is_refused_without_resume(trained, copy):
    base, _ = trained
    before = (copy / "metrics.jsonl").read_text()
    proc = run_cli("train", TINY, *_sets(copy, base / "cache"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "already holds a run" in proc.stderr and "--overwrite" in proc.stderr
    assert (copy / "metrics.jsonl").read_text() == before
