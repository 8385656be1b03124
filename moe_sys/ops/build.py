"""Just-in-time build of the csrc/ extension: compiled on first use, cached, CPU-only when CUDA is absent.

Why JIT rather than a setup.py extension: the package stays a pure-Python install (no compiler needed
to ``pip install``), and each machine compiles for its own torch and GPUs. The build lives under
``$TORCH_EXTENSIONS_DIR`` (torch's own knob) or ``~/.cache/moe_sys/torch_extensions``, one folder per
(python, torch build, CPU vector ISA); torch's ninja build only recompiles what changed and holds a file
lock, so concurrent ranks wait for one build instead of racing.

If the build is impossible (no compiler, no ninja, a compile error), ``load()`` says why in one log
line and the callers fall back to the pure-PyTorch reference. csrc/README.md describes the layout.
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


# Vector ISA flags per torch CPU capability: the row loops then vectorise as wide as ATen's own kernels.
# torch.backends.cpu.get_cpu_capability() honours ATEN_CPU_CAPABILITY, so one knob lowers both.
_ISA_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
}


def cpu_capability() -> str:
    """The vector ISA the CPU kernels are compiled for (DEFAULT = the compiler's baseline)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "DEFAULT"
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _ISA_FLAGS else "DEFAULT"


def openmp_flags() -> list[str]:
    """-fopenmp when torch's intra-op backend is OpenMP: at::parallel_for is an inline header there, and
    compiled without -fopenmp it silently runs on one thread. The extension then resolves libgomp to
    the copy torch already loaded (same soname), so there is one OpenMP runtime in the process."""
    return ["-fopenmp"] if "parallel backend: OpenMP" in torch.__config__.parallel_info() else []


def build_dir() -> Path:
    """Per-(python, torch, CPU ISA) build folder: switching environments, or sharing a home directory
    between machines with different CPUs, never loads objects built for another one."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "moe_sys" / "torch_extensions"
    variant = f"py{platform.python_version()}_torch{torch.__version__}_{cpu_capability().lower()}".replace("+", "_")
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
    """Compile (first call on a machine) and load the extension; never raises, the status says why.

    With a CUDA torch the CUDA kernels are built too; if they fail to build, the CPU kernels are
    built alone so the CPU path still gets them.
    """
    src = csrc_dir()
    if src is None:
        return _unavailable("csrc/ sources not found next to the package (install from a source checkout)")
    missing = _missing_tool()
    if missing is not None:
        return _unavailable(missing)
    cpu_sources = [str(src / "moe_ops.cpp")] + sorted(str(p) for p in (src / "cpu").glob("*.cpp"))
    cuda_sources, cuda_note = _cuda_sources(src)
    if cuda_sources:
        try:
            return _compile(cpu_sources + cuda_sources, ("cpu", "cuda"), "")
        except Exception as exc:  # keep the CPU kernels even when nvcc or the CUDA headers fail
            cuda_note = f"the CUDA kernels failed to build: {_failure_reason(exc)}"
            log.warning("moe_sys ops: %s; building the CPU kernels alone", cuda_note)
    try:
        return _compile(cpu_sources, ("cpu",), cuda_note)
    except Exception as exc:  # a build failure must leave the reference path working
        return _unavailable(_failure_reason(exc))


def _compile(sources: list[str], devices: tuple[str, ...], reason: str) -> BuildStatus:
    from torch.utils import cpp_extension

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / f"{EXTENSION_NAME}.so").exists():
        log.info("moe_sys ops: compiling the extension into %s (first use: about a minute)", directory)
    library = cpp_extension.load(
        EXTENSION_NAME,
        sources,
        extra_cflags=["-O3", *_ISA_FLAGS.get(cpu_capability(), []), *openmp_flags()],
        extra_ldflags=openmp_flags(),
        extra_cuda_cflags=["-O3"],
        build_directory=str(directory),
        with_cuda="cuda" in devices,
        is_python_module=False,
    )
    from moe_sys.ops import registration

    registration.register()
    return BuildStatus(devices=devices, library=str(library), reason=reason)


def _unavailable(reason: str) -> BuildStatus:
    log.warning("moe_sys ops: compiled kernels unavailable (%s); using the pure-PyTorch reference", reason)
    return BuildStatus(reason=reason)
