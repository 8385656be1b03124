"""What the machine has and whether our code runs on it: one subcommand per stage of bench/gpu/run.sh.

``device``: versions, the GPU, and the two ceilings every GPU figure is read against (METHOD.md): the
device-to-device copy bandwidth (bytes read + bytes written) and the bf16 matrix-product rate, both
measured here on random data. ``build``: the JIT build of csrc/ (moe_sys.ops.build). ``op-tests``:
pytest on tests/ops, outcomes counted per device. Each writes its result as JSON to ``--json``, and
exits 1 after writing it when the result holds an ``error`` (the driver records the stage as failed).

Run from the repository root: ``python -m bench.gpu.probe {device,build,op-tests} --json FILE [--dry-run]``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):  # `python bench/gpu/probe.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from bench import common

PACKAGES = ("deepspeed", "megatron.core", "pydantic", "triton")


def _versions() -> Dict[str, str]:
    found = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for name in PACKAGES:
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as exc:  # report every missing package, not just the first
            found[name] = f"not importable: {exc}"
    return found


def _gpu() -> Dict[str, object]:
    if not torch.cuda.is_available():
        return {"name": None, "note": "no CUDA device: ceilings measured on the CPU"}
    props = torch.cuda.get_device_properties(0)
    smi = shutil.which("nvidia-smi")
    query = ["--query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total", "--format=csv,noheader"]
    line = subprocess.run([smi, *query], capture_output=True, text=True).stdout.strip() if smi else None
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "memory_GiB": round(props.total_memory / 2**30, 1), "nvidia_smi": line}


def ceilings(device: str, copy_bytes: int, n: int, dtype: torch.dtype, reps: int) -> Dict[str, float]:
    """Median copy bandwidth over a ``copy_bytes`` buffer and matrix rate of an n x n x n product."""
    src = torch.randint(0, 255, (copy_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    secs = common.time_interleaved({"copy": lambda: dst.copy_(src), "matmul": lambda: a @ b}, reps, warmup=3)
    copy_s, mm_s = common.median(secs["copy"]), common.median(secs["matmul"])
    return {"copy_GBps": 2 * copy_bytes / copy_s / 1e9, "copy_bytes": copy_bytes,
            "matmul_TFLOPs": 2 * n**3 / mm_s / 1e12, "matmul_n": n, "matmul_dtype": str(dtype).removeprefix("torch.")}


def device_stage(dry: bool) -> Dict[str, object]:
    on_gpu = torch.cuda.is_available() and not dry
    sizes = dict(copy_bytes=2**30, n=8192, dtype=torch.bfloat16, reps=20) if on_gpu else \
        dict(copy_bytes=2**22, n=256, dtype=torch.bfloat16, reps=3)
    return {"versions": _versions(), "gpu": _gpu(), **ceilings("cuda" if on_gpu else "cpu", **sizes)}


def build_stage(dry: bool) -> Dict[str, object]:
    """An error when the kernels this run needs did not build: CUDA on a GPU, the CPU ones in a dry run."""
    from moe_sys.ops import build

    start = time.perf_counter()
    status = build.load()
    want = "cpu" if dry or not torch.cuda.is_available() else "cuda"
    result = {"devices": list(status.devices), "library": status.library, "reason": status.reason,
              "seconds": time.perf_counter() - start, "needed": want}
    if want not in status.devices:
        result["error"] = f"no {want} kernels: {status.why_not(want)}"
    return result


class _Outcomes:
    """pytest plugin: passed/failed/skipped per device (the test id's cpu/cuda parameter), and the failures."""

    def __init__(self):
        self.counts: Dict[str, Dict[str, int]] = {}
        self.failures: List[str] = []

    def pytest_runtest_logreport(self, report):
        if report.when != "call" and not (report.failed or report.skipped):
            return
        device = "cuda" if "cuda" in report.nodeid else "cpu"
        counts = self.counts.setdefault(device, {"passed": 0, "failed": 0, "skipped": 0})
        counts[report.outcome] += 1
        if report.failed:
            self.failures.append(report.nodeid)


DRY_OP_TESTS = ["tests/ops/test_dispatch_ops.py", "-k", "matches_reference and cpu and not 257"]
XDIST_WORKERS = 4  # on the 16-core GPU machine: the nvcc compile tests and CPU cases run side by side


def op_tests_stage(dry: bool) -> Dict[str, object]:
    """All of tests/ops (a handful of CPU cases in a dry run); an error if any failed or none ran on CUDA."""
    import pytest

    plugin = _Outcomes()
    args = DRY_OP_TESTS if dry else ["tests/ops"]
    if not dry and importlib.util.find_spec("xdist") is not None:
        args = [*args, "-n", str(XDIST_WORKERS)]
    code = pytest.main(["-q", "-p", "no:cacheprovider", *args], plugins=[plugin])
    result = {"args": args, "exit_code": int(code), "counts": plugin.counts, "failures": plugin.failures[:50]}
    need = "cpu" if dry else "cuda"
    if code != 0 or not plugin.counts.get(need, {}).get("passed"):
        result["error"] = f"op tests: exit code {int(code)}, {need} outcomes {plugin.counts.get(need)}"
    return result


STAGES = {"device": device_stage, "build": build_stage, "op-tests": op_tests_stage}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--json", required=True, help="write the result here")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    args = parser.parse_args(argv)
    result = STAGES[args.stage](args.dry_run)
    print(json.dumps(result, indent=1))
    Path(args.json).write_text(json.dumps(result, indent=1))
    if "error" in result:
        sys.exit(result["error"])


if __name__ == "__main__":
    main()
