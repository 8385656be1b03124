"""Expert bank: El feed-forward experts stored as stacked weights, run over expert-sorted rows.

Legend: R rows (sorted by expert), D model dim, F expert hidden dim, El local experts.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_sys.ops.grouped_mm import grouped_mm


class ExpertBank(nn.Module):
    """SwiGLU or GELU experts with weights [El, D, F] / [El, F, D].

    Each expert runs on its contiguous slice of rows; see ``grouped_mm`` for why the weight
    gradient is built once rather than once per expert.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "swiglu", init_std: float = 0.02):
        super().__init__()
        self.num_experts, self.activation = num_experts, activation
        self.w_up_EDF = nn.Parameter(torch.randn(num_experts, d_model, d_ff) * init_std)
        if activation == "swiglu":
            self.w_gate_EDF = nn.Parameter(torch.randn(num_experts, d_model, d_ff) * init_std)
        self.w_down_EFD = nn.Parameter(torch.randn(num_experts, d_ff, d_model) * init_std)

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_RD: rows grouped by expert; counts_E: rows per local expert. Returns y_RD."""
        counts = counts_E if counts_E.device.type == "cpu" else counts_E.tolist()  # GPU: sync once, not per GEMM
        h_RF = grouped_mm(x_RD, self.w_up_EDF, counts)
        if self.activation == "swiglu":
            h_RF = F.silu(grouped_mm(x_RD, self.w_gate_EDF, counts)) * h_RF
        else:
            h_RF = F.gelu(h_RF)
        return grouped_mm(h_RF, self.w_down_EFD, counts)
