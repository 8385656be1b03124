"""Checkpoints through DeepSpeed's engine (expert-sharded files), plus what DeepSpeed does not keep:
the data position and every rank's RNG states, so a resumed run continues bit for bit. A checkpoint
appears under its final name, and in ``latest``, only once every rank has written all of it."""
from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

TAG_PATTERN = re.compile(r"step_\d{8}")
TMP_PREFIX = "tmp-"  # a tag being written; never what ``latest`` names


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
    """Write tag ``step_{step}`` so that a kill at any moment leaves the previous checkpoint usable.

    Every rank writes into ``tmp-step_N``; after a barrier rank 0 renames it to ``step_N`` and only
    then points ``latest`` at it (temp file + os.replace). Like DeepSpeed, this assumes all ranks
    see the same filesystem.
    """
    root, tag = checkpoint_dir(run_dir), f"step_{step:08d}"
    tmp_tag = TMP_PREFIX + tag
    rank = dist.get_rank()
    if rank == 0:  # the remains of a save that was killed halfway
        shutil.rmtree(os.path.join(root, tmp_tag), ignore_errors=True)
    dist.barrier()
    os.makedirs(os.path.join(root, tmp_tag), exist_ok=True)
    torch.save(_rng_state(), os.path.join(root, tmp_tag, f"rng_rank{rank:05d}.pt"))
    engine.save_checkpoint(root, tag=tmp_tag, client_state={"step": step, **client_state}, save_latest=False)
    dist.barrier()  # every rank's files are in tmp_tag (DeepSpeed ends with a barrier; ours says why)
    if rank == 0:
        _publish(root, tmp_tag, tag)
        if keep > 0:
            _prune(root, keep)
    dist.barrier()
    return os.path.join(root, tag)


def _publish(root: str, tmp_tag: str, tag: str) -> None:
    """Rename the finished tag into place, then update ``latest`` atomically."""
    final = os.path.join(root, tag)
    if os.path.exists(final):  # the same step saved again (a run restarted without --resume)
        shutil.rmtree(final)
    os.rename(os.path.join(root, tmp_tag), final)
    tmp_latest = os.path.join(root, "latest.tmp")
    with open(tmp_latest, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_latest, os.path.join(root, "latest"))


def _prune(root: str, keep: int) -> None:
    tags = sorted(d for d in os.listdir(root) if TAG_PATTERN.fullmatch(d) and os.path.isdir(os.path.join(root, d)))
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
