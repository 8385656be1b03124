"""Adapters on the tiny LM: zero-init identity, merge/unmerge, stochastic gamma, mixed-adapter batches,
save/load round trips (single device; expert parallelism: tests/distributed/test_adapter_ep.py)."""
import pytest
import torch

from moe_sys.adapters import inject as adapters
from moe_sys.adapters.base import AdapterLayer
from moe_sys.config.adapters import AdaptersConfig
from moe_sys.adapters.io import save_adapters
from moe_sys.adapters.stochastic import StochasticAdapter
from moe_sys.config import load_config
from moe_sys.models.transformer import TransformerLM

DOMAINS = ["code", "prose", "data"]
SLOTTED = {"select": "domain", "slots": ["code", "prose"]}  # domain "data" gets no adapter
ZERO_INIT = [
    {"type": "lora", "name": "a", "rank": 4, "dropout": 0.1},
    {"type": "lora", "name": "a", "rslora": True, "targets": ["layers.*.ffn.gate", "layers.*.ffn.down"]},
    {"type": "bottleneck", "name": "a", "targets": ["layers.*.attn", "layers.*.ffn"]},
    {"type": "bottleneck", "name": "a", "placement": "parallel", "scale": 4.0},
    {"type": "stochastic", "name": "a", "p_drop": 0.5},
    {"type": "ia3", "name": "a"},
    {"type": "mixture", "name": "a", "expert": {"kind": "lora", "rank": 4}},
    {"type": "mixture", "name": "a", "top_k": 1, "expert": {"kind": "bottleneck"}, "router": {"type": "task"}},
    {"type": "smear", "name": "a", "segments": 4, "expert_dropout": 0.1},
    {"type": "smear", "name": "a", "allow_noncausal": True, "expert": {"kind": "bottleneck"}, "aggregation": "outputs"},
]


def tiny_lm(seed: int = 0, **moe) -> TransformerLM:
    overrides = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=16",
                 "data.seq_len=16", "parallel.ep_size=1", f"moe.enabled={bool(moe)}"]
    cfg = load_config(None, overrides + [f"moe.{k}={v}" for k, v in moe.items()])
    torch.manual_seed(seed)
    return TransformerLM(cfg.model, cfg.moe, num_domains=len(DOMAINS))


def batch(B: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 16), generator=g), torch.arange(B) % len(DOMAINS)


def add(model, *specs, load_from=None):
    cfg = AdaptersConfig.model_validate({"modules": list(specs), "load_from": load_from})
    return adapters.inject(model, cfg, DOMAINS)


@torch.no_grad()
def randomize(model, std: float = 0.2, seed: int = 3) -> None:
    """Move every adapter parameter off its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.modules():
        if isinstance(layer, AdapterLayer):
            for _, p in layer.adapter_parameters():
                p.add_(torch.randn(p.shape, generator=g) * std)


def logits(model, tokens, domains):
    return model(tokens, domains).logits_BSV


@pytest.mark.parametrize("spec", ZERO_INIT, ids=lambda s: f"{s['type']}-{len(s)}")
def test_zero_initialised_adapters_start_as_the_base_model(spec):
    tokens, domains = batch()
    model = tiny_lm()
    base = logits(model, tokens, domains)
    add(model, spec)
    assert torch.equal(logits(model, tokens, domains), base)
    assert {n for n, p in model.named_parameters() if p.requires_grad}, "adapters must be trainable"
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n or n.startswith("embed"))


def test_base_is_frozen_and_counts_are_logged(caplog):
    model = tiny_lm()
    total_before = sum(p.numel() for p in model.parameters())
    with caplog.at_level("INFO", logger="moe_sys"):
        add(model, {"type": "lora", "name": "a", "rank": 2})
    trainable, total = adapters.parameter_counts(model)
    assert trainable == 2 * (32 * 2 + 2 * 96 + 32 * 2 + 2 * 32)  # 2 layers x (A + B of qkv, A + B of proj)
    assert total == total_before + trainable
    assert f"{trainable:,} trainable of {total:,}" in caplog.text


@pytest.mark.parametrize("spec", [{"type": "lora", "name": "a", "targets": ["layers.*.attn.qkv", "layers.*.ffn.down"]},
                                  {"type": "ia3", "name": "a"}], ids=["lora", "ia3"])
def test_merge_gives_the_same_output_and_unmerge_restores_the_weights(spec):
    tokens, domains = batch()
    model = tiny_lm()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    add(model, {**spec, "slots": ["x", "y"], "active": "y"})
    randomize(model)
    unmerged = logits(model, tokens, domains)
    adapters.merge(model)
    assert not torch.equal(model.layers[0].attn.qkv.base_layer.weight, weights["layers.0.attn.qkv.weight"])
    torch.testing.assert_close(logits(model, tokens, domains), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="merged"):  # mixed batches need the adapter branch
        adapters.set_per_domain(model, "a", ["x", "y", None])
        logits(model, tokens, domains)
    adapters.set_active(model, "a", "y")
    adapters.unmerge(model)
    for name, p in model.named_parameters():
        if "base_layer" in name:
            torch.testing.assert_close(p, weights[name.replace("base_layer.", "")], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits(model, tokens, domains), unmerged, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["bottleneck", "stochastic", "prefix", "mixture", "smear"])
def test_adapters_that_change_the_computation_refuse_to_merge(kind):
    model = tiny_lm()
    add(model, {"type": kind, "name": "a", **({"segments": 4} if kind == "smear" else {})})
    with pytest.raises(TypeError, match="cannot be merged"):
        adapters.merge(model)


def test_stochastic_adapter_gamma_zero_is_the_block_and_eval_is_deterministic():
    model = tiny_lm()
    block = model.layers[0]
    x = torch.randn(8, 16, 32)
    cos, sin = model.rope_cos, model.rope_sin
    alone, _ = block(x, cos, sin, None)
    layer = StochasticAdapter(block, "s", ["s"], 32, dim=8, p_drop=1.0)
    randomize(layer)
    assert torch.equal(layer(x, cos, sin, None)[0], alone)  # training, every gamma = 0
    layer.eval()
    on = layer(x, cos, sin, None)[0]
    assert not torch.allclose(on, alone) and torch.equal(layer(x, cos, sin, None)[0], on)
    for rescale, kept_scale in ((True, 2.0), (False, 1.0)):
        layer.train()
        layer.p_drop, layer.rescale = 0.5, rescale
        torch.manual_seed(0)
        out = layer(x, cos, sin, None)[0]
        dropped = [torch.allclose(out[b], alone[b]) for b in range(8)]
        kept = [torch.allclose(out[b], alone[b] + kept_scale * (on[b] - alone[b]), atol=1e-6) for b in range(8)]
        assert all(d != k for d, k in zip(dropped, kept)) and any(dropped) and any(kept), (dropped, kept)


MIXABLE = [{"type": "lora", "name": "a"}, {"type": "bottleneck", "name": "a", "placement": "parallel"},
           {"type": "stochastic", "name": "a"}, {"type": "ia3", "name": "a"},
           {"type": "prefix", "name": "a", "length": 3, "reparam_dim": 8}]


@pytest.mark.parametrize("spec", MIXABLE, ids=lambda s: s["type"])
def test_mixed_adapter_batch_equals_each_example_with_its_adapter_alone(spec):
    tokens, domains = batch()
    model = tiny_lm()
    base = logits(model, tokens, domains)
    add(model, {**spec, **SLOTTED})
    randomize(model)
    model.eval()  # the stochastic adapter's gamma is 1
    mixed = logits(model, tokens, domains)
    for b, d in enumerate(domains.tolist()):
        adapters.set_active(model, "a", DOMAINS[d] if d < 2 else None)
        alone = logits(model, tokens[b:b + 1], domains[b:b + 1])
        torch.testing.assert_close(mixed[b:b + 1], alone, rtol=1e-5, atol=1e-5)
        if d == 2:
            torch.testing.assert_close(alone, base[b:b + 1], rtol=1e-5, atol=1e-5)
        else:
            assert not torch.allclose(alone, base[b:b + 1], atol=1e-4)


def test_per_domain_selection_trains_each_slot_only_on_its_domain():
    tokens, domains = batch()
    model = tiny_lm()
    add(model, {"type": "lora", "name": "a", **SLOTTED})
    randomize(model)
    domains = torch.zeros_like(domains)  # only "code" examples
    logits(model, tokens, domains).sum().backward()
    grad_NIR = model.layers[0].attn.qkv.bank.A_NIR.grad
    assert grad_NIR[0].abs().sum() > 0 and grad_NIR[1].abs().sum() == 0


def test_save_and_load_round_trip_onto_a_fresh_base(tmp_path):
    tokens, domains = batch()
    specs = [{"type": "lora", "name": "l", "targets": ["layers.*.attn.qkv"], **SLOTTED},
             {"type": "ia3", "name": "i", "targets": ["layers.*.attn.proj"], "slots": ["u", "v"], "active": "v"},
             {"type": "prefix", "name": "p", "length": 2},
             {"type": "mixture", "name": "m", "targets": ["layers.0.ffn"]},
             {"type": "smear", "name": "s", "segments": 2, "targets": ["layers.1.ffn"]},
             {"type": "bottleneck", "name": "b", "targets": ["layers.*"]}]  # wraps whole blocks, so it comes last
    model = tiny_lm()
    add(model, *specs)
    randomize(model)
    model.eval()
    expected = logits(model, tokens, domains)
    save_adapters(model, str(tmp_path / "ad"))
    fresh = tiny_lm()
    adapters.attach(fresh, str(tmp_path / "ad"), DOMAINS)
    fresh.eval()
    assert torch.equal(logits(fresh, tokens, domains), expected)
    with pytest.raises(ValueError, match="do not fit"):
        add(tiny_lm(), {"type": "lora", "name": "other"}, load_from=str(tmp_path / "ad"))


def test_prefix_starts_away_from_the_base_and_eject_keeps_its_output():
    tokens, domains = batch()
    model = tiny_lm()
    base = logits(model, tokens, domains)
    add(model, {"type": "prefix", "name": "p", "length": 4, "reparam_dim": 16})
    before = logits(model, tokens, domains)
    assert not torch.allclose(before, base, atol=1e-4)
    for layer in adapters.adapter_layers(model, "p"):
        layer.eject()
    assert not hasattr(model.layers[0].attn.bank, "mlp")
    torch.testing.assert_close(logits(model, tokens, domains), before)


def test_wrong_targets_fail_with_a_message():
    with pytest.raises(ValueError, match="matches no module"):
        add(tiny_lm(), {"type": "lora", "name": "a", "targets": ["layers.*.attn.q"]})
    with pytest.raises(TypeError, match="wrap Linear"):
        add(tiny_lm(), {"type": "lora", "name": "a", "targets": ["layers.*.attn"]})
    with pytest.raises(TypeError, match="no slots"):
        model = tiny_lm()
        add(model, {"type": "mixture", "name": "m"})
        adapters.set_active(model, "m", "x")
