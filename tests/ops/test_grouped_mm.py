"""grouped_mm vs a plain per-expert loop, forward and gradients, on every backend this machine runs."""
from __future__ import annotations

import pytest
import torch

from moe_sys.ops.grouped_mm import grouped_mm, grouped_mm_backend
from tests.ops.conftest import randn

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
    return ["loop"] + (["torch._grouped_mm"] if hasattr(torch, "_grouped_mm") else [])


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
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for backend in _backends(dtype):
        for got, want in zip(results[backend], results["oracle"]):
            torch.testing.assert_close(got, want, **tol)


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


def test_backend_choice_on_cpu():
    assert grouped_mm_backend(torch.device("cpu"), torch.bfloat16, 64, 64) == "loop"


def test_rejects_counts_that_do_not_match_experts():
    with pytest.raises(ValueError, match="experts"):
        grouped_mm(randn(4, 8), randn(3, 8, 8), [2, 2], backend="loop")
