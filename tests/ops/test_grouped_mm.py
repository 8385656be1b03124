"""grouped_mm vs a plain per-expert loop, forward and gradients, on every backend this machine runs.

Legend: R rows sorted by expert, D input dim, F output dim, E experts.
"""
from __future__ import annotations

import pytest
import torch

from moe_sys import ops
from moe_sys.ops import build
from moe_sys.ops.grouped_mm import grouped_mm, grouped_mm_backend
from tests.ops.conftest import randn
from tests import tolerance
from tests.tolerance import assert_close

COUNTS = [[3, 0, 5, 1], [0, 0, 0, 0], [0, 7, 0, 0], [1, 1, 1, 1]]  # incl. experts with no rows


def _per_expert(x_RD, w_EDF, counts):
    """The oracle: each expert's rows times its own weight, one matmul at a time."""
    out, start = [], 0
    for e, n in enumerate(counts):
        out.append(x_RD[start:start + n] @ w_EDF[e])
        start += n
    return torch.cat(out)


def _backends(dtype):
    # CPU torch._grouped_mm runs in this torch, so its wiring (offsets, grad layout) is tested here too.
    # The compiled kernel's own tests below need it built; here it joins when the build exists.
    return (["loop"] + (["torch._grouped_mm"] if hasattr(torch, "_grouped_mm") else [])
            + (["kernel"] if build.load().why_not("cpu") is None else []))


def _random_counts(E: int, R: int, seed: int, empty: int = 0) -> torch.Tensor:
    """Uneven rows per expert summing to R, the first ``empty`` experts given none."""
    g = torch.Generator().manual_seed(tolerance.seed(seed))
    owner_R = torch.randint(empty, E, (R,), generator=g)
    return torch.bincount(owner_R, minlength=E)


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("as_tensor", [True, False])
def test_grouped_mm_matches_per_expert_loop(counts, dtype, as_tensor):
    R, D, F = sum(counts), 16, 8
    grad_RF = randn(R, F, dtype=dtype, seed=9)
    results = {}
    for backend in _backends(dtype) + ["oracle"]:
        x_RD = randn(R, D, dtype=dtype, seed=1, requires_grad=True)
        w_EDF = randn(4, D, F, dtype=dtype, seed=2, requires_grad=True)
        if backend == "oracle":
            y_RF = _per_expert(x_RD, w_EDF, counts)
        else:
            y_RF = grouped_mm(x_RD, w_EDF, torch.tensor(counts) if as_tensor else counts, backend=backend)
        y_RF.backward(grad_RF)
        results[backend] = (y_RF, x_RD.grad, w_EDF.grad)
    for backend in _backends(dtype):
        for got, want in zip(results[backend], results["oracle"]):  # y sums D, x.grad F, w.grad an expert's rows
            assert_close(got, want, reduction=max(D, F, *counts), what=backend)


def test_loop_builds_one_weight_gradient():
    """The weight gradient reaches w_EDF through a single stack, not one full-size add per expert."""
    x_RD = randn(6, 4, requires_grad=True)
    w_EDF = randn(3, 4, 5, seed=1, requires_grad=True)
    y_RF = grouped_mm(x_RD, w_EDF, [2, 2, 2], backend="loop")
    todo, seen = [y_RF.grad_fn], {}
    while todo:
        fn = todo.pop()
        seen[fn] = fn.name()
        todo += [nxt for nxt, _ in fn.next_functions if nxt is not None and nxt not in seen]
    names = list(seen.values())
    assert "SelectBackward0" not in names and names.count("UnbindBackward0") == 1


def test_grouped_mm_loop_handles_sum_backward():
    """y.sum().backward() hands a stride-0 gradient; both backends must accept it."""
    for backend in _backends(torch.float32):
        x_RD = randn(5, 8, requires_grad=True)
        w_EDF = randn(2, 8, 8, seed=1, requires_grad=True)
        grouped_mm(x_RD, w_EDF, [2, 3], backend=backend).sum().backward()
        assert w_EDF.grad.shape == (2, 8, 8)


def test_backend_choice_on_cpu(kernels):
    assert grouped_mm_backend(torch.device("cpu"), torch.float32, 64, 64) == "kernel"
    ops.set_impl("reference")
    try:
        assert grouped_mm_backend(torch.device("cpu"), torch.float32, 64, 64) == "loop"
    finally:
        ops.set_impl("auto")


# Few rows per expert spread the experts over threads, many run each GEMM threaded: cover both.
@pytest.mark.parametrize("E,R", [(64, 300), (5, 4000), (1, 7), (3, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_oracle_on_uneven_experts(kernels, E, R, dtype):
    empty = min(2, E - 1)
    counts_E = _random_counts(E, R, seed=E + R, empty=empty)
    D, F = 24, 40
    grad_RF = randn(R, F, dtype=dtype, seed=5)
    results = []
    for run in ("kernel", "oracle"):
        x_RD = randn(R, D, dtype=dtype, seed=3, requires_grad=True)
        w_EDF = randn(E, D, F, dtype=dtype, seed=4, requires_grad=True)
        y_RF = (grouped_mm(x_RD, w_EDF, counts_E, backend="kernel") if run == "kernel"
                else _per_expert(x_RD, w_EDF, counts_E.tolist()))
        y_RF.backward(grad_RF)
        results.append((y_RF, x_RD.grad, w_EDF.grad))
    for got, want in zip(*results):  # y sums D, x.grad F, w.grad an expert's rows
        assert_close(got, want, reduction=max(D, F, int(counts_E.max()) if R else 0))
    if empty:
        assert torch.count_nonzero(results[0][2][0]) == 0  # an expert with no rows gets an all-zero gradient


def test_kernel_runs_on_every_thread_count(kernels):
    """The expert-split path with 1, 2 and 3 threads gives bit-identical results (each expert's GEMM is
    the same call whichever thread runs it)."""
    counts_E = _random_counts(32, 500, seed=1, empty=3)
    x_RD, w_EDF = randn(500, 16, seed=1), randn(32, 16, 8, seed=2)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(kernels.grouped_mm(x_RD, w_EDF, counts_E))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_kernel_double_backward(kernels):
    counts_E = torch.tensor([2, 0, 3])
    x_RD = randn(5, 4, dtype=torch.float64, requires_grad=True)
    w_EDF = randn(3, 4, 3, dtype=torch.float64, seed=1, requires_grad=True)
    torch.autograd.gradgradcheck(lambda x, w: kernels.grouped_mm(x, w, counts_E), (x_RD, w_EDF))


def test_kernel_rejects_bad_counts(kernels):
    x_RD, w_EDF = randn(4, 8), randn(2, 8, 8)
    with pytest.raises(RuntimeError, match="counts_E sums to 5 but there are 4 rows"):
        kernels.grouped_mm(x_RD, w_EDF, torch.tensor([2, 3]))
    with pytest.raises(RuntimeError, match=r"counts_E\[0\] = -1 is negative"):
        kernels.grouped_mm(x_RD, w_EDF, torch.tensor([-1, 5]))
    with pytest.raises(RuntimeError, match="w_EDF must be"):
        kernels.grouped_mm(x_RD, randn(3, 8, 8), torch.tensor([2, 2]))


def test_rejects_counts_that_do_not_match_experts():
    with pytest.raises(ValueError, match="experts"):
        grouped_mm(randn(4, 8), randn(3, 8, 8), [2, 2], backend="loop")


def test_kernel_backend_is_cpu_only():
    with pytest.raises(RuntimeError, match="CPU kernel only"):
        grouped_mm(torch.ones(2, 4, device="meta"), torch.ones(1, 4, 4, device="meta"), [2], backend="kernel")
