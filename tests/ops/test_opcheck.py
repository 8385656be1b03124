"""torch.library.opcheck on each compiled op: schema, autograd registration, fake tensor, AOT dispatch."""
from __future__ import annotations

import pytest
import torch

from moe_sys.ops import reference
from tests.ops.conftest import DEVICES, randn, random_routing


def _cases(device, dtype):
    ids_TK = random_routing(13, 2, 6, device=device)
    for capacity in (None, 2):
        index = reference.build_index(ids_TK, 6, capacity)
        dest, R = index.dest_row_TK, index.num_rows
        x_TD = randn(13, 16, dtype=dtype, device=device, requires_grad=True)
        y_RD = randn(R, 16, dtype=dtype, seed=1, device=device, requires_grad=True)
        w_TK = torch.rand(13, 2, device=device, requires_grad=True)
        yield "build_index", (ids_TK, 6, capacity)
        yield "permute", (x_TD, dest, R)
        yield "permute", (x_TD, dest, R, w_TK)
        yield "unpermute", (y_RD, dest, None)
        yield "unpermute", (y_RD, dest, w_TK)
        yield "row_dot", (x_TD, y_RD, dest)
    if device == "cpu":  # grouped GEMM has a CPU kernel only (CUDA uses torch._grouped_mm)
        counts_E = torch.tensor([4, 0, 6, 3])
        x_RD = randn(13, 16, dtype=dtype, device=device, requires_grad=True)
        yield "grouped_mm", (x_RD, randn(4, 16, 8, dtype=dtype, seed=2, requires_grad=True), counts_E)
        yield "grouped_mm_wgrad", (x_RD, randn(13, 8, dtype=dtype, seed=3, requires_grad=True), counts_E)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(kernels, device, dtype):
    for name, args in _cases(device, dtype):
        torch.library.opcheck(getattr(kernels, name).default, args)


def test_torch_compile_traces_the_ops(kernels):
    """fullgraph=True: the fakes and autograd registrations let dynamo/AOT trace through permute and
    unpermute without a graph break, forward and backward."""
    index = reference.build_index(random_routing(21, 2, 6), 6, None)
    dest, R = index.dest_row_TK, index.num_rows

    def combine(x_TD, w_TK):
        return kernels.unpermute(kernels.permute(x_TD, dest, R) * 2.0, dest, w_TK)

    compiled = torch.compile(combine, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (combine, compiled):
        x_TD = randn(21, 8, requires_grad=True)
        w_TK = torch.linspace(0, 1, 42).view(21, 2).requires_grad_()
        y_TD = fn(x_TD, w_TK)
        results.append((y_TD, *torch.autograd.grad(y_TD.square().sum(), (x_TD, w_TK))))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)
