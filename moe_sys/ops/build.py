"""Just-in-time build of the csrc/ extension: compiled on first use, cached, CPU-only when CUDA is absent.

Why JIT rather than a setup.py extension: the package stays a pure-Python install (no compiler needed
to ``pip install``), and each machine compiles for its own torch and GPUs. The build lives under
``$TORCH_EXTENSIONS_DIR`` (torch's own knob) or ``~/.cache/moe_sys/torch_extensions``, one folder per
(python, torch, CUDA) combination; torch's ninja build only recompiles what changed and holds a file
lock, so concurrent ranks wait for one build instead of racing.

If the build is impossible (no compiler, no ninja, a compile error), ``load()`` says why in one log
line and the callers fall back to the pure-PyTorch reference.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

EXTENSION_NAME = "moe_sys_ops"


@dataclass(frozen=True)
class BuildStatus:
    """Outcome of ``load()``: which device types have compiled kernels, or why none do."""

    devices: tuple[str, ...] = ()
    library: Optional[str] = None
    reason: str = ""

    def why_not(self, device_type: str) -> Optional[str]:
        """None when a compiled kernel serves ``device_type``, else the reason it does not."""
        if device_type in self.devices:
            return None
        if self.library is None:
            return self.reason
        return f"no {device_type} kernels in this build" + (f": {self.reason}" if self.reason else "")


def csrc_dir() -> Optional[Path]:
    """The csrc/ folder: beside the package in a source checkout or editable install, or shipped inside it."""
    here = Path(__file__).resolve().parent  # moe_sys/ops
    for candidate in (here.parents[1] / "csrc", here.parent / "csrc"):
        if (candidate / "moe_ops.cpp").is_file():
            return candidate
    return None


def build_dir() -> Path:
    """Per-(python, torch, CUDA) build folder, so switching environments never mixes objects."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "moe_sys" / "torch_extensions"
    variant = f"py{platform.python_version()}_torch{torch.__version__}".replace("+", "_")
    return Path(root) / variant / EXTENSION_NAME


def _cuda_sources(src: Path) -> tuple[list[str], str]:
    """CUDA sources to add and, when there are none, the reason (reported by describe())."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return [], "torch is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return [], "no CUDA toolkit found (set CUDA_HOME)"
    cuda = src / "cuda"
    return sorted(str(p) for p in cuda.glob("*.cu")) + [str(cuda / "moe_ops_cuda.cpp")], ""


def _missing_tool() -> Optional[str]:
    """Checked before torch's build, whose own message for a missing compiler is a long warning."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    if shutil.which("ninja") is None:
        return "ninja is not on PATH (pip install ninja)"
    return None


def _failure_reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if "error" in line.lower()] or [str(exc).strip()]
    return f"build failed: {lines[0][:300]}"


@functools.lru_cache(maxsize=None)
def load() -> BuildStatus:
    """Compile (first call on a machine) and load the extension; never raises, the status says why."""
    src = csrc_dir()
    if src is None:
        return _unavailable("csrc/ sources not found next to the package (install from a source checkout)")
    missing = _missing_tool()
    if missing is not None:
        return _unavailable(missing)
    cuda_sources, cuda_note = _cuda_sources(src)
    sources = [str(src / "moe_ops.cpp")] + sorted(str(p) for p in (src / "cpu").glob("*.cpp")) + cuda_sources
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    log.info("moe_sys ops: building/loading the extension in %s (the first build takes a minute)", directory)
    try:
        from torch.utils import cpp_extension

        library = cpp_extension.load(
            EXTENSION_NAME,
            sources,
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
            build_directory=str(directory),
            with_cuda=bool(cuda_sources),
            is_python_module=False,
        )
    except Exception as exc:  # a build failure must leave the reference path working
        return _unavailable(_failure_reason(exc))
    from moe_sys.ops import registration

    registration.register()
    devices = ("cpu", "cuda") if cuda_sources else ("cpu",)
    return BuildStatus(devices=devices, library=str(library), reason=cuda_note)


def _unavailable(reason: str) -> BuildStatus:
    log.warning("moe_sys ops: compiled kernels unavailable (%s); using the pure-PyTorch reference", reason)
    return BuildStatus(reason=reason)
