"""Does the model's vocabulary cover the data's tokenizer? Checked when a config loads, before training.

An indexed dataset made with a BPE tokenizer has ``<prefix>.tokenizer.json`` beside it (moe_sys.data.bpe);
one without is byte-level (256 ids). Reading the JSON here, not through ``tokenizers``, keeps loading a
config cheap.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional, Tuple

BYTE_VOCAB = 256
SUFFIX = ".tokenizer.json"


def tokenizer_json_vocab(path: str) -> int:
    """Ids a tokenizer.json can produce: its base vocabulary and added tokens."""
    with open(path) as f:
        spec = json.load(f)
    ids = list(spec.get("model", {}).get("vocab", {}).values()) + [t["id"] for t in spec.get("added_tokens", [])]
    return max(ids) + 1


def data_tokenizer(prefix: Optional[str], embedded_bpe: Optional[int] = None) -> Tuple[str, int]:
    """(identity, vocab size) of a dataset's tokenizer; the embedded corpus (None) is bytes or its BPE."""
    if prefix is None and embedded_bpe is not None:
        return f"embedded-bpe-{embedded_bpe}", embedded_bpe
    path = f"{prefix}{SUFFIX}" if prefix else None
    if path is None or not os.path.exists(path):
        return "bytes", BYTE_VOCAB
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest(), tokenizer_json_vocab(path)


def vocab_problems(vocab_size: int, domains, embedded_bpe: Optional[int] = None) -> List[str]:
    """One line per domain whose tokenizer differs from the first's or has more ids than the model."""
    problems, first = [], None
    for i, d in enumerate(domains):
        if d.path is not None and not os.path.exists(f"{d.path}.idx"):
            continue  # reported as a missing dataset
        identity, size = data_tokenizer(d.path, embedded_bpe)
        where = f"{d.path}{SUFFIX}" if d.path and identity != "bytes" else identity
        if size > vocab_size:
            problems.append(f"model.vocab_size: {vocab_size} is smaller than data.domains.{i} ({d.name})'s "
                            f"tokenizer ({where}: {size} ids)")
        first = first or (identity, i)
        if identity != first[0]:
            problems.append(f"data.domains.{i}.path: tokenized differently from data.domains.{first[1]} "
                            "(one model reads one vocabulary)")
    return problems
