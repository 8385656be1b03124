"""A LoRA trained on a converted model, exported in PEFT's format: PEFT on the exported base gives the
same logits; imported back, moe_sys gives them again (GQA, q/k/v biases: Qwen2)."""
from __future__ import annotations

import pytest
import torch

import transformers  # noqa: E402  (dev extra: a hard test dependency)
import peft  # noqa: E402

from moe_sys.adapters.inject import inject  # noqa: E402
from moe_sys.adapters.io import save_adapters  # noqa: E402
from moe_sys.cli import main  # noqa: E402
from moe_sys.config import load_config  # noqa: E402
from moe_sys.config.adapters import AdaptersConfig, LoRASpec  # noqa: E402
from moe_sys.models.transformer import TransformerLM  # noqa: E402
from moe_sys.weights.io import load_model_weights  # noqa: E402

DOMAINS = ["code", "prose", "data"]


def base_model(cfg):
    model = TransformerLM(cfg.model, cfg.moe, num_domains=3)
    load_model_weights(model, cfg.train.init_from)
    return model


def test_lora_round_trips_through_peft(tmp_path):
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ms")]) == 0
    cfg = load_config(str(tmp_path / "ms" / "config.yaml"))
    ours = base_model(cfg)
    spec = LoRASpec(name="a", rank=4, alpha=8.0, targets=["layers.*.attn.qkv", "layers.*.attn.proj", "layers.*.ffn.up"])
    inject(ours, AdaptersConfig(modules=[spec]), DOMAINS)
    with torch.no_grad():  # as if trained: B is no longer zero
        for name, p in ours.named_parameters():
            if ".bank." in name:
                p.normal_(0.0, 0.3)
    save_adapters(ours.eval(), str(tmp_path / "lora"))
    assert main(["convert", "lora-to-peft", str(tmp_path / "lora"), "--base", str(tmp_path / "ms"),
                 "--out", str(tmp_path / "peft")]) == 0

    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(tokens).logits_BSV
        with_peft = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
                                                   tmp_path / "peft").eval()
        assert (with_peft(tokens).logits - expected).abs().max() <= 1e-4
        assert (hf(tokens).logits - expected).abs().max() > 1e-2  # the LoRA changes the outputs

    assert main(["convert", "lora-from-peft", str(tmp_path / "peft"), "--base", str(tmp_path / "ms"),
                 "--out", str(tmp_path / "back")]) == 0
    again = base_model(cfg)
    inject(again, AdaptersConfig(load_from=str(tmp_path / "back")), DOMAINS)
    with torch.no_grad():
        assert (again.eval()(tokens).logits_BSV - expected).abs().max() <= 1e-4
