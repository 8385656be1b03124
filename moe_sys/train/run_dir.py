"""The run-directory rules: one run per directory.

A fresh run (no ``--resume``) refuses a directory that already holds a run's outputs (checkpoints,
metrics, TensorBoard logs, adapters): mixing two runs' steps in one directory corrupts both. With
``--overwrite`` the old directory is moved aside to ``RUN_DIR.old-YYYYmmdd-HHMMSS`` first, never
deleted. A config file or launcher log alone (what a sweep writes before training) does not count.
"""
from __future__ import annotations

import os
import time
from typing import Optional

from moe_sys.errors import UserError

OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "adapters")


class RunDirError(UserError):
    """A run directory a fresh run must not write into; the message names it and the way out."""


def outputs_in(run_dir: str) -> list:
    return [name for name in OUTPUTS if os.path.exists(os.path.join(run_dir, name))]


def prepare(run_dir: str, resume: bool, overwrite: bool) -> Optional[str]:
    """Check ``run_dir`` for a run about to start; returns where ``--overwrite`` moved the old one."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"logging.run_dir {run_dir} is a file, not a directory")
    if resume or not os.path.isdir(run_dir) or not outputs_in(run_dir):
        return None
    if not overwrite:
        raise RunDirError(f"logging.run_dir {run_dir} already holds a run ({', '.join(outputs_in(run_dir))}): "
                          "pass --resume to continue it, or --overwrite to move it aside and start afresh")
    aside = f"{os.path.normpath(run_dir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while os.path.exists(aside if n == 1 else f"{aside}-{n}"):
        n += 1
    aside = aside if n == 1 else f"{aside}-{n}"
    os.rename(run_dir, aside)
    return aside
