"""The numbers ``moe-sys plan`` prints, and the printing."""
from __future__ import annotations

from typing import Dict, List, Optional

from moe_sys.plan import comm, memory

GIB = 2**30


def plan(cfg, world: int, gpu_memory_gib: float, link_gbps: float) -> Dict:
    """Per-rank memory (GiB) for each checkpointing mode, all-to-all per step, and whether it fits."""
    counts = memory.count_params(cfg)
    states = memory.model_state_bytes(counts, cfg, world)
    acts = {mode: memory.activation_bytes(cfg, mode) for mode in ("none", "moe", "full")}
    chosen = cfg.train.activation_checkpointing
    total = sum(states.values()) + acts[chosen]
    volume = comm.a2a_bytes_per_step(cfg, cfg.parallel.ep_size)
    return {"params": counts, "states_gib": {k: v / GIB for k, v in states.items()},
            "activations_gib": {k: v / GIB for k, v in acts.items()}, "checkpointing": chosen,
            "total_gib": total / GIB, "fits": total / GIB <= gpu_memory_gib, "gpu_memory_gib": gpu_memory_gib,
            "a2a_gib_per_step": volume / GIB, "a2a_s_per_step": volume / (link_gbps * 1e9), "link_gbps": link_gbps}


def format_plan(p: Dict, world: int, ep_size: int) -> str:
    c = p["params"]
    lines = [f"{world} ranks, ep_size {ep_size}: {(c.dense + c.expert) / 1e9:.3f}B parameters "
             f"({c.dense / 1e9:.3f}B dense, {c.expert / 1e9:.3f}B in routed experts)",
             "per rank (GiB):"]
    lines += [f"  {name:<28}{value:10.3f}" for name, value in p["states_gib"].items()]
    lines += [f"  activations, checkpointing {mode:<5}{value:7.3f}" + ("  <- train.activation_checkpointing"
                                                                       if mode == p["checkpointing"] else "")
              for mode, value in p["activations_gib"].items()]
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"  total{p['total_gib']:33.3f}  {verdict} in {p['gpu_memory_gib']:g} GiB")
    lines.append(f"all-to-all per step and rank: {p['a2a_gib_per_step']:.3f} GiB sent+received, "
                 f"{p['a2a_s_per_step'] * 1e3:.1f} ms at {p['link_gbps']:g} GB/s")
    return "\n".join(lines)


def format_simulation(rows: List[Dict], source: str) -> str:
    lines = [f"measured expert loads of {source} at larger EP sizes (busiest rank sets the step time):",
             "  ep_size  imbalance(mean/max layer)  a2a GiB busiest  a2a ms  balanced ms"]
    for r in rows:
        if "problem" in r:
            lines.append(f"  {r['ep_size']:>7}  {r['problem']}")
            continue
        lines.append(f"  {r['ep_size']:>7}  {r['imbalance_mean']:10.2f} / {r['imbalance_max']:<12.2f}"
                     f"{r['a2a_bytes'] / GIB:15.3f}{r['a2a_s'] * 1e3:8.1f}{r['balanced_a2a_s'] * 1e3:13.1f}")
    return "\n".join(lines)


def run(cfg, gpus: int, nodes: int, gpu_memory_gib: float, link_gbps: float,
        from_run: Optional[str], ep_sizes: List[int]) -> str:
    world = gpus * nodes
    text = format_plan(plan(cfg, world, gpu_memory_gib, link_gbps), world, cfg.parallel.ep_size)
    if from_run:
        load_LE = comm.measured_load(from_run)
        text += "\n" + format_simulation(comm.simulate(cfg, load_LE, ep_sizes, link_gbps), from_run)
    return text
