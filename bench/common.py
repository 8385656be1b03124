"""Timing, memory and report helpers shared by the benchmarks.

Timing: each point is the median of repeated runs, with the contenders interleaved run by run so that
load from other processes on a shared machine hits all of them alike; ratios are medians of per-round
ratios. Memory: peak resident bytes
above a baseline, read from the kernel (VmHWM after a reset), which counts every allocation, including
those made inside compiled ops that Python-side tracking would miss.
"""
from __future__ import annotations

import ctypes
import datetime
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def set_malloc(mode: str) -> None:
    """glibc policy for large blocks, which decides whether a fresh output costs page faults.

    ``warm``: freed memory is kept and reused, as a caching allocator would, so timings measure data
    movement rather than the kernel zeroing fresh pages (which costs every out-of-place op, a plain
    clone included, 3-4x on this VM). ``exact``: every block over 128 KiB is its own mapping, returned on
    free, so resident memory tracks live tensors (used for peak-memory measurements).
    """
    libc = ctypes.CDLL("libc.so.6")
    if mode == "warm":
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    elif mode == "exact":
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    else:
        raise ValueError(f"unknown malloc mode {mode!r}")


def time_interleaved(fns: Dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> Dict[str, List[float]]:
    """Seconds per call of each function, one sample per round; each round calls every function once.
    On a GPU the device is drained before and after each call, so a sample is the call's whole device work."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            samples[name].append(time.perf_counter() - start)
    return samples


def synchronize() -> None:
    """Wait for queued GPU work (CUDA launches are asynchronous); nothing to wait for on the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of num/den: both ran back to back in each round, so a burst of load from
    another process mostly cancels out, unlike a ratio of two medians taken over different rounds."""
    return statistics.median(a / b for a, b in zip(num, den))


def _status_bytes(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) * 1024


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak resident bytes fn adds above what is resident when it starts (needs set_malloc('exact'))."""
    fn()  # first call pays one-off costs (lazy init, caches) that are not the op's memory
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current RSS
    base = _status_bytes("VmRSS")
    result = fn()
    peak = _status_bytes("VmHWM") - base
    del result
    return peak


def machine() -> str:
    cpu = "unknown CPU"
    info = Path("/proc/cpuinfo")
    if info.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", info.read_text(), re.M)
        cpu = match.group(1) if match else cpu
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"python {platform.python_version()}, load average {load:.1f} at the end")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats get 3 significant digits (whole numbers from 1000 up)."""
    def cell(value):
        if not isinstance(value, float):
            return str(value)
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, module: str, body: str) -> None:
    """Replace the text between ``<!-- bench:NAME:begin -->`` and its end marker in docs/benchmarks.md
    (appending the section if absent), stamped with the command that produced it."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    command = " ".join(["python -m", module, *sys.argv[1:]])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = f"{begin}\nGenerated by `{command}` on {stamp}; {machine()}.\n\n{body.strip()}\n{end}"
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOCS.write_text(text)
