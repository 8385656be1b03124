"""Python face of the dispatch/combine ops: one call site, implementation chosen by ``ops.impl``.

``reference`` is pure PyTorch (moe_sys.ops.reference); ``kernel`` is the compiled extension from
csrc/ (built on first use by moe_sys.ops.build); ``auto`` takes the kernel when it is built for the
tensor's device, else the reference, and logs that choice once per device type.
"""
from __future__ import annotations

import logging

import torch

from moe_sys.ops import build, reference
from moe_sys.ops.grouped_mm import grouped_mm, grouped_mm_backend
from moe_sys.ops.reference import RoutingIndex

log = logging.getLogger(__name__)

IMPLS = ("auto", "reference", "kernel")
_impl = "auto"
_auto_logged: set[str] = set()


def set_impl(impl: str) -> None:
    """Select the implementation for all later calls (from the config's ``ops.impl``)."""
    global _impl
    if impl not in IMPLS:
        raise ValueError(f"ops.impl must be one of {IMPLS}, got {impl!r}")
    _impl = impl


def get_impl() -> str:
    return _impl


def kernel_active(device: torch.device) -> bool:
    """Whether calls on this device run the compiled ops; builds the extension on the first non-reference call."""
    if _impl == "reference":
        return False
    device = device.type
    why_not = build.load().why_not(device)
    if _impl == "kernel":
        if why_not is not None:
            raise RuntimeError(f"ops.impl='kernel' but the compiled moe_sys op for {device} is missing: {why_not}")
        return True
    if device not in _auto_logged:
        _auto_logged.add(device)
        log.info("ops.impl=auto on %s: %s", device, "compiled kernel" if why_not is None else f"reference ({why_not})")
    return why_not is None


def build_index(expert_ids_TK, num_experts, capacity=None) -> RoutingIndex:
    """See reference.build_index. The dropless layout's R needs counts on the host (one sync)."""
    if not kernel_active(expert_ids_TK.device):
        return reference.build_index(expert_ids_TK, num_experts, capacity)
    dest_row_TK, counts_E = torch.ops.moe_sys.build_index(expert_ids_TK, num_experts, capacity)
    num_rows = num_experts * capacity if capacity is not None else int(counts_E.sum())
    return RoutingIndex(dest_row_TK, counts_E, num_rows)


def permute(x_TD, dest_row_TK, num_rows):
    """See reference.permute; differentiable with respect to x_TD."""
    if not kernel_active(x_TD.device):
        return reference.permute(x_TD, dest_row_TK, num_rows)
    return torch.ops.moe_sys.permute(x_TD, dest_row_TK, num_rows)


def unpermute(y_RD, dest_row_TK, weights_TK=None):
    """See reference.unpermute; differentiable with respect to y_RD and weights_TK."""
    if not kernel_active(y_RD.device):
        return reference.unpermute(y_RD, dest_row_TK, weights_TK)
    return torch.ops.moe_sys.unpermute(y_RD, dest_row_TK, weights_TK)


def describe() -> str:
    """What runs and why, for ``moe-sys doctor``; builds the extension if it is not built yet."""
    status = build.load()
    lines = [f"ops.impl = {_impl}"]
    if status.library is None:
        lines.append(f"compiled extension: unavailable ({status.reason})")
    else:
        lines.append(f"compiled extension: {status.library}")
    for device in ("cpu", "cuda"):
        lines.append(f"  {device}: {_choice(status.why_not(device))}")
    lines.append(f"grouped_mm: cpu -> {grouped_mm_backend(torch.device('cpu'), torch.float32, 8, 8)}; "
                 f"cuda -> {_cuda_grouped_mm_summary()}")
    return "\n".join(lines)


def _choice(why_not) -> str:
    if _impl == "reference":
        return "reference (ops.impl=reference)"
    if why_not is None:
        return "kernel"
    if _impl == "kernel":
        return f"error: ops.impl=kernel but no compiled op ({why_not})"
    return f"reference ({why_not})"


def _cuda_grouped_mm_summary() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    return grouped_mm_backend(torch.device("cuda"), torch.bfloat16, 8, 8) + " (bf16, dims multiple of 8)"


__all__ = ["RoutingIndex", "build_index", "permute", "unpermute", "grouped_mm", "set_impl", "get_impl",
           "kernel_active", "describe", "IMPLS"]
