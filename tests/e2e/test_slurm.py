"""A real single-node SLURM cluster (slurmctld + slurmd + munged on localhost, configured under a tmp
dir): sbatch a 2-task training job, preempt one with SIGUSR1 and check that it checkpointed, was
requeued and resumed to the same loss curve, and run a sweep as a job array.

The cluster is installed with apt-get (Debian's slurm-wlm and munge) if its programs are missing;
the tests are skipped, saying why, only where that is impossible.
"""
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time

import pytest
import yaml

from tests.e2e.conftest import REPO, TINY, read_metrics

PROGRAMS = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "mungekey")
SMALL = ["--set", "model.n_layers=2", "--set", "data.seq_len=64", "--set", "train.micro_batch_size=4",
         "--set", "logging.progress_bar=false", "--set", "logging.tensorboard=false"]
# Long enough that a signal sent after step 3 lands well before the end.
PREEMPT_RUN = [*SMALL, "--set", "train.steps=60", "--set", "train.eval_every=20", "--set", "logging.log_every=1",
               "--set", "checkpoint.every=0"]


def _install_reason():
    """None once the SLURM and munge programs exist, else why they cannot."""
    if all(shutil.which(p) for p in PROGRAMS):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed, and installing them needs root and apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    proc = _apt(install, env)
    if proc.returncode != 0:  # a fresh machine may have no package lists yet
        _apt(["apt-get", "update", "-q"], env)
        proc = _apt(install, env)
    if proc.returncode != 0 or not all(shutil.which(p) for p in PROGRAMS):
        return f"apt-get could not install slurm-wlm and munge: {proc.stderr.strip()[-500:]}"
    return None


def _apt(cmd, env):
    return subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)


def _logged_steps(run_dir):
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=moesys{port}
# Job ids (and so the jobs' rendezvous ports) unlike those of a test session running beside this one
FirstJobId={first_job}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={port}
SlurmdPort={dport}
SlurmUser=root
SlurmdUser=root
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.socket,cred_expire=5
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Schedule every second (a requeued job otherwise waits for the next 30-60 s cycle)
SchedulerParameters=sched_interval=1,bf_interval=1
# A starved machine (a loaded CI box) must not look like a failed node: SLURM would requeue the job
MessageTimeout=60
SlurmdTimeout=3600
# CPUs below are what the jobs may use, even where the machine has fewer
SlurmdParameters=config_overrides
ReturnToService=2
# The node is "localhost" (slurmd -N): jobs use its name as their rendezvous address
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    def __init__(self, root):
        self.dir = str(root)
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf,
                    "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
        self.daemons = []

    def start(self):
        os.chmod(self.dir, 0o755)  # munge clients must reach the socket
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(self.dir, sub))
        key = os.path.join(self.dir, "munge.key")
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        d = self.dir
        # In the foreground (-F/-D), as our children: stopped and reaped by us at the end.
        self._daemon(["munged", "-F", "--force", f"--socket={d}/munge.socket", f"--key-file={key}",
                      f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"])
        self._until(lambda: os.path.exists(f"{d}/munge.socket"), "munged did not start")
        with open(self.conf, "w") as f:
            f.write(SLURM_CONF.format(host=socket.gethostname().split(".")[0], port=_free_port(), dport=_free_port(),
                                      dir=d, cpus=max(2, os.cpu_count() or 1), first_job=random.randrange(1, 10**6)))
        self._daemon(["slurmctld", "-D", "-f", self.conf])
        self._daemon(["slurmd", "-D", "-N", "localhost", "-f", self.conf])
        self._until(lambda: self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip() == "idle",
                    "the SLURM node never became idle")

    def _daemon(self, cmd):
        log = open(os.path.join(self.dir, f"{cmd[0]}.out"), "w")
        self.daemons.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL))

    def _until(self, ready, message, timeout=60):
        deadline = time.time() + timeout
        while not ready():
            if time.time() > deadline or any(p.poll() is not None for p in self.daemons):
                raise RuntimeError(f"{message}:\n{self.logs()}")
            time.sleep(0.2)

    def stop(self):
        self.run("scancel", "--full", "--user=root", check=False)
        for daemon in reversed(self.daemons):  # slurmd, slurmctld, munged
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        self._kill_steps()

    def _kill_steps(self):
        """slurmstepd outlives slurmd by design; end those of this cluster's jobs (and their tasks), found
        by the sockets they keep in this cluster's spool dir."""
        import psutil  # a DeepSpeed dependency

        spool = os.path.join(self.dir, "spool")
        jobs = {name.split("_", 1)[1].split(".")[0] for name in os.listdir(spool) if name.startswith("localhost_")}
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if cmdline.startswith("slurmstepd: [") and cmdline[len("slurmstepd: ["):].split(".")[0] in jobs:
                for p in [*proc.children(recursive=True), proc]:
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        pass

    def run(self, *cmd, check=True):
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, cwd=REPO)

    def sbatch(self, *args):
        return self.run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]

    def job(self, job_id):
        """scontrol's fields of a job (kept MinJobAge=300 s after it ends)."""
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(self, job_id, timeout=600):
        deadline = time.time() + timeout
        while self.job(job_id).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            if time.time() > deadline:
                self.run("scancel", job_id, check=False)
                raise TimeoutError(f"job {job_id} did not end in {timeout} s:\n{self.logs()}")
            time.sleep(0.5)
        return self.job(job_id)

    def logs(self):
        out = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log", "slurmctld.out", "slurmd.out", "munged.out"):
            path = os.path.join(self.dir, name)
            if os.path.exists(path):
                out.append(f"--- {name}\n" + open(path).read()[-2000:])
        return "\n".join(out)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _install_reason()
    if reason:
        pytest.skip(reason)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def cache_sets(tmp_path_factory):
    return ["--set", f"data.cache_dir={tmp_path_factory.getbasetemp() / 'moe_sys_cache'}"]


@pytest.fixture(scope="module")
def straight_run(cluster, cache_sets, tmp_path_factory):
    """The uninterrupted reference: a 2-task sbatch job of train.sbatch."""
    run_dir = tmp_path_factory.mktemp("straight")
    out = run_dir / "slurm.out"
    job = cluster.sbatch("--ntasks=2", f"--output={out}", "launch/slurm/train.sbatch", TINY, *cache_sets,
                         *PREEMPT_RUN, "--set", f"logging.run_dir={run_dir}")
    info = cluster.wait(job)
    return run_dir, out.read_text(), info


def test_sbatch_two_tasks_trains(straight_run):
    run_dir, log, info = straight_run
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "launcher: slurm, 2 ranks" in log
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 61))
    assert records[-1]["lm_loss"] < records[0]["lm_loss"] - 1.0
    assert [r["step"] for r in records if "val_loss" in r] == [20, 40, 60]


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_curve(cluster, cache_sets, straight_run, tmp_path):
    run_dir, out = tmp_path / "preempted", tmp_path / "slurm.out"
    job = cluster.sbatch("--ntasks=2", f"--output={out}", "launch/slurm/train.sbatch", TINY, *cache_sets,
                         *PREEMPT_RUN, "--set", f"logging.run_dir={run_dir}")
    deadline = time.time() + 300
    while _logged_steps(run_dir) < 3:
        assert time.time() < deadline and cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), out.read_text()
        time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", job)
    info = cluster.wait(job)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]

    stopped = int(log.split("SIGUSR1 at step ")[1].split(":")[0])
    assert 3 <= stopped < 60, log[-3000:]
    assert f"requeued SLURM job {job}; it resumes from step {stopped}" in log
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000060"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [f"step_{stopped:08d}", "step_00000060"]
    # Complete: the preemption checkpoint holds the same files as the one written at the end.
    assert sorted(os.listdir(ckpts / f"step_{stopped:08d}")) == sorted(os.listdir(ckpts / "step_00000060"))

    straight = read_metrics(straight_run[0])
    resumed = read_metrics(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, 61))
    for a, b in zip(straight, resumed):
        for key in ("loss", "lm_loss", "aux_loss", "z_loss", "lr", "expert_load", "val_loss"):
            assert a.get(key) == b.get(key), (a["step"], key)


def test_sweep_as_job_array(cluster, cache_sets, tmp_path):
    spec = tmp_path / "array.yaml"
    sets = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in [*SMALL, *cache_sets][1::2])}
    sets.update({"train.steps": 4, "parallel.procs": 1, "parallel.ep_size": 1, "checkpoint.save_final": False})
    spec.write_text(json.dumps({"base": TINY, "out_dir": str(tmp_path / "sweep"), "set": sets,
                                "grid": {"moe.top_k": [1, 2]}}))
    proc = subprocess.run([sys.executable, "-m", "moe_sys.cli", "sweep", str(spec), "--slurm"], cwd=REPO,
                          env=cluster.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    array_id, report_id = proc.stdout.split()
    info = cluster.wait(report_id)
    assert info["JobState"] == "COMPLETED", cluster.logs()
    results = (tmp_path / "sweep" / "results.csv").read_text().splitlines()
    assert [line.split(",")[:2] for line in results[1:]] == [["top_k-1", "finished"], ["top_k-2", "finished"]]
    for name in ("top_k-1", "top_k-2"):
        assert "launcher: slurm, 1 ranks" in (tmp_path / "sweep" / "points" / name / "train.log").read_text()
