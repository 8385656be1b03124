"""Fake (shape) and autograd registrations of the compiled ``torch.ops.moe_sys`` ops.

Legend: T tokens, K slots per token, D row width, R routed rows.

Fakes let torch.compile and FakeTensor tracing see the output shapes without running a kernel.
The dispatch ops are closed under differentiation, so every backward below is written with the ops
themselves and double backward works too:

- permute (x_RD[dest] = w * x_TD[t]):   dx = unpermute(g, dest, w),  dw = row_dot(x, g, dest)
- unpermute (y_TD[t] = sum w * y_RD[dest]): dy = permute(g, dest, R, w), dw = row_dot(g, y, dest)
- row_dot (o[t,k] = x_TD[t] . y_RD[dest]):  dx = unpermute(y, dest, g),  dy = permute(x, dest, R, g)

Weight gradients come back in the weights' own dtype (the router's, usually fp32).

The grouped GEMM pair is closed the same way (per expert e, over its rows):

- grouped_mm (y = x @ w[e]):          dx = grouped_mm(g, w^T),  dw = grouped_mm_wgrad(x, g)
- grouped_mm_wgrad (gw[e] = x^T @ g):  dx = grouped_mm(g, gg^T), dg = grouped_mm(x, gg)
"""
from __future__ import annotations

import functools

import torch

ops = torch.ops.moe_sys


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: fp32 for halves, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _build_index_fake(expert_ids_TK, num_experts, capacity):
    return expert_ids_TK.new_empty(expert_ids_TK.shape), expert_ids_TK.new_empty(num_experts)


def _permute_fake(x_TD, dest_row_TK, num_rows, weights_TK=None):
    torch._check(x_TD.dim() == 2 and dest_row_TK.dim() == 2 and dest_row_TK.shape[0] == x_TD.shape[0])
    return x_TD.new_empty(num_rows, x_TD.shape[1])


def _unpermute_fake(y_RD, dest_row_TK, weights_TK=None):
    torch._check(y_RD.dim() == 2 and dest_row_TK.dim() == 2)
    return y_RD.new_empty(dest_row_TK.shape[0], y_RD.shape[1])


def _row_dot_fake(a_TD, b_RD, dest_row_TK):
    torch._check(a_TD.shape[1] == b_RD.shape[1] and dest_row_TK.shape[0] == a_TD.shape[0])
    return a_TD.new_empty(dest_row_TK.shape, dtype=_acc_dtype(a_TD.dtype))


def _grouped_mm_fake(x_RD, w_EDF, counts_E):
    torch._check(x_RD.dim() == 2 and w_EDF.dim() == 3 and x_RD.shape[1] == w_EDF.shape[1])
    return x_RD.new_empty(x_RD.shape[0], w_EDF.shape[2])


def _grouped_mm_wgrad_fake(x_RD, grad_RF, counts_E):
    torch._check(x_RD.dim() == 2 and grad_RF.dim() == 2 and x_RD.shape[0] == grad_RF.shape[0])
    return x_RD.new_empty(counts_E.shape[0], x_RD.shape[1], grad_RF.shape[1])


def _weight_grad(dot_TK, weights_TK):
    return dot_TK.to(weights_TK.dtype)


def _needs_grad(ctx, i: int) -> bool:
    """needs_input_grad only covers the arguments actually passed, not defaulted optional ones."""
    return i < len(ctx.needs_input_grad) and ctx.needs_input_grad[i]


def _permute_setup(ctx, inputs, output):
    x_TD, dest_row_TK = inputs[:2]
    weights_TK = inputs[3] if len(inputs) > 3 else None
    ctx.save_for_backward(x_TD if _needs_grad(ctx, 3) else None, dest_row_TK, weights_TK)


def _permute_backward(ctx, grad_RD):
    x_TD, dest_row_TK, weights_TK = ctx.saved_tensors
    grad_x = ops.unpermute(grad_RD, dest_row_TK, weights_TK) if _needs_grad(ctx, 0) else None
    grad_w = _weight_grad(ops.row_dot(x_TD, grad_RD, dest_row_TK), weights_TK) if _needs_grad(ctx, 3) else None
    return grad_x, None, None, grad_w


def _unpermute_setup(ctx, inputs, output):
    y_RD, dest_row_TK = inputs[:2]
    weights_TK = inputs[2] if len(inputs) > 2 else None
    ctx.num_rows = y_RD.shape[0]
    ctx.save_for_backward(y_RD if _needs_grad(ctx, 2) else None, dest_row_TK, weights_TK)


def _unpermute_backward(ctx, grad_TD):
    y_RD, dest_row_TK, weights_TK = ctx.saved_tensors
    grad_y = ops.permute(grad_TD, dest_row_TK, ctx.num_rows, weights_TK) if _needs_grad(ctx, 0) else None
    grad_w = _weight_grad(ops.row_dot(grad_TD, y_RD, dest_row_TK), weights_TK) if _needs_grad(ctx, 2) else None
    return grad_y, None, grad_w


def _row_dot_setup(ctx, inputs, output):
    a_TD, b_RD, dest_row_TK = inputs
    ctx.num_rows = b_RD.shape[0]
    ctx.save_for_backward(a_TD, b_RD, dest_row_TK)


def _row_dot_backward(ctx, grad_TK):
    a_TD, b_RD, dest_row_TK = ctx.saved_tensors
    grad_a = ops.unpermute(b_RD, dest_row_TK, grad_TK) if _needs_grad(ctx, 0) else None
    grad_b = ops.permute(a_TD, dest_row_TK, ctx.num_rows, grad_TK) if _needs_grad(ctx, 1) else None
    return grad_a, grad_b, None


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad_RF):
    x_RD, w_EDF, counts_E = ctx.saved_tensors
    grad_x = ops.grouped_mm(grad_RF, w_EDF.transpose(1, 2), counts_E) if _needs_grad(ctx, 0) else None
    grad_w = ops.grouped_mm_wgrad(x_RD, grad_RF, counts_E) if _needs_grad(ctx, 1) else None
    return grad_x, grad_w, None


def _grouped_mm_wgrad_backward(ctx, grad_EDF):
    x_RD, grad_RF, counts_E = ctx.saved_tensors
    grad_x = ops.grouped_mm(grad_RF, grad_EDF.transpose(1, 2), counts_E) if _needs_grad(ctx, 0) else None
    grad_g = ops.grouped_mm(x_RD, grad_EDF, counts_E) if _needs_grad(ctx, 1) else None
    return grad_x, grad_g, None


@functools.lru_cache(maxsize=None)
def register() -> None:
    """Attach fakes and autograd to the ops; call once, after the compiled library is loaded."""
    for name, fake in (("build_index", _build_index_fake), ("permute", _permute_fake),
                       ("unpermute", _unpermute_fake), ("row_dot", _row_dot_fake),
                       ("grouped_mm", _grouped_mm_fake), ("grouped_mm_wgrad", _grouped_mm_wgrad_fake)):
        torch.library.register_fake(f"moe_sys::{name}", fake)
    for name, backward, setup in (("permute", _permute_backward, _permute_setup),
                                  ("unpermute", _unpermute_backward, _unpermute_setup),
                                  ("row_dot", _row_dot_backward, _row_dot_setup),
                                  ("grouped_mm", _grouped_mm_backward, _grouped_mm_setup),
                                  ("grouped_mm_wgrad", _grouped_mm_wgrad_backward, _grouped_mm_setup)):
        torch.library.register_autograd(f"moe_sys::{name}", backward, setup_context=setup)
