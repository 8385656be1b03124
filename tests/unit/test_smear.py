"""SMEAR and mixtures of adapter experts against explicit loops that merge/run each example or token."""
import pytest
import torch
import torch.nn.functional as F

from moe_sys.adapters.adapter_experts import AdapterMoE, BottleneckExperts, LoRAExperts
from moe_sys.adapters.smear import SmearRouter, segment_means
from moe_sys.models.transformer import SwiGLU
from moe_sys.moe.routing import RoutingContext
from tests.unit.test_adapters import randomize

D, F_, E = 16, 24, 4


def layer(kind: str, aggregation: str = "params", segments: int = 1, expert_dropout: float = 0.0) -> AdapterMoE:
    torch.manual_seed(0)
    ffn = SwiGLU(D, F_)
    experts = LoRAExperts(E, D, F_, rank=3, scale=2.0) if kind == "lora" else BottleneckExperts(E, D, 5, "gelu", 1.5)
    moe = AdapterMoE(ffn, "s", experts, SmearRouter(D, E, expert_dropout, segments, init_std=0.5), E, aggregation,
                     segments)
    randomize(moe, std=0.3)
    return moe


def merged_ffn(moe: AdapterMoE, x_LD: torch.Tensor, p_E: torch.Tensor) -> torch.Tensor:
    """One example the explicit way: average the experts' parameters with p, build that adapter, run it."""
    ffn, ex = moe.base_layer, moe.experts
    if isinstance(ex, BottleneckExperts):
        b = ex.bank
        down, bias, up = (torch.einsum("e,e...->...", p_E, t) for t in (b.down_NIR, b.bias_NR, b.up_NRO))
        return ffn(x_LD) + ex.scale * F.gelu(x_LD @ down + bias) @ up

    def weight(linear, bank):  # W + scale * (A_merged B_merged)^T
        A, B = torch.einsum("e,eir->ir", p_E, bank.A_NIR), torch.einsum("e,ero->ro", p_E, bank.B_NRO)
        return linear.weight + bank.scale * (A @ B).t()

    h = F.silu(x_LD @ weight(ffn.gate, ex.gate).t()) * (x_LD @ weight(ffn.up, ex.up).t())
    return h @ weight(ffn.down, ex.down).t()


@pytest.mark.parametrize("kind", ["lora", "bottleneck"])
@pytest.mark.parametrize("segments", [1, 4])
def test_smear_equals_merging_and_running_each_example_alone(kind, segments):
    moe = layer(kind, segments=segments)
    x = torch.randn(3, 8, D)
    mask = torch.ones(3, 8)
    mask[1, 5:] = 0  # padding must not move the router
    ctx = RoutingContext((3, 8), mask_BS=mask)
    y, routing = moe(x, ctx)
    pooled_BGD = segment_means(x, mask, segments)
    probs_BGE = torch.softmax(moe.router.norm(pooled_BGD) @ moe.router.weight.t(), -1)
    L = 8 // segments
    for b in range(3):
        for g in range(segments):
            real = mask[b, g * L:(g + 1) * L] == 1  # padding tokens are routed nowhere
            expected = merged_ffn(moe, x[b, g * L:(g + 1) * L], probs_BGE[b, g])
            torch.testing.assert_close(y[b, g * L:(g + 1) * L][real], expected[real], rtol=1e-5, atol=1e-5)
    assert "load_E" in routing.stats and routing.expert_ids_TK.shape == (24, E)


def test_smear_gradients_reach_every_expert_and_the_router():
    moe = layer("lora", expert_dropout=0.0)
    y, _ = moe(torch.randn(4, 8, D), RoutingContext((4, 8)))
    y.pow(2).sum().backward()
    for name, p in moe.experts.named_parameters():
        assert all(p.grad[e].abs().sum() > 0 for e in range(E)), name
    assert moe.router.weight.grad.abs().sum() > 0 and moe.router.norm.weight.grad.abs().sum() > 0


def test_causal_segments_route_only_from_earlier_tokens():
    moe = layer("lora", segments=4)
    x = torch.randn(2, 8, D)
    y, _ = moe(x, RoutingContext((2, 8)))
    x2 = x.clone()
    x2[:, 6:] += 1.0  # change the last segment only
    y2, _ = moe(x2, RoutingContext((2, 8)))
    torch.testing.assert_close(y2[:, :6], y[:, :6])
    w_BSE = moe.router(x.reshape(16, D), RoutingContext((2, 8))).weights_TK.view(2, 8, E)
    torch.testing.assert_close(w_BSE[0, :2], w_BSE[1, :2])  # segment 0 has nothing before it: the router's prior
    assert not torch.allclose(w_BSE[0, 2:], w_BSE[1, 2:])


def test_expert_dropout_renormalises_in_training_only():
    router = SmearRouter(D, E, expert_dropout=0.5, init_std=0.5)
    x = torch.randn(64 * 8, D)
    w = router(x, RoutingContext((64, 8))).weights_TK
    torch.testing.assert_close(w.sum(-1), torch.ones(64 * 8))
    assert (w == 0).any()
    router.eval()
    assert (router(x, RoutingContext((64, 8))).weights_TK > 0).all()


@pytest.mark.parametrize("kind", ["lora", "bottleneck"])
def test_ensemble_mixes_every_experts_output_with_the_smear_weights(kind):
    moe = layer(kind, aggregation="outputs")
    x = torch.randn(2, 8, D)
    y, routing = moe(x, RoutingContext((2, 8)))
    p_TE = routing.weights_TK
    one_hot = torch.eye(E)
    expected = sum(p_TE[:, e:e + 1] * merged_ffn(moe, x.reshape(16, D), one_hot[e]) for e in range(E))
    torch.testing.assert_close(y.reshape(16, D), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "bottleneck"])
def test_token_routed_mixture_equals_a_loop_over_tokens(kind):
    from moe_sys.moe.router_topk import TopKRouter

    moe = layer(kind, aggregation="outputs")
    torch.manual_seed(1)
    moe.router = TopKRouter(D, E, 2, init_std=0.5)
    x = torch.randn(2, 8, D)
    y, routing = moe(x, RoutingContext((2, 8)))
    x_TD, one_hot = x.reshape(16, D), torch.eye(E)
    base = moe.base_layer(x_TD)
    for t in range(16):
        expected = base[t].clone()
        for w, e in zip(routing.weights_TK[t], routing.expert_ids_TK[t]):
            expected += w * (merged_ffn(moe, x_TD[t:t + 1], one_hot[e])[0] - base[t])
        torch.testing.assert_close(y.reshape(16, D)[t], expected, rtol=1e-5, atol=1e-5)
