"""Train/valid datasets: megatron-core GPTDataset per domain, blended by per-domain weights.

Each domain (an indexed-dataset prefix; ``None`` = the embedded corpus's domain of that name) gets a
megatron ``GPTDataset`` over its documents, split contiguously by document into train / valid
(``valid_fraction`` of the documents are held out, never trained on). A megatron ``BlendedDataset``
then draws from the domains in proportion to their weights. Every sample carries ``domain_id``, the
domain's index in the config's order, which example- and task-level routers consume.

Why not ``BlendedMegatronDatasetBuilder`` with a multi-prefix ``blend``: in megatron-core 0.16 the
BlendedDataset cache path calls ``torch.distributed.get_rank()`` on a cache miss, which raises when
torch.distributed is not initialised. So the builder is used per domain (it is distributed-aware:
rank 0 builds and caches the sample indices, a barrier, then the other ranks load them), and the
BlendedDataset is built directly without a cache; its indices are a cheap, deterministic C++ pass.

Sample indices (megatron's ``*.npy``) are cached under ``<cache_root>/index``. In a multi-node job
that directory must be on a filesystem shared by all nodes, as megatron assumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from moe_sys.data.corpus import DOMAINS, default_cache_root, ensure_corpus
from moe_sys.data.indexed import file_lock
from moe_sys.data.bpe import tokenizer_for


class DomainBlendDataset(torch.utils.data.Dataset):
    """A megatron BlendedDataset whose items are ``{tokens, labels, loss_mask, domain_id}``.

    Item shapes: ``tokens`` [S] int64, ``labels`` [S] int64 (``tokens`` shifted left by one, the next
    byte), ``loss_mask`` [S] float32, ``domain_id`` int.
    """

    def __init__(self, blended, domain_names: list[str]) -> None:
        self.blended = blended
        self.domain_names = list(domain_names)

    def __len__(self) -> int:
        return len(self.blended)

    def __getitem__(self, idx: int) -> dict:
        item = self.blended[idx]
        return {
            "tokens": item["tokens"],
            "labels": item["labels"],
            "loss_mask": item["loss_mask"],
            "domain_id": int(item["dataset_id"]),
        }

    def domain_ids(self) -> np.ndarray:
        """domain_id of every sample [N], without reading any tokens (for statistics)."""
        return np.asarray(self.blended.dataset_index, dtype=np.int64)


def build_datasets(
    domains: Mapping[str, tuple[Optional[str], float]],
    seq_len: int,
    seed: int,
    num_train_samples: int,
    num_valid_samples: int,
    cache_dir: str | os.PathLike | None = None,
    valid_fraction: float = 0.02,
    embedded_bpe: Optional[int] = None,
) -> tuple[DomainBlendDataset, Optional[DomainBlendDataset]]:
    """Build the blended train and held-out valid datasets. Call on every rank (it holds barriers).

    Args:
        domains: ``{name: (prefix or None, weight)}`` in config order (that order defines domain ids).
            ``None`` selects the embedded corpus's domain ``name`` (one of ``DOMAINS``), built on first use.
        seq_len: S, tokens per sample.
        seed: seed for megatron's document/sample shuffles.
        num_train_samples: train dataset length (samples to be consumed across all ranks).
        num_valid_samples: valid dataset length; 0 returns no valid dataset.
        cache_dir: cache root for the embedded corpus and sample indices; None = ``~/.cache/moe_sys``.
        valid_fraction: fraction of each domain's documents held out for validation.
        embedded_bpe: the embedded corpus tokenised with a BPE of this vocabulary (None = bytes).
    Returns:
        (train, valid) DomainBlendDatasets; valid is None when ``num_valid_samples`` is 0.
    """
    if not domains:
        raise ValueError("data.domains is empty")
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    names = list(domains)
    prefixes = resolve_prefixes(domains, cache_root, embedded_bpe)
    weights = _normalized_weights([w for _, w in domains.values()], names)
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    split = f"{1.0 - valid_fraction:.8f},{valid_fraction:.8f},0"
    sizes = {"train": num_train_samples, "valid": num_valid_samples}
    for name, prefix in zip(names, prefixes):
        _check_split_not_empty(name, prefix, valid_fraction, num_valid_samples > 0)

    configs = [_gpt_config(prefix, seq_len, seed, split, cache_root / "index") for prefix in prefixes]
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    # Only the process that may write megatron's index cache locks it, so two jobs sharing a cache
    # never read each other's half-written .npy files; other ranks wait at megatron's barriers instead.
    with file_lock(cache_root / "index" / ".lock") if rank0 else contextlib.nullcontext():
        per_domain = [_build_domain(w, sizes, config) for w, config in zip(weights, configs)]

    from moe_sys.data._megatron import BlendedDataset

    blend_config = dataclasses.replace(configs[0], path_to_cache=None)
    train = BlendedDataset([d[0] for d in per_domain], weights, num_train_samples, blend_config)
    valid = None
    if num_valid_samples > 0:
        valid = BlendedDataset([d[1] for d in per_domain], weights, num_valid_samples, blend_config)
        valid = DomainBlendDataset(valid, names)
    return DomainBlendDataset(train, names), valid


def resolve_prefixes(domains: Mapping[str, tuple[Optional[str], float]], cache_root: Path,
                     embedded_bpe: Optional[int] = None) -> list[str]:
    """Each domain's indexed-dataset prefix, building the embedded corpus if a domain needs it."""
    embedded = None
    prefixes = []
    for name, (prefix, _) in domains.items():
        if prefix is None:
            if name not in DOMAINS:
                raise ValueError(f"data domain {name!r} has no path and is not an embedded domain "
                                 f"({', '.join(DOMAINS)}); give it a path from `moe-sys prepare-data`")
            embedded = embedded or ensure_corpus(cache_root, bpe_vocab=embedded_bpe)
            prefix = embedded[name]
        elif not (os.path.exists(f"{prefix}.bin") and os.path.exists(f"{prefix}.idx")):
            raise FileNotFoundError(f"data domain {name!r}: no indexed dataset at {prefix!r} (.bin/.idx)")
        prefixes.append(str(prefix))
    return prefixes


def _normalized_weights(weights: list[float], names: list[str]) -> list[float]:
    for name, w in zip(names, weights):
        if not w > 0:
            raise ValueError(f"data domain {name!r}: weight must be > 0, got {w}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _gpt_config(prefix: str, seq_len: int, seed: int, split: str, index_dir: Path):
    """megatron's config for one domain. (Built whole: a config made with ``blend=None`` turns itself
    into a mock with split "1,1,1", which ``dataclasses.replace`` would then carry over.)"""
    from moe_sys.data._megatron import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=([prefix], None),
        split=split,
        path_to_cache=str(index_dir),
        tokenizer=tokenizer_for(prefix),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,  # predicting the end of a document is part of the task
        create_attention_mask=False,  # models apply causal masking themselves; saves an [S, S] tensor
    )


def _build_domain(weight: float, sizes: dict, config) -> list:
    """megatron GPTDatasets [train, valid] for one domain, sized for its share of the blend."""
    from moe_sys.data._megatron import BlendedMegatronDatasetBuilder, GPTDataset

    # megatron's own margin: the blend's greedy interleave may take a few more than weight * size.
    surplus = 1.0 + config.mid_level_dataset_surplus
    wanted = [math.ceil(math.ceil(sizes[s] * weight) * surplus) for s in ("train", "valid")]
    builder = BlendedMegatronDatasetBuilder(GPTDataset, wanted + [0], lambda: True, config)
    return builder.build()[:2]


def _check_split_not_empty(name: str, prefix: str, valid_fraction: float, need_valid: bool) -> None:
    """Fail clearly where megatron would loop forever on a split with no documents."""
    from moe_sys.data._megatron import IndexedDataset

    n_docs = len(IndexedDataset(prefix).sequence_lengths)
    n_train = int(round((1.0 - valid_fraction) * n_docs))  # megatron's own rounding of split bounds
    if n_train == 0 or (need_valid and n_docs - n_train == 0):
        raise ValueError(f"data domain {name!r} ({prefix}) has {n_docs} documents: too few for a "
                         f"{1 - valid_fraction:.0%}/{valid_fraction:.0%} train/valid split; add documents "
                         f"or change data.valid_fraction")
