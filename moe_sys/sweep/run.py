"""Run a sweep's unfinished points: here one after another, or as a SLURM job array.

Each point is its own ``moe-sys train`` process, so a point that fails (or a config that does not
validate) is recorded and the next one starts; the results are written whatever happened.
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import List

from moe_sys.config import ConfigError
from moe_sys.sweep import points as pts
from moe_sys.sweep.report import write_report
from moe_sys.sweep.spec import Sweep

log = logging.getLogger("moe_sys")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARRAY_SCRIPT = os.path.join(REPO, "launch", "slurm", "sweep.sbatch")


def run_local(sweep: Sweep) -> int:
    """Run every unfinished point, then report; 0 when all points are finished."""
    states = pts.plan(sweep)
    todo = [p for p in states if p.state != pts.FINISHED]
    log.info("sweep %s: %d points, %d finished, %d to run", sweep.out_dir, len(states), len(states) - len(todo), len(todo))
    for i, p in enumerate(todo, 1):
        pts.reset(p)
        if p.cfg is not None:
            _train(p, f"[{i}/{len(todo)}]")
        else:
            log.warning("[%d/%d] %s: failed: %s", i, len(todo), p.point.name, p.reason)
    return report(sweep)


def _train(p: pts.PointState, counter: str) -> None:
    log.info("%s %s: training (log: %s)", counter, p.point.name, os.path.join(p.run_dir, pts.LOG))
    start = time.perf_counter()
    with open(os.path.join(p.run_dir, pts.LOG), "w") as out:
        code = subprocess.call(train_command(p.config_path), stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    if code == 0:
        log.info("%s %s: done in %.0f s", counter, p.point.name, seconds)
    else:
        log.warning("%s %s: failed (exit code %d) after %.0f s: %s", counter, p.point.name, code, seconds,
                    pts.failure_reason(os.path.join(p.run_dir, pts.LOG)))


def train_command(config_path: str) -> List[str]:
    return [sys.executable, "-m", "moe_sys.cli", "train", config_path]


def submit_slurm(sweep: Sweep) -> int:
    """One array task per unfinished valid point, and a job that writes the report after them all."""
    if not os.path.exists(ARRAY_SCRIPT):
        raise RuntimeError(f"{ARRAY_SCRIPT} is missing: --slurm runs from a source checkout (launch/ is not installed)")
    states = pts.plan(sweep)
    todo = [p for p in states if p.state != pts.FINISHED and p.cfg is not None]
    tasks = _tasks(sweep, todo) if todo else []
    for p in states:
        if p.state != pts.FINISHED:
            pts.reset(p)
    if not todo:
        log.info("sweep %s: nothing to submit", sweep.out_dir)
        return report(sweep)
    array_file = os.path.join(sweep.out_dir, "array.txt")
    with open(array_file, "w") as f:
        f.writelines(os.path.abspath(p.config_path) + "\n" for p in todo)
    limit = f"%{sweep.spec.slurm.max_parallel}" if sweep.spec.slurm.max_parallel else ""
    logs = os.path.join(sweep.out_dir, "slurm")
    os.makedirs(logs, exist_ok=True)
    array_id = _sbatch([f"--array=0-{len(todo) - 1}{limit}", *tasks, f"--output={logs}/%A_%a.out",
                        *sweep.spec.slurm.args, ARRAY_SCRIPT, array_file])
    command = [sys.executable, "-m", "moe_sys.cli", "sweep", os.path.abspath(sweep.spec_path), "--report-only"]
    report_id = _sbatch([f"--dependency=afterany:{array_id}", "--ntasks=1", f"--output={logs}/report-%j.out",
                         f"--wrap={shlex.join(command)}"])
    log.info("submitted array job %s (%d points) and report job %s", array_id, len(todo), report_id)
    print(f"{array_id} {report_id}")
    return 0


def _tasks(sweep: Sweep, todo: List[pts.PointState]) -> List[str]:
    """``--ntasks=parallel.procs`` unless the sweep's sbatch options size the tasks themselves."""
    if any(a.startswith(("--ntasks", "-n")) for a in sweep.spec.slurm.args):
        return []
    procs = {p.cfg.parallel.procs for p in todo}
    if len(procs) > 1:
        raise ConfigError(f"{sweep.spec_path}: points differ in parallel.procs {sorted(procs)}; one array job "
                          "needs one task count (or set slurm.args: [--ntasks=N])")
    return [f"--ntasks={procs.pop()}"]


def _sbatch(args: List[str]) -> str:
    """sbatch with this Python's bin directory first on PATH, so the jobs run this moe-sys."""
    if shutil.which("sbatch") is None:
        raise RuntimeError("no sbatch here: --slurm submits from a SLURM login node")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    out = subprocess.run(["sbatch", "--parsable", *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def report(sweep: Sweep) -> int:
    """Write results.csv, results.md and the plots; 0 when every point is finished."""
    states = pts.plan(sweep)
    write_report(sweep, states)
    failed = [p for p in states if p.state != pts.FINISHED]
    for p in failed:
        log.warning("not finished: %s: %s", p.point.name, p.reason or p.state)
    log.info("sweep %s: %d/%d points finished; results in %s", sweep.out_dir, len(states) - len(failed),
             len(states), os.path.join(sweep.out_dir, "results.md"))
    return 1 if failed else 0
