"""Peak memory of one forward + backward with and without activation checkpointing
(``train.activation_checkpointing``: none | full | moe), single process, CPU, fp32.

Usage: python -m bench.activation_memory [CONFIG] [--set key=value ...] [--batch B] [--write]
Peak = resident bytes above those held before the step (bench.common.peak_bytes), so the model's
weights are excluded and the figure is activations + gradients + temporaries.
"""
from __future__ import annotations

import argparse

import torch

from bench.common import peak_bytes, set_malloc, table, write_section
from moe_sys.config import load_config
from moe_sys.models.transformer import TransformerLM, lm_loss
from moe_sys.moe import observe, recompute

# A small model whose activations dominate: 4 layers, E=16 experts, K=4, 2048 tokens per step.
DEFAULT_SETS = ["model.d_model=256", "model.n_layers=4", "model.n_heads=4", "model.d_ff=512", "model.max_seq_len=512",
                "moe.num_experts=16", "moe.top_k=4", "data.seq_len=512", "parallel.ep_size=1"]


def _step(model, tokens_BS):
    def run():
        model.zero_grad(set_to_none=True)
        out = model(tokens_BS)
        loss = lm_loss(out.logits_BSV, tokens_BS, torch.ones_like(tokens_BS))
        (loss + sum(observe.router_losses(out.routings).values())).backward()
    return run


def measure(cfg, batch: int, mode: str):
    torch.manual_seed(0)
    model = TransformerLM(cfg.model, cfg.moe, num_domains=len(cfg.data.domains))
    recompute.enable(model, mode)
    tokens_BS = torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len))
    return peak_bytes(_step(model, tokens_BS))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tiny.yaml")
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--write", action="store_true", help="record the table in docs/benchmarks.md")
    args = parser.parse_args(argv)
    set_malloc("exact")
    cfg = load_config(args.config, DEFAULT_SETS + args.sets, world_size=1)
    rows, base = [], None
    for mode in ("none", "full", "moe"):
        peak = measure(cfg, args.batch, mode)
        base = base or peak
        rows.append([mode, peak / 2**20, peak / base])
        print(rows[-1], flush=True)
    m = cfg.model
    body = (f"D={m.d_model}, F={cfg.moe.d_expert or m.d_ff}, {m.n_layers} layers, E={cfg.moe.num_experts}, "
            f"K={cfg.moe.top_k}, {args.batch}x{cfg.data.seq_len} tokens, fp32.\n\n"
            + table(["activation_checkpointing", "peak MiB (fwd+bwd)", "vs none"], rows))
    print(body)
    if args.write:
        write_section("activation_memory", "bench.activation_memory", body)


if __name__ == "__main__":
    main()
