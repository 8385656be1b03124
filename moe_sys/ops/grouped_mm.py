"""Expert compute over expert-sorted rows: one GEMM per expert, as a single grouped GEMM where possible.

Legend: R routed rows, D input dim, F output dim, E experts.

Three backends, chosen per call by ``grouped_mm_backend``:

- ``torch._grouped_mm``: one kernel for all experts, no host sync. Used on CUDA sm90+ for bf16 with D
  and F multiples of 8, the case its kernels (and its torch.compile meta function) accept.
- ``kernel``: the compiled CPU op ``moe_sys::grouped_mm`` (csrc/cpu/grouped_mm.cpp): the same loop over
  slices in C++, each product written into its slice of one output, the weight gradient written into
  one [E, D, F] tensor, experts spread over threads when they are small. Used on CPU whenever the
  compiled ops are (``ops.impl`` auto/kernel). torch 2.13's CPU ``_grouped_mm`` runs but measured ~2x
  slower than a plain loop in fp32, and its meta function (what torch.compile traces) accepts bf16 only.
- ``loop``: one matmul per contiguous slice of rows in Python: everywhere else (CUDA before sm90 or in
  fp32, CPU with ``ops.impl=reference``).

All give ONE full-size weight gradient: the loop multiplies by ``w_EDF.unbind(0)`` slices, whose
backward stacks the per-expert gradients once. Indexing ``w_EDF[e]`` instead would make autograd
materialise a full [E, D, F] zero gradient per expert and add them up.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from moe_sys.ops import build

BACKENDS = ("torch._grouped_mm", "kernel", "loop")


def grouped_mm_backend(device: torch.device, dtype: torch.dtype, D: int, F: int) -> str:
    """Which backend ``grouped_mm`` uses for these operands (also printed by ``moe_sys.ops.describe``)."""
    from moe_sys import ops  # the package imports this module

    if device.type == "cpu" and ops.kernel_active(device):
        return "kernel"
    if (
        hasattr(torch, "_grouped_mm")
        and device.type == "cuda"
        and torch.cuda.get_device_capability(device) >= (9, 0)
        and dtype == torch.bfloat16
        and D % 8 == 0
        and F % 8 == 0
    ):
        return "torch._grouped_mm"
    return "loop"


def grouped_mm(x_RD: torch.Tensor, w_EDF: torch.Tensor, counts_E: Union[torch.Tensor, Sequence[int]],
               backend: Optional[str] = None) -> torch.Tensor:
    """y_RF[rows of expert e] = x_RD[rows of expert e] @ w_EDF[e].

    Args:
        x_RD: [R, D] rows sorted by expert: expert e owns the counts_E[e] rows after experts < e's.
            For the capacity layout pass counts_E = full((E,), C).
        w_EDF: [E, D, F] expert weights.
        counts_E: rows per expert, summing to R: an int tensor [E] or a list of E ints (the loop
            backend needs them on the host: a caller on GPU running several grouped_mm calls on one
            routing can sync them once by passing a list).
        backend: force one of BACKENDS (tests); None picks with grouped_mm_backend.
    Returns:
        [R, F] in x_RD's dtype.
    """
    E, D, F = w_EDF.shape
    backend = backend or grouped_mm_backend(x_RD.device, x_RD.dtype, D, F)
    if backend == "torch._grouped_mm":
        counts_E = torch.as_tensor(counts_E, device=x_RD.device)
        offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x_RD, w_EDF, offs=offsets_E))
    if backend == "kernel":
        why_not = build.load().why_not("cpu") if x_RD.device.type == "cpu" else "it has a CPU kernel only"
        if why_not is not None:
            raise RuntimeError(f"grouped_mm backend 'kernel' is unavailable on {x_RD.device.type}: {why_not}")
        return torch.ops.moe_sys.grouped_mm(x_RD, w_EDF, torch.as_tensor(counts_E, dtype=torch.int64, device="cpu"))
    if backend != "loop":
        raise ValueError(f"grouped_mm backend must be one of {BACKENDS}, got {backend!r}")
    sizes = counts_E.tolist() if isinstance(counts_E, torch.Tensor) else list(counts_E)  # a host sync on GPU
    slices = x_RD.split(sizes)
    if len(slices) != E:
        raise ValueError(f"counts_E has {len(slices)} entries, w_EDF has {E} experts")
    return torch.cat([x @ w for x, w in zip(slices, w_EDF.unbind(0))])


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: _grouped_mm's backward rejects the
    stride-0 gradients that e.g. ``y.sum().backward()`` produces."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()
