"""A checkpoint's manifest: the size and sha256 of every file in its tag directory.

Rank 0 writes ``manifest.json`` last, after every rank has finished its files and before the tag is
renamed into place, so a checkpoint under its final name always has one. At ``--resume`` the manifest is
checked before DeepSpeed reads anything: a truncated, missing or changed file is named, and the run
can fall back to an older checkpoint instead of dying inside DeepSpeed's loader. Every torch file in
the tag is also read without being run (``safe_load.check_torch``): a checkpoint from elsewhere that
would execute code is refused before any rank starts.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List

from moe_sys.errors import UserError
from moe_sys.safe_load import UnsafeFileError, check_torch, numpy_arrays

MANIFEST, FORMAT = "manifest.json", 1


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from; the message names the file."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(tag_dir: str) -> List[str]:
    return sorted(name for name in os.listdir(tag_dir)
                  if name != MANIFEST and os.path.isfile(os.path.join(tag_dir, name)))


def write(tag_dir: str) -> None:
    """Record every file of ``tag_dir`` (call when all ranks have written theirs)."""
    files = {name: {"size": os.path.getsize(os.path.join(tag_dir, name)), "sha256": _sha256(os.path.join(tag_dir, name))}
             for name in _files(tag_dir)}
    tmp = os.path.join(tag_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(tag_dir, MANIFEST))


def read(tag_dir: str) -> Dict[str, Dict]:
    """The manifest's files, or None for a checkpoint written before manifests existed."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not all(isinstance(v, dict) for v in files.values()):
            raise ValueError("unknown layout")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: damaged manifest ({e})") from None
    return files


def verify(tag_dir: str) -> bool:
    """Raise CheckpointError naming the first wrong file; False when there is no manifest to check
    (an older checkpoint: only its torch files' safety is checked)."""
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"{tag_dir}: no such checkpoint directory")
    files = read(tag_dir)
    for name, entry in sorted((files or {}).items()):
        path = os.path.join(tag_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        size = os.path.getsize(path)
        if size != entry.get("size"):
            raise CheckpointError(f"{path}: {size} bytes, {MANIFEST} says {entry.get('size')} (truncated or replaced)")
        if _sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"{path}: contents differ from its checksum in {MANIFEST}")
    for name in _files(tag_dir):
        if name.endswith(".pt"):
            try:
                check_torch(os.path.join(tag_dir, name), numpy_arrays() if name.startswith("rng_rank") else ())
            except UnsafeFileError as e:
                raise CheckpointError(str(e)) from None
    return files is not None
