"""End to end: `moe-sys train` fine-tunes adapters from a base model file on 2 EP ranks; the base stays
frozen, the adapters are saved alone and reload, validation is reported per domain."""
import json

import torch

from moe_sys.adapters import inject
from moe_sys.weights.io import read_model_weights, save_model_weights
from moe_sys.config import load_config
from moe_sys.models.transformer import TransformerLM
from tests.e2e.conftest import TINY, read_metrics, run_cli

MODULES = [{"type": "lora", "name": "dom", "targets": ["layers.*.attn.qkv"], "slots": ["code", "prose", "data"],
            "select": "domain"},
           {"type": "mixture", "name": "moe", "targets": ["layers.1.ffn"], "num_experts": 4, "top_k": 2},
           {"type": "smear", "name": "smear", "targets": ["layers.3.ffn"], "num_experts": 4, "segments": 4}]


def test_adapters_train_on_a_frozen_base_and_save_alone(tmp_path, quick_sets):
    cfg = load_config(TINY, ["moe.enabled=false"])
    torch.manual_seed(0)
    base = TransformerLM(cfg.model, cfg.moe, num_domains=3)
    save_model_weights(base.state_dict(), str(tmp_path / "base.safetensors"))
    run_dir = tmp_path / "run"
    proc = run_cli("train", TINY, *quick_sets, "--set", "moe.enabled=false", "--set", "train.steps=4",
                   "--set", "train.eval_every=4", "--set", f"train.init_from={tmp_path / 'base.safetensors'}",
                   "--set", f"adapters.modules={json.dumps(MODULES)}", "--set", f"logging.run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "adapters ['dom', 'moe', 'smear']:" in proc.stderr and "trainable of" in proc.stderr
    last = read_metrics(run_dir)[-1]
    assert set(last["val_loss_domain"]) == {"code", "prose", "data"} and len(last["expert_load"]) == 2
    saved = read_model_weights(str(run_dir))  # the DeepSpeed checkpoint, experts from both ranks
    wrapped = {"layers.1.ffn.": "layers.1.ffn.base_layer.", "layers.3.ffn.": "layers.3.ffn.base_layer.",
               "attn.qkv.": "attn.qkv.base_layer."}
    for key, weight in base.state_dict().items():
        for old, new in wrapped.items():
            key = key.replace(old, new)
        assert torch.equal(saved[key], weight), key
    assert saved["layers.1.ffn.experts.gate.A_NIR"].shape[0] == 4
    model = TransformerLM(cfg.model, cfg.moe, num_domains=3)
    model.load_state_dict(base.state_dict())
    inject.attach(model, str(run_dir / "adapters"), ["code", "prose", "data"])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
