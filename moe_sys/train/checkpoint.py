"""Checkpoints through DeepSpeed's engine (expert-sharded files), plus what DeepSpeed does not keep:
the data position and every rank's RNG states, so a resumed run continues bit for bit. A checkpoint
appears under its final name, and in ``latest``, only once every rank has written all of it and rank 0
has written its manifest (sizes and checksums, ``manifest.py``). ``--resume`` takes the newest intact
checkpoint; nothing here ever changes an older one.

RNG states are safetensors + JSON (``rng_rank{R}.safetensors``): nothing a resume reads is a pickle.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from moe_sys import safe_load
from moe_sys.errors import UserError
from moe_sys.train import manifest, reshard
from moe_sys.train.manifest import CheckpointError

log = logging.getLogger("moe_sys")

TAG_PATTERN = re.compile(r"step_\d{8,}(-ep\d+)?")  # -epQ: resharded for expert-parallel size Q (reshard.py)
TMP_PREFIX = "tmp-"  # a tag being written; never what ``latest`` names
RESUME_MODES = ("auto", "strict")  # newest intact checkpoint with a warning | refuse any damage


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def step_of(tag: str) -> int:
    return int(tag.split("_")[1].split("-")[0])


def tags(run_dir: str) -> List[str]:
    """Published checkpoints, newest (highest step) first."""
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(root):
        return []
    found = [d for d in os.listdir(root) if TAG_PATTERN.fullmatch(d) and os.path.isdir(os.path.join(root, d))]
    return sorted(found, key=lambda t: (step_of(t), t), reverse=True)  # a resharded step_N-epQ before step_N


def latest_tag(run_dir: str) -> Optional[str]:
    """What ``latest`` names; raises CheckpointError when it holds something else than a tag."""
    path = os.path.join(checkpoint_dir(run_dir), "latest")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        raw = f.read(64)
    tag = raw.decode("ascii", errors="replace").strip()
    if not TAG_PATTERN.fullmatch(tag):
        raise CheckpointError(f"{path}: holds {raw[:20]!r}, not a checkpoint name like step_00000010")
    return tag


def _rng_state_tensors() -> tuple:
    """torch, numpy and python RNG states as tensors + JSON metadata (safetensors holds both)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
               "python_state": torch.tensor(internal, dtype=torch.int64)}
    meta = {"numpy": json.dumps([name, int(pos), int(has_gauss), float(cached)]),
            "python": json.dumps([version, gauss_next])}
    return tensors, meta


def _save_rng(path: str) -> None:
    from safetensors.torch import save_file

    tensors, meta = _rng_state_tensors()
    save_file(tensors, path, metadata=meta)


def _load_rng(tag_dir: str, rank: int) -> None:
    path = os.path.join(tag_dir, f"rng_rank{rank:05d}.safetensors")
    if not os.path.exists(path) and os.path.exists(os.path.join(tag_dir, f"rng_rank{rank:05d}.pt")):
        return _load_legacy_rng(os.path.join(tag_dir, f"rng_rank{rank:05d}.pt"))
    from safetensors import safe_open

    tensors = safe_load.load_safetensors(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    try:
        name, pos, has_gauss, cached = json.loads(meta["numpy"])
        version, gauss_next = json.loads(meta["python"])
        torch.set_rng_state(tensors["torch"])
        np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate((version, tuple(tensors["python_state"].tolist()), gauss_next))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not an RNG state file ({e})") from None


def _load_legacy_rng(path: str) -> None:
    """``rng_rank{R}.pt`` of checkpoints written before the safetensors file: a pickle of numpy's state,
    read with weights-only torch.load and only numpy's array-rebuilding globals allowed."""
    state = safe_load.load_torch(path, also_allow=safe_load.numpy_arrays())
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(engine, run_dir: str, step: int, client_state: Dict[str, Any], keep: int) -> str:
    """Write tag ``step_{step}`` so that a kill at any moment leaves the previous checkpoint usable.

    Every rank writes into ``tmp-step_N``; after a barrier rank 0 writes the manifest, renames the tag
    to ``step_N`` and only then points ``latest`` at it (temp file + os.replace). Like DeepSpeed, this
    assumes all ranks see the same filesystem.
    """
    root, tag = checkpoint_dir(run_dir), f"step_{step:08d}"
    tmp_tag = TMP_PREFIX + tag
    rank = dist.get_rank()
    if rank == 0:  # the remains of a save that was killed halfway
        shutil.rmtree(os.path.join(root, tmp_tag), ignore_errors=True)
    dist.barrier()
    os.makedirs(os.path.join(root, tmp_tag), exist_ok=True)
    _save_rng(os.path.join(root, tmp_tag, f"rng_rank{rank:05d}.safetensors"))
    engine.save_checkpoint(root, tag=tmp_tag, client_state={"step": step, **client_state}, save_latest=False)
    dist.barrier()  # every rank's files are in tmp_tag (DeepSpeed ends with a barrier; ours says why)
    if rank == 0:
        manifest.write(os.path.join(root, tmp_tag))
        _publish(root, tmp_tag, tag)
        if keep > 0:
            _prune(run_dir, keep, tag)
    dist.barrier()
    return os.path.join(root, tag)

def _publish(root: str, tmp_tag: str, tag: str) -> None:
    """Rename the finished tag into place, then update ``latest`` atomically."""
    final = os.path.join(root, tag)
    if os.path.exists(final):  # the same step saved again (resumed from an older checkpoint)
        shutil.rmtree(final)
    os.rename(os.path.join(root, tmp_tag), final)
    tmp_latest = os.path.join(root, "latest.tmp")
    with open(tmp_latest, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_latest, os.path.join(root, "latest"))


def _prune(run_dir: str, keep: int, current: str) -> None:
    """Keep the ``keep`` highest steps, and always ``current`` (what ``latest`` now names)."""
    for old in tags(run_dir)[keep:]:
        if old != current:
            shutil.rmtree(os.path.join(checkpoint_dir(run_dir), old), ignore_errors=True)


def choose(run_dir: str, mode: str = "auto", warn: Callable[[str], None] = log.warning) -> str:
    """The tag to resume from: what ``latest`` names if intact, else (mode ``auto``) the newest older
    intact one, with a ``warn`` line per checkpoint passed over. Mode ``strict`` refuses any damage;
    a tag name as mode means exactly that checkpoint. Reads only: nothing on disk changes."""
    root = checkpoint_dir(run_dir)
    if mode not in RESUME_MODES:
        return _verified(root, mode)
    try:
        named = latest_tag(run_dir)
        if named is None and tags(run_dir):
            raise CheckpointError(f"{os.path.join(root, 'latest')}: missing")
    except CheckpointError as e:
        if mode == "strict":
            raise
        warn(f"{e}; looking for the newest intact checkpoint")
        named = None
    candidates = [t for t in tags(run_dir) if named is None or step_of(t) < step_of(named)]
    if named is None and not candidates:
        raise CheckpointError(f"--resume: no checkpoint in {root}")
    for tag in ([named] if named else []) + candidates:
        try:
            return _verified(root, tag)
        except CheckpointError as e:
            if mode == "strict":
                raise
            warn(f"checkpoint {tag} is damaged: {e}; trying an older one")
    raise CheckpointError(f"--resume: no intact checkpoint in {root}")


def _verified(root: str, tag: str) -> str:
    if not manifest.verify(os.path.join(root, tag)):
        log.warning("%s has no %s (written by an older moe-sys): resuming without checking it",
                    os.path.join(root, tag), manifest.MANIFEST)
    return tag


def decided_on_rank0(fn: Callable[[], Any]) -> Any:
    """fn() on rank 0 only; every rank returns its result, or raises the UserError it raised (so all
    ranks stop with the same one line instead of the others waiting at the next collective)."""
    outcome: List[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [fn()]
        except UserError as e:
            outcome = [e]
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], UserError):
        raise outcome[0]
    return outcome[0]


def load(engine, run_dir: str, mode: str = "auto", ep_size: Optional[int] = None) -> Dict[str, Any]:
    """Restore model, optimizer, LR schedule and RNG from the checkpoint ``choose`` picks (on rank 0,
    which tells the others); returns the client state. A checkpoint saved at another expert-parallel
    size or world size is resharded first (``reshard.py``; one log line says so)."""
    tag = decided_on_rank0(lambda: _resharded_if_needed(run_dir, choose(run_dir, mode), ep_size, engine.train_batch_size()))
    tag_dir = os.path.join(checkpoint_dir(run_dir), tag)
    resharded = reshard.is_resharded(tag_dir)
    path, client_state = engine.load_checkpoint(checkpoint_dir(run_dir), tag=tag, load_optimizer_states=not resharded)
    if path is None:
        raise CheckpointError(f"--resume: DeepSpeed could not load checkpoint {tag} from {checkpoint_dir(run_dir)}")
    if resharded:
        reshard.apply(engine, tag_dir)
    saved_world = (client_state.get("layout") or {}).get("world_size", dist.get_world_size())
    # A rank the saved run did not have starts from rank 0's streams, as every rank of a fresh run
    # starts from the same seed.
    _load_rng(tag_dir, dist.get_rank() if dist.get_rank() < saved_world else 0)
    return client_state


def reshard_run(run_dir: str, ep_size: int, mode: str = "auto") -> str:
    """``moe-sys checkpoint reshard``: the checkpoint ``--resume=mode`` would take, rewritten as a new tag
    for ``ep_size`` (which ``latest`` then names); returns its directory."""
    if not os.path.isdir(checkpoint_dir(run_dir)):
        raise CheckpointError(f"{run_dir}: no checkpoints directory (not a run directory?)")
    new_tag = reshard.write(checkpoint_dir(run_dir), choose(run_dir, mode), ep_size)
    return os.path.join(checkpoint_dir(run_dir), new_tag)


def _resharded_if_needed(run_dir: str, tag: str, ep_size: Optional[int], global_batch: int) -> str:
    """``tag``, or the tag resharded for ``ep_size`` on this world size when it was saved on another."""
    saved = reshard.saved_layout(os.path.join(checkpoint_dir(run_dir), tag))
    world = dist.get_world_size()
    if saved is None or ep_size is None or (saved["ep_size"], saved["world_size"]) == (ep_size, world):
        return tag
    if saved["world_size"] != world and saved["global_batch"] != global_batch:
        raise CheckpointError(
            f"checkpoint {tag} was trained with a global batch of {saved['global_batch']} sequences on "
            f"{saved['world_size']} ranks, this run's is {global_batch} on {world}: set train.micro_batch_size or "
            "train.grad_accum_steps to keep it, so that the data position and the schedule mean the same")
    if reshard.is_resharded(os.path.join(checkpoint_dir(run_dir), tag)):
        return tag
    new_tag = reshard.write(checkpoint_dir(run_dir), tag, ep_size)
    log.info("checkpoint %s was saved at ep_size %d on %d ranks: resharded for ep_size %d on %d ranks as %s",
             tag, saved["ep_size"], saved["world_size"], ep_size, world, new_tag)
    return new_tag
