"""Batches for one data-parallel rank, resumable from a single integer.

Shape legend: B micro-batch size (per rank), S sequence length, W data-parallel world size.

The whole job reads one global sample stream: position p (0, 1, 2, ...) maps to dataset index
``perm_e[p % N]`` where ``e = p // N`` is the epoch and ``perm_e`` a permutation seeded by
``(seed, e)``. Each step takes the next B*W positions; rank r gets positions [r*B, (r+1)*B) of them.
The trainer's whole data state is therefore ``consumed_samples`` (positions handed out to all ranks
so far): saving it and restarting from it reproduces the exact next batches, even with a different W.
The stream is counted in the main process as batches are yielded, so DataLoader workers prefetching
ahead never make the saved position run ahead of what the model actually saw.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch


def collate(items: list[dict]) -> dict:
    """Stack dataset items into a batch.

    Returns:
        ``tokens`` [B, S] int64, ``labels`` [B, S] int64, ``loss_mask`` [B, S] float32,
        ``domain_ids`` [B] int64.
    """
    return {
        "tokens": torch.stack([it["tokens"] for it in items]),
        "labels": torch.stack([it["labels"] for it in items]),
        "loss_mask": torch.stack([it["loss_mask"] for it in items]),
        "domain_ids": torch.tensor([it["domain_id"] for it in items], dtype=torch.int64),
    }


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless micro-batches of dataset indices for rank ``dp_rank``, starting at ``consumed_samples``."""

    def __init__(self, num_samples: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, consumed_samples: int = 0) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        if num_samples < micro_batch_size * dp_size:
            raise ValueError(f"dataset has {num_samples} samples, fewer than one global batch "
                             f"({micro_batch_size} x {dp_size} ranks)")
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.consumed_samples = consumed_samples
        self._perms: dict[int, np.ndarray] = {}

    def __iter__(self) -> Iterator[list[int]]:
        position = self.consumed_samples
        step = self.micro_batch_size * self.dp_size
        while True:
            first = position + self.dp_rank * self.micro_batch_size
            yield [self.index_at(p) for p in range(first, first + self.micro_batch_size)]
            position += step

    def index_at(self, position: int) -> int:
        """Dataset index at global stream ``position``."""
        epoch, offset = divmod(position, self.num_samples)
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # keep memory flat
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.num_samples)
        return int(self._perms[epoch][offset])


class BatchStream:
    """Endless, resumable iterator of collated micro-batches for one data-parallel rank.

    Args:
        dataset: a map-style dataset of ``{tokens, labels, loss_mask, domain_id}`` items.
        micro_batch_size: B, sequences per rank per micro-step.
        dp_rank, dp_size: this rank's data-parallel index and the data-parallel world size W.
        seed: order seed (same on all ranks).
        consumed_samples: global stream position to start from (from ``state_dict``).
        num_workers: DataLoader worker processes (0 = load in this process).
    Yields:
        batches as from ``collate``; each one advances ``consumed_samples`` by B * W.
    """

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 consumed_samples: int = 0, num_workers: int = 0) -> None:
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.num_workers = num_workers
        self.consumed_samples = consumed_samples
        self._iterator: Optional[Iterator[dict]] = None

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self._make_loader())
        batch = next(self._iterator)
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch

    def state_dict(self) -> dict:
        """The stream's position; everything else is reproducible from the config."""
        return {"consumed_samples": self.consumed_samples, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (drops any prefetched batches)."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data stream was saved with seed {state['seed']}, resuming with {self.seed}")
        self.consumed_samples = int(state["consumed_samples"])
        self._iterator = None

    def _make_loader(self) -> torch.utils.data.DataLoader:
        sampler = ResumableBatchSampler(len(self.dataset), self.micro_batch_size, self.dp_rank,
                                        self.dp_size, self.seed, self.consumed_samples)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate,
                                           num_workers=self.num_workers,
                                           persistent_workers=self.num_workers > 0)


def eval_batches(dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 max_samples: Optional[int] = None) -> Iterator[dict]:
    """One in-order pass over ``dataset`` (or its first ``max_samples``), sharded across ranks.

    The tail that does not fill a whole global batch (B * W) is dropped so every rank runs the same
    number of steps: an MoE forward holds collectives (expert all-to-all) that must match across ranks.
    """
    total = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    step = micro_batch_size * dp_size
    for start in range(0, total - step + 1, step):
        first = start + dp_rank * micro_batch_size
        yield collate([dataset[i] for i in range(first, first + micro_batch_size)])
