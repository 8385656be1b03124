"""MoE layer forward+backward: moe_sys's MoELayer vs DeepSpeed's MoE vs an HF-style per-expert loop vs
a dense FFN with the same active FLOPs (the floor no MoE layer can beat).

Run from the repository root: ``python -m bench.moe_layer [--quick] [--d-model D] [--reps N] [--no-write]``.
On a GPU: ``python -m bench.moe_layer --device cuda --dtype bf16 --d-model 1024 --tokens 16384 --experts 8 64 256
--top-k 2 --no-write --json out.json`` (bench/gpu/run.sh does this).

Legend: B batch, S sequence, T = B*S tokens, D model dim, F expert hidden dim, E experts, K top-k.
All contenders use SwiGLU experts in one dtype (fp32 unless --dtype) and the loss y.square().mean(); each point is the median of
interleaved repeats of forward + backward (parameter gradients included). moe_sys runs dropless with
the compiled ops; DeepSpeed drops at capacity factor 1.25 (its default), so it computes up to 1.25x
the expert rows. The full grid takes about 10 minutes on a quiet 2-core machine (D=256; --d-model changes D).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional

if __package__ in (None, ""):  # `python bench/moe_layer.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import common
from moe_sys import ops
from moe_sys.parallel.groups import init_distributed


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
    """deepspeed.moe.layer.MoE (capacity factor 1.25, its default token dropping) in a 1-rank world
    (gloo on CPU, nccl on a GPU: its all-to-all runs on the tensors' device)."""
    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        init_distributed()  # nccl on a GPU, else gloo
    moe = deepspeed_moe(D, SwiGLU(D, F_), E, K, ep_size=1, capacity_factor=1.25, min_capacity=0)
    moe.set_deepspeed_parallelism()
    return moe


def deepspeed_moe(D: int, expert: nn.Module, E: int, K: int, ep_size: int, capacity_factor: Optional[float],
                  min_capacity: int, **options) -> nn.Module:
    """deepspeed.moe.layer.MoE around ``expert`` (copied once per local expert); capacity_factor None
    = DeepSpeed's drop_tokens=False (capacity = the busiest expert's count, max over the EP group)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from deepspeed.moe.layer import MoE
    return MoE(D, expert, num_experts=E, ep_size=ep_size, k=K, capacity_factor=capacity_factor or 1.0,
               min_capacity=min_capacity, drop_tokens=capacity_factor is not None, **options)


class DenseFloor(nn.Module):
    """The same expert FLOPs as one dense SwiGLU over T*K rows (input x_RD, R = T*K): the floor no MoE
    layer can beat. With ``router`` it also runs the router's [D, E] linear, softmax and max over the T
    tokens x_TD, the one compute cost every MoE layer adds on top of its experts' FLOPs; each token's top
    probability is added to its K rows so the router's backward runs too."""

    def __init__(self, D: int, F_: int, E: int, router: bool):
        super().__init__()
        self.mlp = SwiGLU(D, F_)
        self.router = nn.Linear(D, E, bias=False) if router else None

    def forward(self, x_RD, x_TD):
        y_RD = self.mlp(x_RD)
        if self.router is None:
            return y_RD
        top_T = self.router(x_TD).softmax(-1).amax(-1)
        return (y_RD.view(x_TD.shape[0], -1, y_RD.shape[-1]) + top_T[:, None, None]).view_as(y_RD)


OURS, FLOOR, FLOOR_ROUTER = "moe_sys", "dense floor", "dense floor + router"


def contenders(D: int, F_: int, E: int, K: int) -> Dict[str, nn.Module]:
    """name -> module; the MoE layers take x_BSD, the floors (x_RD, x_TD). All built from one seed."""
    from moe_sys.moe.layer import MoELayer

    torch.manual_seed(0)
    return {OURS: MoELayer(D, F_, E, K), "deepspeed MoE": _deepspeed_moe(D, F_, E, K),
            "HF-style loop": LoopMoE(D, F_, E, K), FLOOR: DenseFloor(D, F_, E, router=False),
            FLOOR_ROUTER: DenseFloor(D, F_, E, router=True)}


def step(module: nn.Module, *inputs: torch.Tensor) -> Callable[[], None]:
    """One training step's compute: gradients reset to None as an optimizer's zero_grad does, so no
    contender pays for accumulating into last step's gradients. MoE layers return (y, extras...)."""
    def run():
        module.zero_grad(set_to_none=True)
        y = module(*inputs)
        (y[0] if isinstance(y, tuple) else y).square().mean().backward()
    return run


def grid(D: int, quick: bool, tokens=None, experts=None, top_k=None):
    """(T, F, E, K) points: the issue's grid, coarse (F=4D) and fine-grained (F=D/2) experts; the
    tokens/experts/top_k lists, where given, replace the grid's own."""
    Ts, Es, Ks = ((1024,), (8, 64), (1, 2)) if quick else ((4096, 16384), (8, 64, 256), (1, 2, 8))
    Ts, Es, Ks = tokens or Ts, experts or Es, top_k or Ks
    return [(T, F_, E, K) for T in Ts for F_ in (4 * D, D // 2) for E in Es for K in Ks]


def bench(points, D: int, reps: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(headers, rows) of the grid; modules are built on ``device`` (no host copy of E experts) in ``dtype``."""
    rows, headers = [], None
    for T, F_, E, K in points:
        with torch.device(device):
            modules = {name: m.to(dtype) for name, m in contenders(D, F_, E, K).items()}
            x_BSD = torch.randn(max(T // 1024, 1), min(T, 1024), D, dtype=dtype)
            floor_inputs = (torch.randn(T * K, D, dtype=dtype), x_BSD.view(T, D))
        steps = {name: step(m, *(floor_inputs if name in (FLOOR, FLOOR_ROUTER) else (x_BSD,)))
                 for name, m in modules.items()}
        secs = common.time_interleaved(steps, reps, warmup=1)
        del modules, steps
        peers = ["deepspeed MoE", "HF-style loop"]
        headers = ["T", "D", "F", "E", "K", *[f"{n} ms" for n in secs], *[f"{n} / moe_sys" for n in peers],
                   "moe_sys / dense floor", "moe_sys / (dense floor + router)"]
        rows.append([T, D, F_, E, K, *[common.median(v) * 1e3 for v in secs.values()],
                     *[common.ratio(secs[n], secs[OURS]) for n in peers],
                     common.ratio(secs[OURS], secs[FLOOR]), common.ratio(secs[OURS], secs[FLOOR_ROUTER])])
        print(common.table(headers, rows[-1:]).splitlines()[-1], flush=True)
    return headers, rows


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small grid (T=1024, E in {8, 64}, K in {1, 2})")
    parser.add_argument("--d-model", type=int, default=256, help="model dim D (default 256)")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds per point, after one warm-up round")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--tokens", type=int, nargs="+", help="T values, replacing the grid's")
    parser.add_argument("--experts", type=int, nargs="+", help="E values, replacing the grid's")
    parser.add_argument("--top-k", type=int, nargs="+", help="K values, replacing the grid's")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.d_model < 2 or args.d_model % 2:
        parser.error(f"--d-model must be an even number >= 2, got {args.d_model}")
    common.set_malloc("warm")
    ops.set_impl("kernel")
    points = grid(args.d_model, args.quick, args.tokens, args.experts, args.top_k)
    headers, rows = bench(points, args.d_model, args.reps, args.device, DTYPES[args.dtype])
    result = common.table(headers, rows)
    print(result)
    if args.json:
        Path(args.json).write_text(json.dumps([dict(zip(headers, row)) for row in rows], indent=1))
    if not args.no_write:
        common.write_section("moe-layer", "bench.moe_layer", result)


if __name__ == "__main__":
    main()
