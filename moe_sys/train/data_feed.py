"""Turns the data config into this rank's batch streams (train: resumable; valid: a fixed pass)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Tuple

from moe_sys.config import Config
from moe_sys.data import BatchStream, build_datasets, default_cache_root, eval_batches
from moe_sys.data.dataset import resolve_prefixes


def build_feeds(cfg: Config, rank: int, world: int) -> Tuple[BatchStream, Callable[[], Iterator[dict]]]:
    """Every rank is a data-parallel rank: EP ranks see different tokens and exchange them."""
    t, d = cfg.train, cfg.data
    global_batch = t.micro_batch_size * world
    train, valid = build_datasets(
        {dom.name: (dom.path, dom.weight) for dom in d.domains}, seq_len=d.seq_len, seed=d.seed,
        num_train_samples=t.steps * t.grad_accum_steps * global_batch,
        num_valid_samples=t.eval_batches * global_batch, cache_dir=d.cache_dir, valid_fraction=d.valid_fraction,
        embedded_bpe=d.embedded_bpe)
    stream = BatchStream(train, t.micro_batch_size, dp_rank=rank, dp_size=world, seed=d.seed)
    return stream, lambda: eval_batches(valid, t.micro_batch_size, rank, world)


def save_tokenizer(cfg: Config, run_dir: str) -> None:
    """Copy the data's BPE tokenizer (the config check made every domain share one) into the run dir,
    where `generate` and `convert to-hf` read it. Byte-level data has none."""
    domain = cfg.data.domains[0]
    cache_root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_root()
    prefix = resolve_prefixes({domain.name: (domain.path, 1.0)}, cache_root, cfg.data.embedded_bpe)[0]
    if os.path.exists(prefix + ".tokenizer.json"):
        shutil.copy(prefix + ".tokenizer.json", os.path.join(run_dir, "tokenizer.json"))
