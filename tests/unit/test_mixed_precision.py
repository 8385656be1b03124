"""A bf16 MoE layer (as DeepSpeed's bf16 casts it) keeps its router, losses and gate weights in fp32 and
matches the fp32 layer to bf16 precision."""
import copy

import torch

from moe_sys.moe.balance import BalanceSpec
from moe_sys.moe.layer import MoELayer
from moe_sys.moe.routing import RouterSpec


def test_bf16_layer_routes_in_fp32_and_follows_fp32():
    torch.manual_seed(0)
    full = MoELayer(32, 64, num_experts=8, top_k=2, spec=RouterSpec(balance=BalanceSpec(bias_rate=1e-3)))
    half = copy.deepcopy(full).to(torch.bfloat16)
    x_BSD = torch.randn(2, 16, 32)
    y32, r32 = full(x_BSD)
    y16, r16 = half(x_BSD.bfloat16())
    assert y16.dtype == torch.bfloat16 and half.router.balance.bias_E.dtype == torch.float32
    assert r16.logits_TE.dtype == r16.weights_TK.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in r16.losses.values()) and r16.losses
    assert (r16.expert_ids_TK == r32.expert_ids_TK).float().mean() > 0.95  # rounding may flip a near-tie
    same = (r16.expert_ids_TK == r32.expert_ids_TK).all(1)
    torch.testing.assert_close(y16.float().view(-1, 32)[same], y32.view(-1, 32)[same], rtol=0.05, atol=2e-3)
