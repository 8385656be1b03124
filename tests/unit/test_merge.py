"""Merging (hand-computed cases, LoRA on the full delta, `moe-sys merge`) and sparse upcycling."""
import pytest
import torch
from safetensors.torch import load_file

from moe_sys.adapters import inject as adapters
from moe_sys.adapters.io import save_adapters
from moe_sys.weights.io import load_model_weights, save_model_weights
from moe_sys.adapters.merge import MergeOptions, merge_states, upcycle
from moe_sys.cli import main
from moe_sys.config import load_config
from moe_sys.models.transformer import TransformerLM
from tests.unit.test_adapters import DOMAINS, add, batch, logits, randomize, tiny_lm


def merged(method, states, base=None, **opts):
    return merge_states([{"w": torch.tensor(s)} for s in states], MergeOptions(method, **opts),
                        {"w": torch.tensor(base)} if base is not None else None)["w"]


def test_hand_computed_merges():
    torch.testing.assert_close(merged("average", [[1., 2.], [3., 6.]], weights=[1, 3]), torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(merged("task_arithmetic", [[2., 3.], [0., 5.]], base=[1., 1.], lam=0.5),
                               torch.tensor([1.0, 4.0]))
    # TIES, density 0.5: trim -> [3, 0, 0, 2] and [-2, -2, 0, 0]; signs of the sum + - 0 +; disjoint means
    torch.testing.assert_close(merged("ties", [[3., -1., .5, 2.], [-2., -2., 1., .1]], density=0.5),
                               torch.tensor([3.0, -2.0, 0.0, 2.0]))


def test_dare_drops_and_rescales_without_bias():
    ones = [[1.0] * 20000]
    out = merged("dare_linear", ones, density=0.25, seed=7)
    assert set(out.unique().tolist()) == {0.0, 4.0}
    assert abs(out.mean().item() - 1.0) < 0.05
    assert torch.equal(out, merged("dare_linear", ones, density=0.25, seed=7))
    ties = merged("dare_ties", [[1.0] * 4000, [-0.5] * 4000], density=0.5, seed=1)
    assert set(ties.unique().tolist()) <= {0.0, 2.0, -1.0}


def lora_model(seed):
    model = tiny_lm()
    add(model, {"type": "lora", "name": "a", "rank": 2, "slots": ["x", "y"], "active": "y",
                "targets": ["layers.*.attn.qkv"]})
    randomize(model, seed=seed)
    return model


def test_lora_adapters_merge_on_the_full_delta(tmp_path, capsys):
    dirs = []
    for seed in (1, 2):
        dirs.append(str(tmp_path / f"a{seed}"))
        save_adapters(lora_model(seed), dirs[-1])
    assert main(["merge", "average", *dirs, "--out", str(tmp_path / "avg")]) == 0
    assert "keep 100.00%" in capsys.readouterr().out  # rank 2 + 2 holds the average exactly
    fresh = tiny_lm()
    adapters.attach(fresh, str(tmp_path / "avg"), DOMAINS)
    m1, m2 = lora_model(1), lora_model(2)
    for slot in range(2):
        expected = (m1.layers[0].attn.qkv.bank.delta_weight(slot) + m2.layers[0].attn.qkv.bank.delta_weight(slot)) / 2
        got = fresh.layers[0].attn.qkv.bank.delta_weight(slot)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    naive_A = (m1.layers[0].attn.qkv.bank.A_NIR + m2.layers[0].attn.qkv.bank.A_NIR) / 2
    naive_B = (m1.layers[0].attn.qkv.bank.B_NRO + m2.layers[0].attn.qkv.bank.B_NRO) / 2
    assert not torch.allclose((naive_A[0] @ naive_B[0]).t() * 8.0, expected, atol=1e-3)  # why: products, not factors
    assert main(["merge", "ties", *dirs, "--out", str(tmp_path / "ties"), "--rank", "1"]) == 0
    assert load_file(str(tmp_path / "ties" / "adapters.safetensors"))["layers.0.attn.qkv.bank.A_NIR"].shape[-1] == 1


def test_whole_models_merge_from_the_command_line(tmp_path):
    paths = []
    for seed in (0, 1, 2):
        paths.append(str(tmp_path / f"m{seed}.safetensors"))
        save_model_weights(tiny_lm(seed).state_dict(), paths[-1])
    out = tmp_path / "ta.safetensors"
    assert main(["merge", "task_arithmetic", paths[1], paths[2], "--base", paths[0], "--lam", "0.5",
                 "--out", str(out)]) == 0
    states = [load_file(p) for p in paths]
    got = load_file(str(out))["layers.0.ffn.up.weight"]
    key = "layers.0.ffn.up.weight"
    torch.testing.assert_close(got, states[0][key] + 0.5 * (states[1][key] + states[2][key] - 2 * states[0][key]))
    assert main(["merge", "ties", str(tmp_path / "missing"), "--out", str(out)]) == 2


ROUTERS = [("topk", 2, {}), ("topk", 1, {"normalize": True}), ("example", 2, {"allow_noncausal": True}),
           ("task", 2, {}), ("task", 2, {"task_table": [[0, 1], [2, 3], [1, 2]]})]
# Not expert_choice: a token may be picked by no expert, or by several with weights that do not sum to 1.


@pytest.mark.parametrize("router,top_k,extra", ROUTERS, ids=[f"{r}-k{k}-{len(e)}" for r, k, e in ROUTERS])
def test_upcycled_moe_with_identical_experts_equals_the_dense_model(tmp_path, router, top_k, extra):
    dense = tiny_lm()
    tokens, domains = batch()
    sets = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=16",
            "data.seq_len=16", "moe.num_experts=4", f"moe.top_k={top_k}", "parallel.ep_size=1",
            f"moe.router={dict(type=router, **extra)}", *(["moe.balance.losses=[]"] if "task_table" in extra else [])]
    cfg = load_config(None, sets)
    moe = TransformerLM(cfg.model, cfg.moe, num_domains=len(DOMAINS))
    moe.load_state_dict(upcycle(dense.state_dict(), cfg, noise_std=0.0))
    out = moe(tokens, domains)
    assert len(out.routings) == 2
    torch.testing.assert_close(out.logits_BSV, logits(dense, tokens, domains), rtol=1e-5, atol=1e-5)


def test_upcycle_from_the_command_line_adds_noise_and_loads(tmp_path):
    dense_path, out = str(tmp_path / "dense.safetensors"), str(tmp_path / "moe.safetensors")
    save_model_weights(tiny_lm().state_dict(), dense_path)
    sets = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=16",
            "data.seq_len=16", "moe.num_experts=4", "parallel.ep_size=1", "moe.every=2"]
    args = ["merge", "upcycle", "--base", dense_path, "--out", out, "--noise-std", "0.01"]
    assert main(args + [x for s in sets for x in ("--set", s)]) == 0
    cfg = load_config(None, sets)
    moe = TransformerLM(cfg.model, cfg.moe, num_domains=len(DOMAINS))
    load_model_weights(moe, out)
    bank = moe.layers[0].ffn.experts.w_up_EDF
    assert bank.shape[0] == 4 and not torch.equal(bank[0], bank[1])
    torch.testing.assert_close(bank[0], tiny_lm().layers[0].ffn.up.weight.t(), atol=1e-3, rtol=0)
