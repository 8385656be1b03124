"""Checkpoints through DeepSpeed's engine (expert-sharded files), plus what DeepSpeed does not keep:
the data position and every rank's RNG states, so a resumed run continues bit for bit."""
from __future__ import annotations

import os
import random
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def latest_tag(run_dir: str) -> Optional[str]:
    path = os.path.join(checkpoint_dir(run_dir), "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def _rng_state() -> Dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(engine, run_dir: str, step: int, client_state: Dict[str, Any], keep: int) -> str:
    """Write tag ``step_{step}``; DeepSpeed updates ``latest`` after all ranks finished writing."""
    root, tag = checkpoint_dir(run_dir), f"step_{step:08d}"
    rank = dist.get_rank()
    os.makedirs(os.path.join(root, tag), exist_ok=True)
    torch.save(_rng_state(), os.path.join(root, tag, f"rng_rank{rank:05d}.pt"))
    engine.save_checkpoint(root, tag=tag, client_state={"step": step, **client_state})
    if rank == 0 and keep > 0:
        _prune(root, keep)
    dist.barrier()
    return os.path.join(root, tag)


def _prune(root: str, keep: int) -> None:
    tags = sorted(d for d in os.listdir(root) if d.startswith("step_") and os.path.isdir(os.path.join(root, d)))
    for old in tags[:-keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def load(engine, run_dir: str) -> Dict[str, Any]:
    """Restore model, optimizer, LR schedule and RNG from the latest checkpoint; returns client state."""
    tag = latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint_dir(run_dir)} (no 'latest' file)")
    path, client_state = engine.load_checkpoint(checkpoint_dir(run_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"--resume: DeepSpeed could not load checkpoint {tag} from {checkpoint_dir(run_dir)}")
    rng_path = os.path.join(checkpoint_dir(run_dir), tag, f"rng_rank{dist.get_rank():05d}.pt")
    _set_rng_state(torch.load(rng_path, weights_only=False))
    return client_state
