"""``moe-sys generate``: sample text from a run dir, a `convert from-hf` dir or a Hugging Face dir, with a
key/value cache (the prompt is run once, then one token per step).

Legend: B batch (1 here), S positions, V vocab.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch

from moe_sys.models.transformer import KVCache, TransformerLM


def load_lm(path: str) -> Tuple[TransformerLM, object]:
    """(model in eval mode, tokenizer) from a Hugging Face dir (config.json) or a moe_sys dir (config.yaml)."""
    from moe_sys.config import load_config
    from moe_sys.data.bpe import BPETokenizer
    from moe_sys.data.tokenizer import ByteTokenizer
    from moe_sys.weights import hf_read
    from moe_sys.weights.io import read_model_weights

    if os.path.isfile(os.path.join(path, "config.json")):
        cfg, state = hf_read.read_hf_model(path)
    else:
        cfg = load_config(os.path.join(path, "config.yaml"))
        single = os.path.join(path, hf_read.SINGLE_FILE)
        state = read_model_weights(single if os.path.isfile(single) else path)
    if cfg.adapters.modules or cfg.adapters.load_from:
        raise ValueError(f"{path}: the model has adapters; merge them into the base first (moe-sys merge)")
    model = TransformerLM(cfg.model, cfg.moe, num_domains=len(cfg.data.domains))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    tok_path = os.path.join(path, "tokenizer.json")
    tokenizer = BPETokenizer(tok_path) if os.path.isfile(tok_path) else ByteTokenizer()
    if tokenizer.vocab_size > cfg.model.vocab_size:
        where = tok_path if isinstance(tokenizer, BPETokenizer) else f"{path}: no tokenizer.json, so bytes"
        raise ValueError(f"{where}: {tokenizer.vocab_size} ids but model.vocab_size={cfg.model.vocab_size}")
    return model.eval(), tokenizer


def sample(logits_V: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy at temperature 0; else nucleus sampling over the smallest set holding top_p of the mass."""
    if temperature <= 0:
        return int(logits_V.argmax())
    probs_V = torch.softmax(logits_V.float() / temperature, dim=-1)
    sorted_V, order_V = probs_V.sort(descending=True)
    keep_V = sorted_V.cumsum(0) - sorted_V < top_p  # always keeps the most likely token
    sorted_V = sorted_V * keep_V
    return int(order_V[torch.multinomial(sorted_V / sorted_V.sum(), 1, generator=generator)])


@torch.no_grad()
def generate(model: TransformerLM, prompt_ids, max_new_tokens: int, temperature: float = 0.8, top_p: float = 0.95,
             seed: int = 0, eod: int = None) -> list:
    """New token ids after ``prompt_ids`` (stops early at ``eod``)."""
    limit = model.rope_cos.shape[0]
    if len(prompt_ids) + max_new_tokens > limit:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {max_new_tokens} exceed "
                         f"model.max_seq_len={limit}")
    caches = [KVCache() for _ in model.layers]
    generator = torch.Generator().manual_seed(seed)
    tokens_BS = torch.tensor([list(prompt_ids)], dtype=torch.long)
    out = []
    for _ in range(max_new_tokens):
        logits_BSV = model(tokens_BS, caches=caches).logits_BSV
        nxt = sample(logits_BSV[0, -1], temperature, top_p, generator)
        if nxt == eod:
            break
        out.append(nxt)
        tokens_BS = torch.tensor([[nxt]], dtype=torch.long)
    return out


def run(path: str, prompt: str, max_new_tokens: int, temperature: float, top_p: float, seed: int) -> str:
    model, tokenizer = load_lm(path)
    ids = [int(i) for i in tokenizer.tokenize(prompt)]
    if not ids:
        raise ValueError("--prompt: empty after tokenisation")
    new = generate(model, ids, max_new_tokens, temperature, top_p, seed, eod=tokenizer.eod)
    return prompt + tokenizer.detokenize(new)
