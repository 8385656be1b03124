"""Merging agrees with PEFT (``peft.utils.merge_utils``, exactly, DARE with the same RNG) and with a
direct re-computation of mergekit's generalized task arithmetic (exactly too); trimming is per slot and per expert."""
import importlib.util
import os

import pytest
import torch
from safetensors.torch import load_file

from moe_sys.adapters.io import save_adapters
from moe_sys.adapters.merge import MergeOptions, merge_states
from moe_sys.cli import main
from tests.unit.test_merge import lora_model


def _load_peft_merge_utils():
    """peft/utils/merge_utils.py alone (it imports only torch): importing the peft package would pull
    in transformers for nothing."""
    root = importlib.util.find_spec("peft").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("peft_merge_utils", os.path.join(root, "utils", "merge_utils.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PEFT = _load_peft_merge_utils()
WEIGHTS = [0.3, 1.7, 0.9]


def taus(shape, seed, count=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(count)]


def ours(method, tensors, key="w", **opts):
    return merge_states([{key: t} for t in tensors], MergeOptions(method, **opts))[key]


def peft(method, tensors, weights, density, seed=None, sign="total"):
    if seed is not None:
        torch.manual_seed(seed)
    w = torch.tensor(weights)
    fn = getattr(PEFT, method)
    if method == "task_arithmetic":
        return fn(tensors, w)
    if method in ("ties", "dare_ties"):
        return fn(tensors, w, density, majority_sign_method=sign)
    return fn(tensors, w, density)


@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("method", ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"])
def test_matches_peft_exactly(method, sign):
    for shape, density, seed in (((100,), 0.07, 1), ((24, 40), 0.3, 2), ((5, 7, 9), 0.55, 3)):
        tensors = taus(shape, seed)
        got = ours(method, tensors, weights=WEIGHTS, density=density, seed=seed, majority_sign=sign)
        assert torch.equal(got, peft(method, tensors, WEIGHTS, density, seed, sign)), (method, shape)


def test_dare_draws_as_peft_across_tensors():
    """One generator for the whole merge, tensors in order: PEFT called tensor by tensor after one seed."""
    a, b = taus((30, 20), 4), taus((50,), 5)
    got = merge_states([{"a": x, "b": y} for x, y in zip(a, b)], MergeOptions("dare_ties", WEIGHTS, density=0.4, seed=9))
    torch.manual_seed(9)
    assert torch.equal(got["a"], PEFT.dare_ties(a, torch.tensor(WEIGHTS), 0.4))
    assert torch.equal(got["b"], PEFT.dare_ties(b, torch.tensor(WEIGHTS), 0.4))


def test_trim_keeps_int_density_n():
    tensors = taus((100,), 6, count=1)
    assert int(ours("magnitude_prune", tensors, density=0.07).count_nonzero()) == 7  # ceil(0.07 * 100) = 8


def mergekit_gta(method, tensors, weights, density, seed):
    """mergekit's GTATask.execute + sparsify.magnitude / bernoulli + get_mask, written out for one
    tensor (arcee-ai/mergekit a6e4028, mergekit/merge_methods/generalized_task_arithmetic.py)."""
    consensus = method in ("ties", "dare_ties")
    normalize = method == "ties"
    torch.manual_seed(seed)
    deltas = []
    for delta in tensors:
        if method in ("ties", "magnitude_prune"):
            mask = torch.zeros_like(delta)
            mask.view(-1)[torch.argsort(delta.abs().view(-1), descending=True)[:int(density * delta.numel())]] = 1
            delta = delta * mask
        elif method.startswith("dare"):
            masked = delta * torch.bernoulli(torch.full_like(delta, density))
            before, after = delta.abs().sum(), masked.abs().sum()
            delta = masked if before < 1e-7 or after < 1e-7 else masked * (before / after)
        deltas.append(delta)
    deltas = torch.stack(deltas)
    w = torch.tensor(weights).view(-1, *[1] * (deltas.dim() - 1))
    weighted = deltas * w
    if consensus:
        majority = (weighted.sum(0) >= 0).float() * 2 - 1
        mask = weighted.sign() == majority
        mixed, divisor = (weighted * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(0), w.sum(0)
    return mixed / divisor if normalize else mixed


@pytest.mark.parametrize("method", ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"])
def test_matches_mergekit(method):
    weights = [0.3, -0.6, 1.4]  # a negative weight flips that model's vote in mergekit's election
    for shape, density, seed in (((100,), 0.07, 1), ((24, 40), 0.3, 2)):
        tensors = taus(shape, seed)
        got = ours(method, tensors, weights=weights, density=density, seed=seed, convention="mergekit")
        assert torch.equal(got, mergekit_gta(method, tensors, weights, density, seed)), (method, shape)


def test_conventions_differ_with_unequal_weights():
    tensors = taus((24, 40), 7)
    for method in ("ties", "dare_ties"):
        by = {c: ours(method, tensors, weights=[0.2, 3.0, 1.0], density=0.4, convention=c) for c in ("peft", "mergekit")}
        assert not torch.allclose(by["peft"], by["mergekit"]), method
    ones = {c: ours("ties", tensors, density=0.4, convention=c) for c in ("peft", "mergekit")}
    assert torch.equal(ones["peft"], ones["mergekit"])  # weights of 1: count = sum of the agreeing weights


@pytest.mark.parametrize("key, shape, units", [("bank.A_NIR", (3, 16, 8), 3), ("experts.w_up_EDF", (4, 8, 12), 4),
                                               ("bank.delta_NW", (2, 50), 2), ("router.weight", (4, 30), 1),
                                               ("balance.bias_E", (40,), 1)])
def test_trims_each_slot_and_expert_alone(key, shape, units):
    """A unit with large entries does not eat the others' budget: each keeps int(density * n) of its own."""
    scale = torch.tensor([4.0 ** i for i in range(shape[0])]).view(-1, *[1] * (len(shape) - 1))
    tensors = [t * scale for t in taus(shape, 8)]
    per_unit = [t.reshape(units, -1) for t in tensors]
    got = ours("ties", tensors, key=key, weights=WEIGHTS, density=0.3).reshape(units, -1)
    for u in range(units):
        assert torch.equal(got[u], peft("ties", [t[u] for t in per_unit], WEIGHTS, 0.3))
    kept = ours("magnitude_prune", tensors[:1], key=key, density=0.3).reshape(units, -1).count_nonzero(-1)
    assert kept.tolist() == [int(0.3 * per_unit[0].shape[1])] * units


def test_multi_slot_lora_merges_per_slot_through_the_cli(tmp_path):
    dirs = []
    for seed in (1, 2):
        dirs.append(str(tmp_path / f"a{seed}"))
        save_adapters(lora_model(seed), dirs[-1])
    out = tmp_path / "ties"
    assert main(["merge", "ties", *dirs, "--out", str(out), "--density", "0.3", "--weights", "0.5", "2",
                 "--rank", "32"]) == 0  # rank 32 = min(I, O) of qkv: the factors hold the merged delta exactly
    key = "layers.1.attn.qkv.bank."
    inputs = [load_file(os.path.join(d, "adapters.safetensors")) for d in dirs]
    merged = load_file(str(out / "adapters.safetensors"))
    products = [s[key + "A_NIR"] @ s[key + "B_NRO"] for s in inputs]
    got = merged[key + "A_NIR"] @ merged[key + "B_NRO"]
    for slot in range(2):
        expected = PEFT.ties([p[slot] for p in products], torch.tensor([0.5, 2.0]), 0.3)
        torch.testing.assert_close(got[slot], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flag", [["--convention", "mergekt"], ["--density", "0"], ["--majority-sign", "most"],
                                  ["--weights", "1", "2", "3"]])
def test_bad_merge_options_fail_with_one_line(tmp_path, capsys, flag):
    dirs = []
    for seed in (1, 2):
        dirs.append(str(tmp_path / f"a{seed}"))
        save_adapters(lora_model(seed), dirs[-1])
    assert main(["merge", "ties", *dirs, "--out", str(tmp_path / "out"), *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "out").exists()
