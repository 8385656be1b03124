"""Launcher detection and the env:// variables derived for srun and mpirun."""
import pytest

from moe_sys.parallel import launch_env
from moe_sys.parallel.launch_env import LaunchEnv, detect, torch_env


def test_torch_launchers():
    assert detect({"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}) == \
        LaunchEnv("torchrun", 3, 1, 8)
    assert detect({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "CROSS_RANK": "0"}) == \
        LaunchEnv("deepspeed", 1, 1, 2)
    assert detect({"RANK": "0", "WORLD_SIZE": "4"}) == LaunchEnv("env", 0, 0, 4)
    assert detect({}) == LaunchEnv("none", 0, 0, 1)


def test_srun_step_but_not_the_batch_script():
    batch = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "vm"}
    assert detect(batch).launcher == "none"  # the batch shell is not rank 0 of the job's tasks
    step = {**batch, "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "2"}
    assert detect(step) == LaunchEnv("slurm", 1, 1, 2)


def test_mpirun_and_mpiexec_inside_a_job_versus_srun_of_an_mpi_program(monkeypatch):
    monkeypatch.setattr(launch_env, "_from_mpi", lambda: LaunchEnv("mpi", 1, 0, 8))
    step = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "2"}  # one daemon per node
    assert detect({**step, "OMPI_COMM_WORLD_SIZE": "8"}).launcher == "mpi"  # Open MPI's mpirun in sbatch
    assert detect({**step, "PMI_SIZE": "8", "PMI_RANK": "5"}).launcher == "mpi"  # Hydra's mpiexec in sbatch
    assert detect({**step, "PMI_SIZE": "2"}) == LaunchEnv("slurm", 0, 0, 2)  # srun --mpi=pmi2
    assert detect({**step, "PMIX_RANK": "0"}) == LaunchEnv("slurm", 0, 0, 2)  # srun --mpi=pmix
    assert detect({"PMIX_RANK": "1"}).launcher == "mpi"  # mpiexec outside SLURM


def test_slurm_rendezvous_from_nodelist_and_job_id():
    env = {"SLURM_JOB_NODELIST": "gpu[07-09,12],cpu1", "SLURM_JOB_ID": "123456"}
    assert torch_env(LaunchEnv("slurm", 5, 1, 16), env) == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "MASTER_ADDR": "gpu07", "MASTER_PORT": "13456"}
    # What train.sbatch exported (scontrol's reading of the nodelist) wins.
    assert "MASTER_ADDR" not in torch_env(LaunchEnv("slurm", 0, 0, 2), {**env, "MASTER_ADDR": "gpu07"})


@pytest.mark.parametrize("nodelist,first", [("vm", "vm"), ("node[01-04,07],gpu5", "node01"), ("a-[3,5]", "a-3")])
def test_first_host(nodelist, first):
    assert launch_env._first_host(nodelist) == first


def test_mpi_rendezvous_is_skipped_when_set(monkeypatch):
    monkeypatch.setattr(launch_env, "_mpi_rendezvous", lambda: ("host0", "1234"))
    assert torch_env(LaunchEnv("mpi", 1, 0, 2), {})["MASTER_ADDR"] == "host0"
    assert "MASTER_PORT" not in torch_env(LaunchEnv("mpi", 1, 0, 2), {"MASTER_ADDR": "h", "MASTER_PORT": "1"})
