"""Generation with a key/value cache: same logits as recomputing the whole sequence, and greedy decoding
of a converted Hugging Face model gives transformers' own greedy tokens."""
from __future__ import annotations

import pytest
import torch

from moe_sys.config import load_config
from moe_sys.models.generate import generate, sample
from moe_sys.models.transformer import KVCache, TransformerLM


def tiny_gqa_moe():
    cfg = load_config(None, ["model.vocab_size=300", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
                             "model.n_layers=2", "model.qk_norm=head", "moe.num_experts=4", "moe.top_k=2"])
    torch.manual_seed(0)
    return TransformerLM(cfg.model, cfg.moe, num_domains=3).eval()


def test_cached_steps_equal_the_full_forward():
    model = tiny_gqa_moe()
    tokens = torch.randint(0, 300, (2, 18), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens).logits_BSV
        caches = [KVCache() for _ in model.layers]
        parts = [model(tokens[:, :10], caches=caches).logits_BSV]
        parts.append(model(tokens[:, 10:13], caches=caches).logits_BSV)  # several new positions at once
        parts += [model(tokens[:, s:s + 1], caches=caches).logits_BSV for s in range(13, 18)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_nucleus_sampling_keeps_only_the_top_mass():
    logits = torch.tensor([3.0, 2.9, -5.0, -6.0])
    draws = {sample(logits, 1.0, 0.9, torch.Generator().manual_seed(s)) for s in range(40)}
    assert draws == {0, 1}
    assert sample(logits, 0.0, 0.9, torch.Generator()) == 0


def test_greedy_matches_transformers(tmp_path):
    import transformers
    from moe_sys.models.generate import load_lm

    torch.manual_seed(0)
    hf_cfg = transformers.Qwen3MoeConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8, intermediate_size=48, num_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=24, max_position_embeddings=64)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3)
    hf.save_pretrained(tmp_path)
    ours, _ = load_lm(str(tmp_path))
    prompt = [5, 17, 3, 42, 8]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(ours, prompt, 12, temperature=0.0) == expected
