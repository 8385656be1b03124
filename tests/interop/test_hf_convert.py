"""Hugging Face <-> moe_sys conversion, per family: random tiny HF models (GQA, several layers, 20
positions: the rotary convention is exact only at position 0) converted through the CLI.

moe_sys logits must equal transformers' (fp32, 1e-4), the exported dir must load in transformers with
the same logits, and the weights must round-trip bit for bit.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

import transformers  # noqa: E402  (dev extra: a hard test dependency)
from safetensors.torch import load_file, save_file  # noqa: E402

from moe_sys.cli import main  # noqa: E402
from moe_sys.config import load_config  # noqa: E402
from moe_sys.config.loader import apply_override  # noqa: E402
from moe_sys.models.transformer import TransformerLM  # noqa: E402
from moe_sys.weights.io import load_model_weights  # noqa: E402

V = 300  # >= 256: the default (embedded, byte-level) data must fit the vocabulary
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, max_position_embeddings=64)
MOE = dict(num_experts=4, num_experts_per_tok=2)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=True),
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**COMMON, **MOE, moe_intermediate_size=24,
                                                     shared_expert_intermediate_size=40, mlp_only_layers=[1]),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**COMMON, **MOE, moe_intermediate_size=24, head_dim=16,
                                                     decoder_sparse_step=2, norm_topk_prob=True),
    "olmoe": lambda: transformers.OlmoeConfig(**COMMON, **MOE, norm_topk_prob=False),
}


def tiny_hf(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[kind]()).eval()
    with torch.no_grad():  # norms near 1 and large weights, so a wrong mapping shows in the logits
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3)
    return model


def logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out.logits_BSV if hasattr(out, "logits_BSV") else out.logits


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_family_round_trip(kind, tmp_path):
    hf_model = tiny_hf(kind)
    hf_model.save_pretrained(tmp_path / "hf")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ms")]) == 0
    cfg = load_config(str(tmp_path / "ms" / "config.yaml"))
    ours = TransformerLM(cfg.model, cfg.moe, num_domains=len(cfg.data.domains)).eval()
    load_model_weights(ours, cfg.train.init_from)
    tokens = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    expected = logits(hf_model, tokens)
    diff_S = (logits(ours, tokens) - expected).abs().amax(dim=(0, 2))
    assert diff_S.max() <= 1e-4, diff_S
    assert expected[:, 1:].abs().max() > 1.0  # not a degenerate model where every position agrees trivially
    direct = TransformerLM(cfg.model, cfg.moe, num_domains=len(cfg.data.domains))
    load_model_weights(direct, str(tmp_path / "hf"))  # train.init_from: HF_DIR reads the same weights
    assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(), ours.state_dict().values()))

    assert main(["convert", "to-hf", str(tmp_path / "ms"), "--out", str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back) is type(hf_model)
    assert torch.equal(logits(back, tokens), expected)
    before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fused_and_sharded_checkpoints_read_the_same(tmp_path):
    hf_model = tiny_hf("mixtral")
    hf_model.save_pretrained(tmp_path / "per_expert")
    hf_model.save_pretrained(tmp_path / "fused", save_original_format=False, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "fused" / "model.safetensors.index.json")
    fused_keys = json.load(open(tmp_path / "fused" / "model.safetensors.index.json"))["weight_map"]
    assert any(k.endswith("experts.gate_up_proj") for k in fused_keys)
    for name in ("per_expert", "fused"):
        assert main(["convert", "from-hf", str(tmp_path / name), "--out", str(tmp_path / f"{name}-ms")]) == 0
    a = load_file(tmp_path / "per_expert-ms" / "model.safetensors")
    b = load_file(tmp_path / "fused-ms" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _refused(capsys, tmp_path, *needles):
    capsys.readouterr()  # drop what saving the fixture printed
    code = main(["convert", "from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert not os.path.exists(tmp_path / "out")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".convert-")]


def _edit_config(tmp_path, drop=(), **fields):
    path = tmp_path / "hf" / "config.json"
    cfg = json.load(open(path))
    cfg.update(fields)
    for key in drop:
        del cfg[key]
    json.dump(cfg, open(path, "w"))


def test_bad_checkpoints_are_refused_in_one_line(tmp_path, capsys):
    hf_model = tiny_hf("llama")
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    index = json.load(open(tmp_path / "hf" / "model.safetensors.index.json"))
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.rename(tmp_path / "hf" / shard, tmp_path / shard)
    _refused(capsys, tmp_path, shard, "missing shard")
    os.rename(tmp_path / shard, tmp_path / "hf" / shard)

    state = load_file(tmp_path / "hf" / shard)
    key = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != key}, tmp_path / "hf" / shard)
    _refused(capsys, tmp_path, shard, key)
    state[key] = torch.zeros(3, *state[key].shape[1:])
    save_file(state, tmp_path / "hf" / shard)
    _refused(capsys, tmp_path, shard, key, "shape")


@pytest.mark.parametrize("fields, drop, needles", [
    ({"model_type": "gpt_oss"}, [], ["config.json", "model_type='gpt_oss'", "not supported"]),
    ({"model_type": "deepseek_v3"}, [], ["config.json", "multi-head latent attention"]),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, [], ["config.json", "'yarn'"]),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, ["rope_parameters"], ["rope_scaling", "'linear'"]),
    ({"hidden_act": "gelu"}, [], ["config.json", "hidden_act"]),
    ({}, ["num_attention_heads"], ["config.json", "num_attention_heads"]),
])
def test_config_fields_we_cannot_express_are_refused(tmp_path, capsys, fields, drop, needles):
    tiny_hf("llama").save_pretrained(tmp_path / "hf")
    _edit_config(tmp_path, drop, **fields)
    _refused(capsys, tmp_path, *needles)


def test_sliding_window_is_refused(tmp_path, capsys):
    tiny_hf("mixtral").save_pretrained(tmp_path / "hf")
    _edit_config(tmp_path, sliding_window=8)
    _refused(capsys, tmp_path, "config.json", "sliding_window")


NONCAUSAL = ["moe.router.allow_noncausal=true", "moe.router.normalize=null"]


@pytest.mark.parametrize("overrides, needle", [
    (["moe.router.type=expert_choice", *NONCAUSAL], "moe.router.type"),
    (["moe.router.type=example", *NONCAUSAL], "moe.router.type"),
    (["moe.balance.bias.enabled=true"], "moe.balance.bias"),
    (["moe.router.score=sigmoid"], "moe.router.score"),
])
def test_export_refuses_what_the_family_cannot_express(tmp_path, capsys, overrides, needle):
    tiny_hf("mixtral").save_pretrained(tmp_path / "hf")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ms")]) == 0
    path = tmp_path / "ms" / "config.yaml"
    raw = yaml.safe_load(open(path).read())
    for item in overrides:
        apply_override(raw, item)
    yaml.safe_dump(raw, open(path, "w"))
    capsys.readouterr()
    code = main(["convert", "to-hf", str(tmp_path / "ms"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not os.path.exists(tmp_path / "out")
