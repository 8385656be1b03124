"""Compiled build_index / permute / unpermute vs the pure-PyTorch reference, forward and backward.

Legend: T tokens, K slots per token, E experts, D row width, R routed rows, C capacity.
"""
from __future__ import annotations

import pytest
import torch

from moe_sys import ops
from moe_sys.ops import reference
from tests.ops.conftest import DEVICES, randn, random_routing
from tests.tolerance import assert_close

E, D = 12, 24
UNUSED = (0, 5)  # experts that receive no tokens
TOKENS = [0, 1, 7, 33, 257]
SLOTS = [1, 2, 8]
LAYOUTS = [None, 2, 9]  # dropless; capacity small enough to drop; capacity that drops little
DTYPES = [torch.float32, torch.bfloat16]
ALL_DTYPES = DTYPES + [torch.float16]


def _close(got, want, reduction, magnitude=None):
    """Sums of ``reduction`` terms in another order (tests/tolerance.py)."""
    assert got.device == want.device
    assert_close(got, want, reduction, magnitude=magnitude)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("capacity", LAYOUTS)
@pytest.mark.parametrize("K", SLOTS)
@pytest.mark.parametrize("T", TOKENS)
def test_build_index_matches_reference(kernels, device, T, K, capacity):
    ids_TK = random_routing(T, K, E, unused=UNUSED, seed=T * 10 + K, device=device)
    dest_row_TK, counts_E = kernels.build_index(ids_TK, E, capacity)
    want = reference.build_index(ids_TK, E, capacity)
    torch.testing.assert_close(dest_row_TK, want.dest_row_TK, rtol=0, atol=0)
    torch.testing.assert_close(counts_E, want.counts_E, rtol=0, atol=0)
    assert (counts_E[list(UNUSED)] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("capacity", [None, 20000])
def test_build_index_multi_chunk(kernels, device, capacity):
    """Many chunks (one per CPU thread, one per 4096 slots on CUDA): positions must continue across
    chunk boundaries; permute's inverse map is built in parallel too at this size."""
    ids_TK = random_routing(150000, 2, E, unused=UNUSED, seed=7, device=device)
    x_TD = randn(150000, 4, device=device)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        dest_row_TK, counts_E = kernels.build_index(ids_TK, E, capacity)
        want = reference.build_index(ids_TK, E, capacity)
        x_RD = kernels.permute(x_TD, want.dest_row_TK, want.num_rows)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(dest_row_TK, want.dest_row_TK) and torch.equal(counts_E, want.counts_E)
    assert torch.equal(x_RD, reference.permute(x_TD, want.dest_row_TK, want.num_rows))


def test_build_index_capacity_priority(kernels):
    """All first choices before second choices, earlier tokens first: with every slot on expert 1 and
    C = 3, tokens 0..2's first choices are kept and every second choice is dropped."""
    ids_TK = torch.ones(5, 2, dtype=torch.long)
    dest_row_TK, counts_E = kernels.build_index(ids_TK, 2, 3)
    assert dest_row_TK.tolist() == [[3, -1], [4, -1], [5, -1], [-1, -1], [-1, -1]]
    assert counts_E.tolist() == [0, 3]


def test_build_index_rejects_out_of_range_expert(kernels):
    with pytest.raises(RuntimeError, match="num_experts"):
        kernels.build_index(torch.tensor([[3]]), 3, None)


def _routing(T, K, capacity, device):
    ids_TK = random_routing(T, K, E, unused=UNUSED, seed=1000 + T * 10 + K, device=device)
    return reference.build_index(ids_TK, E, capacity)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("capacity", LAYOUTS)
@pytest.mark.parametrize("K", SLOTS)
@pytest.mark.parametrize("T", TOKENS)
def test_permute_unpermute_match_reference(kernels, device, dtype, T, K, capacity):
    index = _routing(T, K, capacity, device)
    x_TD = randn(T, D, dtype=dtype, seed=1, device=device)
    x_RD = kernels.permute(x_TD, index.dest_row_TK, index.num_rows)
    torch.testing.assert_close(x_RD, reference.permute(x_TD, index.dest_row_TK, index.num_rows), rtol=0, atol=0)

    y_RD = randn(index.num_rows, D, dtype=dtype, seed=2, device=device)
    w_TK = torch.rand(T, K, device=device)
    for weights in (None, w_TK):
        got = kernels.unpermute(y_RD, index.dest_row_TK, weights)
        _close(got, reference.unpermute(y_RD, index.dest_row_TK, weights), reduction=K)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("width", [520, 522])  # rows a multiple of 16 bytes (streamed) and not (memcpy)
@pytest.mark.parametrize("capacity", [None, 400])
def test_large_outputs_match_reference(kernels, dtype, width, capacity):
    """Outputs over 4 MiB take the streaming-store path of the CPU kernels."""
    T, K = 3000, 2
    index = reference.build_index(random_routing(T, K, E, unused=UNUSED, seed=5), E, capacity)
    x_TD = randn(T, width, dtype=dtype, seed=1)
    w_TK = torch.rand(T, K)
    x_RD = kernels.permute(x_TD, index.dest_row_TK, index.num_rows)
    assert torch.equal(x_RD, reference.permute(x_TD, index.dest_row_TK, index.num_rows))
    scaled_RD = kernels.permute(x_TD, index.dest_row_TK, index.num_rows, w_TK)
    want_RD = reference.permute(x_TD, index.dest_row_TK, index.num_rows)
    _close(scaled_RD, _scale_rows(want_RD, index.dest_row_TK, w_TK), reduction=1)
    for weights in (None, w_TK):
        _close(kernels.unpermute(x_RD, index.dest_row_TK, weights), reference.unpermute(x_RD, index.dest_row_TK, weights),
               reduction=K)


def _scale_rows(x_RD, dest_row_TK, w_TK):
    """x_RD with the row of each kept slot (t, k) multiplied by w_TK[t, k]."""
    kept = dest_row_TK >= 0
    scale_R = torch.ones(x_RD.shape[0])
    scale_R[dest_row_TK[kept]] = w_TK[kept]
    return (x_RD.float() * scale_R[:, None]).to(x_RD.dtype)


def test_unpermute_accumulates_half_inputs_in_fp32(kernels):
    """1 + seven times 2^-8 in bf16: a bf16 running sum stays at 1 (each 2^-8 is half a bf16 ulp and
    rounds away), an fp32 sum reaches 1 + 7/256 and rounds to 1 + 8/256 once at the end."""
    dest_row_TK = torch.arange(8).view(1, 8)
    y_RD = torch.tensor([1.0] + [2**-8] * 7).repeat(4, 1).t().to(torch.bfloat16)
    got = kernels.unpermute(y_RD, dest_row_TK, None)
    assert got.dtype == torch.bfloat16
    assert got.float().tolist() == [[1 + 8 / 256] * 4]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("capacity", LAYOUTS)
@pytest.mark.parametrize("K", SLOTS)
@pytest.mark.parametrize("T", [0, 1, 33])
def test_gradients_match_reference(kernels, device, dtype, T, K, capacity):
    """route -> scale by a fixed random tensor (stands in for the experts) -> combine; grads to x and w."""
    index = _routing(T, K, capacity, device)
    scale_RD = randn(index.num_rows, D, dtype=dtype, seed=3, device=device)
    grad_TD = randn(T, D, dtype=dtype, seed=4, device=device)

    def run(impl, absolute=False):
        """absolute: on |inputs|, each output is its sum of |terms| (the scale of its rounding error
        where terms cancel, as in a token's one weight gradient summing D products)."""
        f = torch.abs if absolute else (lambda t: t)
        ops.set_impl(impl)
        try:
            x_TD = f(randn(T, D, dtype=dtype, seed=1, device=device)).requires_grad_()
            w_TK = torch.linspace(0.1, 1.0, T * K, device=device).view(T, K).requires_grad_()
            y_TD = ops.unpermute(ops.permute(x_TD, index.dest_row_TK, index.num_rows) * f(scale_RD),
                                 index.dest_row_TK, w_TK)
            return (y_TD, *torch.autograd.grad(y_TD, (x_TD, w_TK), f(grad_TD)))
        finally:
            ops.set_impl("auto")

    for got, want, size in zip(run("kernel"), run("reference"), run("reference", absolute=True)):
        _close(got, want, reduction=max(K, D), magnitude=size)  # the gradient of w_TK sums over D


@pytest.mark.parametrize("capacity", [None, 2])
def test_gradcheck_and_double_backward(kernels, capacity):
    """float64 finite differences on every op, including the backward ops' own backward."""
    index = _routing(9, 2, capacity, "cpu")
    dest, R = index.dest_row_TK, index.num_rows
    x_TD = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    y_RD = torch.randn(R, 5, dtype=torch.float64, requires_grad=True)
    w_TK = torch.rand(9, 2, dtype=torch.float64, requires_grad=True)
    checks = [
        (lambda x, w: kernels.permute(x, dest, R, w), (x_TD, w_TK)),
        (lambda y, w: kernels.unpermute(y, dest, w), (y_RD, w_TK)),
        (lambda x, y: kernels.row_dot(x, y, dest), (x_TD, y_RD)),
    ]
    for fn, inputs in checks:
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


def test_public_ops_follow_impl(kernels, monkeypatch):
    """ops.impl=kernel runs the compiled op (so the reference must not be called)."""
    def fail(*args, **kwargs):
        raise AssertionError("reference called under ops.impl=kernel")

    ids_TK = random_routing(16, 2, E, unused=UNUSED)
    want = reference.build_index(ids_TK, E, 3)
    for name in ("build_index", "permute", "unpermute"):
        monkeypatch.setattr(reference, name, fail)
    ops.set_impl("kernel")
    try:
        index = ops.build_index(ids_TK, E, 3)
        x_RD = ops.permute(randn(16, D), index.dest_row_TK, index.num_rows)
        ops.unpermute(x_RD, index.dest_row_TK, torch.rand(16, 2))
    finally:
        ops.set_impl("auto")
    assert index.num_rows == want.num_rows == E * 3
    assert torch.equal(index.dest_row_TK, want.dest_row_TK)
