"""MoE layer forward+backward: moe_sys's MoELayer vs DeepSpeed's MoE vs an HF-style per-expert loop vs
a dense FFN with the same active FLOPs (the floor no MoE layer can beat).

Run from the repository root: ``python -m bench.moe_layer [--quick] [--no-write]``.

Legend: B batch, S sequence, T = B*S tokens, D model dim, F expert hidden dim, E experts, K top-k.
All contenders use SwiGLU experts in fp32 and the loss y.square().mean(); each point is the median of
interleaved repeats of forward + backward (parameter gradients included).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict

if __package__ in (None, ""):  # `python bench/moe_layer.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import common
from moe_sys import ops


class SwiGLU(nn.Module):
    def __init__(self, D: int, F_: int):
        super().__init__()
        self.gate, self.up, self.down = (nn.Linear(D, F_, bias=False), nn.Linear(D, F_, bias=False),
                                         nn.Linear(F_, D, bias=False))

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LoopMoE(nn.Module):
    """The Hugging Face pattern (Mixtral's sparse block up to transformers 4.45): softmax top-k, then a
    Python loop over experts, each gathering its tokens with where() and adding back with index_add_."""

    def __init__(self, D: int, F_: int, E: int, K: int):
        super().__init__()
        self.K = K
        self.router = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(SwiGLU(D, F_) for _ in range(E))

    def forward(self, x_BSD):
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        weights_TK, ids_TK = self.router(x_TD).softmax(-1).topk(self.K, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        y_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids_TK == e)
            if token.numel():
                y_TD.index_add_(0, token, expert(x_TD[token]) * weights_TK[token, slot, None])
        return y_TD.view_as(x_BSD)


def _deepspeed_moe(D: int, F_: int, E: int, K: int) -> nn.Module:
    """deepspeed.moe.layer.MoE (capacity factor 1.25, its default token dropping) in a 1-rank gloo world."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import deepspeed
        from deepspeed.moe.layer import MoE
    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="gloo")
    moe = MoE(D, SwiGLU(D, F_), num_experts=E, ep_size=1, k=K, capacity_factor=1.25, min_capacity=0)
    moe.set_deepspeed_parallelism()
    return moe


def contenders(D: int, F_: int, E: int, K: int) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> forward returning y_BSD; all built from the same seed."""
    from moe_sys.moe.layer import MoELayer

    torch.manual_seed(0)
    ours, ds, loop, dense = MoELayer(D, F_, E, K), _deepspeed_moe(D, F_, E, K), LoopMoE(D, F_, E, K), SwiGLU(D, F_ * K)

    def with_impl(impl):
        def run(x):
            ops.set_impl(impl)
            return ours(x)[0]
        return run

    return {"moe_sys (kernel ops)": with_impl("kernel"), "moe_sys (reference ops)": with_impl("reference"),
            "deepspeed MoE": lambda x: ds(x)[0], "HF-style loop": loop, "dense floor (F*K)": dense}


def step(forward: Callable, x_BSD: torch.Tensor) -> Callable[[], None]:
    def run():
        forward(x_BSD).square().mean().backward()
    return run


def bench(configs, reps: int) -> str:
    rows, headers = [], None
    for B, S, D, F_, E, K in configs:
        runs = contenders(D, F_, E, K)
        x_BSD = torch.randn(B, S, D, requires_grad=True)
        secs = common.time_interleaved({name: step(fn, x_BSD) for name, fn in runs.items()}, reps)
        ours, floor = secs["moe_sys (kernel ops)"], secs["dense floor (F*K)"]
        others = list(runs)[1:-1]
        headers = ["T", "D", "F", "E", "K", *[f"{n} ms" for n in runs], *[f"{n} / moe_sys" for n in others],
                   "moe_sys / dense floor"]
        rows.append([B * S, D, F_, E, K, *[common.median(secs[n]) * 1e3 for n in runs],
                     *[common.ratio(secs[n], ours) for n in others], common.ratio(ours, floor)])
        print(common.table(headers, rows[-1:]).splitlines()[-1], flush=True)
    return common.table(headers, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    common.set_malloc("warm")
    B, S, reps = (2, 512, 3) if args.quick else (4, 1024, 5)
    # Same active FLOPs per token: 8 experts top-2 of width 1024, or 64 fine-grained experts top-8 of width 256.
    result = bench([(B, S, 512, 1024, 8, 2), (B, S, 512, 256, 64, 8)], reps)
    print(result)
    if not args.no_write:
        common.write_section("moe-layer", "bench.moe_layer", result)


if __name__ == "__main__":
    main()
