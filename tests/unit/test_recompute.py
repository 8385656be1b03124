"""Activation checkpointing (full blocks, or only the experts) gives the gradients and balancing state
of the run without it, with every source of routing randomness on."""
import copy

import pytest
import torch

from moe_sys.config import validate
from moe_sys.models.transformer import TransformerLM, lm_loss
from moe_sys.moe import balance, observe, recompute

# Noise, sampled second choices, random drop priorities, global-batch counts and the bias: every
# piece a recompute could redo differently or count twice.
ROUTING = {"num_experts": 8, "top_k": 2, "capacity_factor": 1.0, "min_capacity": 1,
           "router": {"jitter_eps": 0.1, "noisy_gating": True, "sample_second": True, "drop_policy": "random"},
           "balance": {"losses": [{"type": "switch", "coef": 0.01}, {"type": "global", "coef": 0.01},
                                  {"type": "z", "coef": 0.001}], "bias": {"enabled": True}}}


def tiny_model(ep_size=1):
    cfg = validate({"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "max_seq_len": 16},
                    "moe": ROUTING, "data": {"seq_len": 16}, "parallel": {"ep_size": ep_size, "procs": ep_size}})
    torch.manual_seed(0)
    return TransformerLM(cfg.model, cfg.moe, num_domains=3)


def step_state(build, mode, tokens_BS, steps=2, seed=7):
    """Gradients and balancing state after ``steps`` forward/backward passes (bias stepped in between)
    of the model build() returns."""
    model = build()
    recompute.enable(model, mode)
    torch.manual_seed(seed)
    for _ in range(steps):
        model.zero_grad()
        out = model(tokens_BS)
        loss = lm_loss(out.logits_BSV, tokens_BS, torch.ones_like(tokens_BS))
        loss = loss + sum(observe.router_losses(out.routings).values())
        loss.backward()
        counts = [m.router.balance.step_counts_E.clone() for m in model.moe_layers()]
        global_sums = [m.router.balance.global_sum_E.clone() for m in model.moe_layers()]
        balance.step(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "grads": grads, "counts": counts, "global": global_sums,
            "bias": [m.router.balance.bias_E.clone() for m in model.moe_layers()]}


def assert_same(a, b):
    torch.testing.assert_close(a["loss"], b["loss"], rtol=0, atol=0)
    assert a["grads"].keys() == b["grads"].keys()
    for name in a["grads"]:
        torch.testing.assert_close(a["grads"][name], b["grads"][name], rtol=1e-6, atol=1e-7, msg=name)
    for key in ("counts", "global", "bias"):
        for x, y in zip(a[key], b[key]):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("mode", ["full", "moe"])
def test_checkpointed_gradients_and_counts_equal_plain(mode):
    tokens_BS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    plain = step_state(tiny_model, "none", tokens_BS)
    assert all(c.sum() == 2 * 16 * 2 for c in plain["counts"])  # each token's two choices, counted once
    assert_same(step_state(tiny_model, mode, tokens_BS), plain)


def test_recompute_really_frees_block_activations():
    """Saved tensors of a checkpointed block are dropped after the forward (else the mode did nothing)."""
    model = tiny_model()
    tokens_BS = torch.randint(0, 256, (2, 16))
    saved = {}
    for mode in ("none", "full"):
        m = copy.deepcopy(model)
        recompute.enable(m, mode)
        count = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.__setitem__(0, count[0] + 1) or t, lambda t: t):
            m(tokens_BS)
        saved[mode] = count[0]
    assert saved["full"] < saved["none"] / 3, saved


def test_enable_marks_the_named_units():
    model = tiny_model()
    assert recompute.enable(copy.deepcopy(model), "full") == 2
    assert recompute.enable(copy.deepcopy(model), "moe") == 2
    assert recompute.enable(copy.deepcopy(model), "none") == 0
