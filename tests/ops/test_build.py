"""The JIT build's fallbacks and the impl switch: no compiler -> reference with one log line,
``kernel`` raises a clear error, ``describe()`` says what runs and why."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_sys import ops
from moe_sys.ops import build

REPO = Path(__file__).resolve().parents[2]

NO_COMPILER_SCRIPT = """
import logging, torch
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
from moe_sys import ops
ids_TK = torch.tensor([[0, 1], [1, -1]])
index = ops.build_index(ids_TK, 2)
y_TD = ops.unpermute(ops.permute(torch.ones(2, 4), index.dest_row_TK, index.num_rows), index.dest_row_TK)
assert y_TD.tolist() == [[2.0] * 4, [1.0] * 4]
ops.permute(torch.ones(2, 4), index.dest_row_TK, index.num_rows)
from moe_sys.ops.grouped_mm import grouped_mm
assert grouped_mm(torch.ones(3, 4), torch.ones(2, 4, 5), [1, 2]).tolist() == [[4.0] * 5] * 3
print(ops.describe())
ops.set_impl("kernel")
try:
    ops.build_index(ids_TK, 2)
except RuntimeError as exc:
    print("RAISED", exc)
"""


def test_no_compiler_falls_back_to_reference(tmp_path):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-c++"),
               PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", NO_COMPILER_SCRIPT], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("compiled kernels unavailable (no C++ compiler") == 1, proc.stderr
    assert proc.stderr.count("ops.impl=auto on cpu: reference") == 1, proc.stderr
    assert "compiled extension: unavailable (no C++ compiler" in proc.stdout
    assert "grouped_mm: cpu -> loop" in proc.stdout
    assert "RAISED ops.impl='kernel' but the compiled moe_sys op for cpu is missing: no C++ compiler" in proc.stdout


def test_describe_reports_the_choice(kernels):
    text = ops.describe()
    assert "ops.impl = auto" in text and "cpu: kernel" in text and "grouped_mm: cpu -> kernel" in text
    assert build.load().library in text


def test_kernel_impl_without_cuda_kernels_raises(kernels):
    if "cuda" in build.load().devices:
        pytest.skip("this build has CUDA kernels")
    import torch

    ops.set_impl("kernel")
    try:
        with pytest.raises(RuntimeError, match="compiled moe_sys op for meta is missing"):
            ops.build_index(torch.zeros(2, 1, dtype=torch.long, device="meta"), 2)
    finally:
        ops.set_impl("auto")


def test_csrc_is_found_from_this_checkout():
    assert build.csrc_dir() == REPO / "csrc"


def test_set_impl_rejects_unknown_names():
    with pytest.raises(ValueError, match="ops.impl must be one of"):
        ops.set_impl("triton")


def test_builds_run_the_environments_own_ninja(monkeypatch):
    """A system ninja earlier on PATH loses to this environment's: the two cannot read each other's
    build logs, so alternating between them rebuilds every extension (ours and DeepSpeed's)."""
    bin_dir = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(bin_dir, "ninja")):
        pytest.skip("this environment has no ninja of its own (the package depends on the ninja wheel)")
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", bin_dir, "/bin"]))
    build.prefer_environment_tools()
    assert os.environ["PATH"].split(os.pathsep) == [bin_dir, "/usr/bin", "/bin"]
    build.prefer_environment_tools()  # already first: unchanged
    assert os.environ["PATH"].split(os.pathsep) == [bin_dir, "/usr/bin", "/bin"]
