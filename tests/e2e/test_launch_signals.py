"""Stopping on a signal: ranks agree on a signal only one of them received, a checkpoint killed halfway
leaves `latest` on the previous complete one, SIGUSR1 under SLURM requeues the job, and SIGTERM to
`moe-sys train` reaches the ranks, which stop at a checkpoint.

DeepSpeed's engine is replaced by one that writes a file per rank (or dies halfway); the atomicity
under test is ours: the temporary tag, the barrier, the rename, `latest` last."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_sys.train import checkpoint, signals
from tests.e2e.conftest import REPO, TINY, read_metrics


class FakeEngine:
    """Writes what DeepSpeed would, one file per rank; ``die_after_first_file`` stops a save halfway."""

    def __init__(self, die_after_first_file=False):
        self.die = die_after_first_file

    def save_checkpoint(self, root, tag, client_state, save_latest):
        assert save_latest is False  # ``latest`` is ours to write, after the rename
        rank = dist.get_rank()
        torch.save(client_state, os.path.join(root, tag, f"mp_rank_{rank:02d}_model_states.pt"))
        if self.die:
            raise KeyboardInterrupt("killed while writing")
        torch.save({}, os.path.join(root, tag, f"zero_pp_rank_{rank}_optim_states.pt"))

    def train_batch_size(self):
        return 8

    def load_checkpoint(self, root, tag, load_optimizer_states=True):
        return os.path.join(root, tag), torch.load(os.path.join(root, tag, "mp_rank_00_model_states.pt"))


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_save_killed_halfway_keeps_the_previous_checkpoint(one_rank, tmp_path):
    run = str(tmp_path / "run")
    checkpoint.save(FakeEngine(), run, 4, {"data": 4}, keep=2)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(FakeEngine(die_after_first_file=True), run, 8, {"data": 8}, keep=2)
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text() == "step_00000004"
    assert sorted(os.listdir(root)) == ["latest", "step_00000004", "tmp-step_00000008"]
    assert checkpoint.load(FakeEngine(), run)["data"] == 4  # --resume takes the complete one

    checkpoint.save(FakeEngine(), run, 8, {"data": 8}, keep=1)  # the same step again, then pruning
    assert sorted(os.listdir(root)) == ["latest", "step_00000008"]
    assert sorted(os.listdir(root / "step_00000008")) == [
        "manifest.json", "mp_rank_00_model_states.pt", "rng_rank00000.safetensors", "zero_pp_rank_0_optim_states.pt"]


def _rank_entry(rank, store, fn, args, queue):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    queue.put((rank, fn(rank, *args)))
    dist.destroy_process_group()


def _on_two_ranks(fn, store, *args):
    """fn(rank, *args) on 2 spawned gloo ranks (lighter than tests/distributed/spawn.py: no DeepSpeed)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_entry, args=(rank, store, fn, args, queue)) for rank in (0, 1)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)  # a rank that died raises queue.Empty here
    for p in procs:
        p.join()
        assert p.exitcode == 0
    return [results[0], results[1]]


def _signal_on_rank_1_then_save(rank, run):
    stop = signals.StopSignals()
    try:
        first = stop.agreed(torch.device("cpu"))
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # only this rank hears it, as with `kill -USR1 PID`
        second = stop.agreed(torch.device("cpu"))
        if rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # a SIGTERM anywhere overrides: stop, no requeue
        third = stop.agreed(torch.device("cpu"))
    finally:
        stop.restore()
    checkpoint.save(FakeEngine(), run, 3, {"data": rank}, keep=0)
    return first, second, third, signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_ranks_agree_on_a_signal_one_received_and_both_write(tmp_path):
    run = str(tmp_path / "run")
    results = _on_two_ranks(_signal_on_rank_1_then_save, str(tmp_path / "store"), run)
    assert results == [(None, signal.SIGUSR1, signal.SIGTERM, True)] * 2
    tag = tmp_path / "run" / "checkpoints" / "step_00000003"
    assert sorted(os.listdir(tag)) == sorted(
        [f"mp_rank_0{r}_model_states.pt" for r in (0, 1)] + [f"rng_rank0000{r}.safetensors" for r in (0, 1)]
        + [f"zero_pp_rank_{r}_optim_states.pt" for r in (0, 1)] + ["manifest.json"])


@pytest.mark.parametrize("sig,more,requeued", [(signal.SIGUSR1, True, True), (signal.SIGTERM, True, False),
                                               (signal.SIGUSR1, False, False)])
def test_usr1_under_slurm_requeues(tmp_path, monkeypatch, sig, more, requeued):
    calls = tmp_path / "calls"
    fake = tmp_path / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    signals.after_stop(sig, 5, more_steps=more, env={"SLURM_JOB_ID": "42"})
    assert (calls.read_text() if calls.exists() else "") == ("requeue 42\n" if requeued else "")


def test_sigterm_to_moe_sys_train_stops_at_a_checkpoint(tmp_path, quick_sets):
    """`moe-sys train` passes SIGTERM to its ranks (the deepspeed launcher would kill them 30 s later)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "moe_sys.cli", "train", TINY, *quick_sets, "--set", f"logging.run_dir={run_dir}",
           "--set", "train.steps=200", "--set", "logging.log_every=1", "--set", "model.n_layers=2",
           "--set", "data.seq_len=64", "--set", "train.micro_batch_size=4"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    stopped = int(out.split("SIGTERM at step ")[1].split(":")[0])
    assert 3 <= stopped < 200
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, stopped + 1))
    port = out.split("rendezvous 127.0.0.1:")[1].split(")")[0]
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")  # DeepSpeed leaves them; we do not
