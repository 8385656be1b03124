"""GPU validation in one call: every stage in its own process under its own timeout, then one JSON.

Stages (registry STAGES, run in this order): device (versions, copy bandwidth, bf16 matrix rate),
build (csrc/ JIT), op_tests (tests/ops), dispatch (bench.dispatch: dispatch + combine vs copy
bandwidth and megatron-core), moe_layer (bench.moe_layer: fwd + bwd vs DeepSpeed's MoE and the dense
floor), train (bench.gpu.train_mfu: tokens/s, MFU). A stage that fails, hangs or runs past its
timeout is recorded as such and the next one starts; each timeout is also capped by what is left of
the run's budget, so results.json is always written before the device call's own limit.

``--dry-run`` runs the same stages at tiny sizes on the CPU. bench/gpu/run.sh wraps this module
(carried wheels, environment); docs/benchmarks.md says how to start it on the GPU machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Stage:
    timeout_s: int  # on the GPU; dry runs use DRY_TIMEOUT_S
    argv: Callable[[bool, Path, Path], List[str]]  # (dry, result JSON, work dir) -> arguments after `python -m`
    note_dry: str = ""  # what the dry run leaves out, said in the log and the JSON


def _dry(dry: bool) -> List[str]:
    return ["--dry-run"] if dry else []


def _probe(name: str):
    return lambda dry, result, work: ["bench.gpu.probe", name, "--json", str(result), *_dry(dry)]


def _dispatch(dry: bool, result: Path, work: Path) -> List[str]:
    sizes = ["--device", "cpu", "--tokens", "256", "--d-model", "64", "--reps", "2"] if dry else \
        ["--device", "cuda", "--tokens", "32768", "--d-model", "2048", "--reps", "20"]
    return ["bench.dispatch", *sizes, "--dtypes", "bf16", "--no-memory", "--no-write", "--json", str(result)]


def _moe_layer(dry: bool, result: Path, work: Path) -> List[str]:
    sizes = ["--device", "cpu", "--d-model", "32", "--tokens", "64", "--experts", "8", "--reps", "1"] if dry else \
        ["--device", "cuda", "--d-model", "1024", "--tokens", "16384", "--experts", "8", "64", "256", "--reps", "5"]
    return ["bench.moe_layer", *sizes, "--dtype", "bf16", "--top-k", "2", "--no-write", "--json", str(result)]


def _train(dry: bool, result: Path, work: Path) -> List[str]:
    return ["bench.gpu.train_mfu", "--json", str(result), "--run-dir", str(work / "train_run"), *_dry(dry)]


STAGES: Dict[str, Stage] = {
    "device": Stage(60, _probe("device"), "ceilings measured on the CPU at tiny sizes; no nvidia-smi"),
    "build": Stage(240, _probe("build"), "CPU kernels only: the CUDA kernels need a CUDA torch and nvcc"),
    "op_tests": Stage(180, _probe("op-tests"), "a handful of CPU op tests; the CUDA cases need a GPU"),
    "dispatch": Stage(90, _dispatch, "CPU, T=256, D=64: no GPU bandwidth figure"),
    "moe_layer": Stage(120, _moe_layer, "CPU, T=64, D=32, E=8 only"),
    "train": Stage(180, _train, "a 2-layer d_model=64 model for 4 steps on the CPU: MFU against the CPU's rate"),
}
DRY_TIMEOUT_S = 240  # a cold CI cache builds our ops and DeepSpeed's CPU comm op inside the stages
RESERVE_S = 5  # kept back from the budget for writing the results


def run_stage(name: str, stage: Stage, dry: bool, work: Path, timeout_s: float, log) -> Dict:
    """Run one stage as `python -m ...` in its own process group (so a timeout kills its children too)."""
    result_file = work / f"{name}.json"
    argv = [sys.executable, "-m", *stage.argv(dry, result_file, work)]
    log.write(f"\n===== stage {name}: {' '.join(argv)} (timeout {timeout_s:.0f} s)\n")
    if dry and stage.note_dry:
        log.write(f"dry run: {stage.note_dry}\n")
    log.flush()
    start, started_at = time.perf_counter(), time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code: Optional[int] = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
        _remove_build_locks(started_at, log)
    record = {"status": "ok" if code == 0 else ("timeout" if code is None else "failed"),
              "returncode": code, "seconds": round(time.perf_counter() - start, 1), "timeout_s": round(timeout_s)}
    if dry and stage.note_dry:
        record["dry_run_note"] = stage.note_dry
    if result_file.exists():
        record["result"] = json.loads(result_file.read_text())
    log.write(f"===== stage {name}: {record['status']} in {record['seconds']} s\n")
    log.flush()
    return record


def _remove_build_locks(since: float, log) -> None:
    """A stage killed while torch's extension build held its file lock (ours, or DeepSpeed's CPU comm op)
    leaves the lock behind, and every later build of that extension would wait on it forever."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    roots = [Path(env)] if env else [Path.home() / ".cache" / "torch_extensions",
                                     Path.home() / ".cache" / "moe_sys" / "torch_extensions"]
    for root in roots:
        for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
            if lock.stat().st_mtime >= since:
                lock.unlink()
                log.write(f"removed the extension build lock {lock} left by the killed stage\n")


def _result(stages: Dict, name: str):
    return stages.get(name, {}).get("result")


def summarize(stages: Dict) -> Dict:
    """The figures the issue asks for, and whether each acceptance bar is met (None: not measured)."""
    device, ops, dispatch = _result(stages, "device"), _result(stages, "op_tests"), _result(stages, "dispatch")
    layer, train = _result(stages, "moe_layer"), _result(stages, "train")
    out: Dict = {}
    if ops:
        out["op_tests"] = ops["counts"]
    if dispatch:
        copy = device["copy_GBps"] if device else None
        out["dispatch"] = [{"E": r["E"], "K": r["K"], "ours_GBps": r["ours (kernel) GB/s"],
                            "of_copy_ceiling": r["ours (kernel) GB/s"] / copy if copy else None,
                            "of_copy_same_size": r["ours (kernel) / copy_"],
                            "speedup_vs_megatron": r["ours (kernel) speedup vs megatron-core"]}
                           for r in dispatch["dropless"]]
    if layer:
        out["moe_layer"] = [{"E": r["E"], "F": r["F"], "K": r["K"], "deepspeed_over_ours": r["deepspeed MoE / moe_sys"],
                             "ours_over_dense_floor": r["moe_sys / dense floor"]} for r in layer]
    if train:
        out["train"] = {k: train[k] for k in ("tokens_per_s", "flops_per_token", "params_total", "params_active",
                                              "model_TFLOPs", "flops_formula")}
        out["train"]["mfu"] = train["model_TFLOPs"] / device["matmul_TFLOPs"] if device else None
    out["acceptance"] = {
        "op_tests_pass_on_cuda": (stages.get("op_tests", {}).get("status") == "ok" and bool(ops)
                                  and ops["counts"].get("cuda", {}).get("passed", 0) > 0) if ops else None,
        "dispatch_at_least_60pct_of_copy": all((d["of_copy_ceiling"] or 0) >= 0.6 for d in out["dispatch"])
        if "dispatch" in out else None,
        "moe_layer_faster_than_deepspeed_at_every_E": all(r["deepspeed_over_ours"] > 1 for r in out["moe_layer"])
        if "moe_layer" in out else None,
        "mfu_reported": out.get("train", {}).get("mfu") is not None,
    }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same stages at tiny sizes on the CPU")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default $OUT, else a temp dir)")
    parser.add_argument("--budget-s", type=float, default=420, help="wall-clock budget of all stages (default 420)")
    parser.add_argument("--only", help="comma-separated stages to run (default all: " + ",".join(STAGES) + ")")
    args = parser.parse_args(argv)
    only = args.only.split(",") if args.only else list(STAGES)
    unknown = [name for name in only if name not in STAGES]
    if unknown:
        parser.error(f"--only: unknown stage(s) {unknown}; known: {list(STAGES)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="moe_sys_gpu_"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="moe_sys_gpu_work_"))
    deadline = time.perf_counter() + args.budget_s
    report = {"mode": "dry-run" if args.dry_run else "gpu", "command": " ".join(sys.argv),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "stages": {}}
    with open(out / "run.log", "a") as log:
        for name in only:
            stage = STAGES[name]
            left = deadline - time.perf_counter() - RESERVE_S
            timeout = min(DRY_TIMEOUT_S if args.dry_run else stage.timeout_s, left)
            if timeout < 10:
                report["stages"][name] = {"status": "skipped", "reason": "the run's budget is spent"}
                continue
            print(f"stage {name} ...", flush=True)
            report["stages"][name] = run_stage(name, stage, args.dry_run, work, timeout, log)
            print(f"stage {name}: {report['stages'][name]['status']} ({report['stages'][name]['seconds']} s)",
                  flush=True)
    try:
        report["summary"] = summarize(report["stages"])
    except Exception as exc:  # a stage's JSON without the expected keys must not lose the stages' records
        report["summary"] = {"error": f"{type(exc).__name__}: {exc}"}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {out / 'results.json'} and {out / 'run.log'}")
    return 0 if all(s["status"] == "ok" for s in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
