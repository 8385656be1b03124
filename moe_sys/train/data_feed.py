"""Turns the data config into this rank's batch streams (train: resumable; valid: a fixed pass)."""
from __future__ import annotations

from typing import Callable, Iterator, Tuple

from moe_sys.config import Config
from moe_sys.data import BatchStream, build_datasets, eval_batches


def build_feeds(cfg: Config, rank: int, world: int) -> Tuple[BatchStream, Callable[[], Iterator[dict]]]:
    """Every rank is a data-parallel rank: EP ranks see different tokens and exchange them."""
    t, d = cfg.train, cfg.data
    global_batch = t.micro_batch_size * world
    train, valid = build_datasets(
        {dom.name: (dom.path, dom.weight) for dom in d.domains}, seq_len=d.seq_len, seed=d.seed,
        num_train_samples=t.steps * t.grad_accum_steps * global_batch,
        num_valid_samples=t.eval_batches * global_batch, cache_dir=d.cache_dir, valid_fraction=d.valid_fraction)
    stream = BatchStream(train, t.micro_batch_size, dp_rank=rank, dp_size=world, seed=d.seed)
    return stream, lambda: eval_batches(valid, t.micro_batch_size, rank, world)
