"""Dispatch+combine benchmark: (a) throughput against memory-copy bandwidth, (c) peak memory as T grows.

Run from the repository root: ``python -m bench.dispatch [--quick] [--no-write]`` (or
``python bench/dispatch.py``). Tables are printed and written into docs/benchmarks.md. On a GPU:
``python -m bench.dispatch --device cuda --dtypes bf16 --tokens 32768 --d-model 2048 --no-memory --no-write
--json out.json`` (bench/gpu/run.sh does this); the memory table reads host memory, so it is CPU only.

Legend: T tokens, D model dim, E experts, K slots per token, C capacity, R routed rows.

Bytes moved by dispatch+combine = element size * D * (T read + R written + kept rows read + T written):
the same count for every contender, so GB/s compare like for like. The memory-copy baseline moves the
same number of bytes (half read, half written) with ``torch.Tensor.copy_`` into a preallocated buffer
and with ``clone`` (which, like every out-of-place op, also allocates its output).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):  # `python bench/dispatch.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import common
from bench.contenders import CAPACITY, DROPLESS, Case, deepspeed_dense, make_inputs
from moe_sys.ops import build, reference

BF16, FP32 = torch.bfloat16, torch.float32
DTYPES = {"bf16": BF16, "fp32": FP32}


def bytes_moved(case: Case, inputs) -> int:
    index = reference.build_index(inputs.expert_ids_TK, case.E, case.capacity)
    kept = int((index.dest_row_TK >= 0).sum())
    return inputs.x_TD.element_size() * case.D * (2 * case.T + index.num_rows + kept)


def copy_baselines(nbytes: int, device: str) -> Dict[str, callable]:
    src = torch.ones(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return {"copy_": lambda: dst.copy_(src), "clone": lambda: src.clone()}


def _check_agree(runs, first: str, others: List[str], dtype) -> None:
    """Contenders that keep the same slots must produce the same y_TD; a benchmark of wrong code is moot."""
    want = runs[first]().float()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == FP32 else dict(atol=2e-2, rtol=2e-2)
    for name in others:
        torch.testing.assert_close(runs[name]().float(), want, **tol, msg=lambda m: f"{name} vs {first}: {m}")


def throughput(cases: List[Case], contenders: Dict[str, callable], agree: List[str], base: str, reps: int):
    """(headers, rows): GB/s of every contender; the first one's fraction of copy bandwidth; speedups of ``base``."""
    names = list(contenders)
    lead, others = names[0], [n for n in names if n not in (names[0], base)]
    headers = ["dtype", "T", "D", "E", "K", "C", "copy_ GB/s", "clone GB/s", *[f"{n} GB/s" for n in names],
               f"{lead} / copy_", f"{lead} / clone", *[f"{base} speedup vs {n}" for n in others]]
    rows = []
    for case in cases:
        inputs = make_inputs(case)
        runs = {name: prepare(case, inputs) for name, prepare in contenders.items()}
        _check_agree(runs, lead, agree, case.dtype)
        nbytes = bytes_moved(case, inputs)
        secs = common.time_interleaved({**runs, **copy_baselines(nbytes, case.device)}, reps)
        gbs = {name: nbytes / common.median(s) / 1e9 for name, s in secs.items()}
        rows.append([str(case.dtype).removeprefix("torch."), case.T, case.D, case.E, case.K, case.capacity or "-",
                     gbs["copy_"], gbs["clone"], *[gbs[n] for n in names], common.ratio(secs["copy_"], secs[lead]),
                     common.ratio(secs["clone"], secs[lead]), *[common.ratio(secs[n], secs[base]) for n in others]])
        print(common.table(headers, rows[-1:]).splitlines()[-1], flush=True)
    return headers, rows


def memory(tokens: List[int], D: int, E: int, K: int, dense_limit: int) -> str:
    """Peak bytes above the inputs for one forward dispatch+combine, and that peak over T*K*D*elt."""
    contenders = {"ours (kernel), dropless": DROPLESS["ours (kernel)"],
                  "ours (kernel) + router, capacity": CAPACITY["ours (kernel) + router"],
                  "ours (reference), dropless": DROPLESS["ours (reference)"],
                  "megatron-core, dropless": DROPLESS["megatron-core"],
                  "deepspeed (sparse), capacity": CAPACITY["deepspeed (sparse)"],
                  "deepspeed (dense einsum), capacity": deepspeed_dense}
    headers = ["contender"] + [f"T={T}: MiB (x T*K*D*elt)" for T in tokens]
    rows = {name: [name] for name in contenders}
    for T in tokens:
        unit = T * K * D * BF16.itemsize
        for name, prepare in contenders.items():
            case = Case(T, D, E, K, BF16, None if "dropless" in name else 1.25)
            if "dense" in name and T > dense_limit:
                rows[name].append(f"skipped (T > {dense_limit}: [T, E, C] grows as T^2)")
                continue
            peak = common.peak_bytes(prepare(case, make_inputs(case)))
            rows[name].append(f"{peak / 2**20:.1f} ({peak / unit:.2f})")
        print(f"memory T={T} done", flush=True)
    return common.table(headers, list(rows.values()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (about a minute)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--tokens", type=int, help="T of the throughput tables (default 8192, --quick 4096)")
    parser.add_argument("--d-model", type=int, default=1024, help="row width D (default 1024)")
    parser.add_argument("--reps", type=int, help="timed rounds per point (default 9, --quick 5)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory table (host memory only)")
    parser.add_argument("--json", help="also write every table's rows to this JSON file")
    args = parser.parse_args(argv)
    if build.load().library is None:
        print(f"warning: compiled ops unavailable ({build.load().reason}); 'ours (kernel)' runs the reference")
    T = args.tokens or (4096 if args.quick else 8192)
    reps = args.reps or (5 if args.quick else 9)
    results = {}
    if not args.no_memory:
        common.set_malloc("exact")  # memory first: the high-water mark must track live tensors
        tokens = [1024, 2048, 4096] if args.quick else [2048, 8192, 32768]
        mem = memory(tokens, D=1024, E=64, K=2, dense_limit=4096 if args.quick else 8192)
        print(mem)
        if not args.no_write:
            common.write_section("dispatch-memory", "bench.dispatch", mem)

    common.set_malloc("warm")
    points = [(dt, E, K) for dt in (DTYPES[name] for name in args.dtypes) for E, K in ((8, 2), (64, 8))]
    dropless = throughput([Case(T, args.d_model, E, K, dt, device=args.device) for dt, E, K in points], DROPLESS,
                          ["ours (reference)", "megatron-core"], "ours (kernel)", reps)
    capacity = throughput([Case(T, args.d_model, E, K, dt, 1.25, args.device) for dt, E, K in points], CAPACITY,
                          ["ours (kernel) + router", "ours (reference) + router"], "ours (kernel) + router", reps)
    print(common.table(*dropless), common.table(*capacity), sep="\n\n")
    if args.json:
        results.update(dropless=_records(*dropless), capacity=_records(*capacity))
        Path(args.json).write_text(json.dumps(results, indent=1))
    if not args.no_write:
        common.write_section("dispatch-throughput", "bench.dispatch",
                             "#### Dropless layout, from the routing decision (expert ids + weights)\n\n"
                             + common.table(*dropless) + "\n\n#### Capacity layout (capacity factor 1.25); "
                             "'+ router' rows start from router logits (softmax, top-k), as DeepSpeed's gating does"
                             "\n\n" + common.table(*capacity))


def _records(headers, rows) -> List[dict]:
    return [dict(zip(headers, row)) for row in rows]


if __name__ == "__main__":
    main()
