"""Write documents into megatron-core's indexed-dataset format (``<prefix>.bin`` + ``<prefix>.idx``).

One document = one megatron "sequence" of token ids ending in EOD: bytes stored as uint8 (a byte
vocabulary needs no wider type; 4x smaller than megatron's int32 default), BPE ids as uint16/int32
(``moe_sys.data.bpe``). Both the embedded corpus and
``prepare_data`` go through ``write_indexed_dataset`` so they produce the same format.

Also holds the two filesystem helpers the data package needs for concurrent safety: an advisory file
lock and an atomic "write elsewhere, then rename into place".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from moe_sys.data.tokenizer import ByteTokenizer


@dataclass(frozen=True)
class IndexedStats:
    """What a write produced: documents (each EOD-terminated) and tokens (EODs included)."""

    documents: int
    tokens: int


def write_indexed_dataset(prefix: str | os.PathLike, texts: Iterable[str], tokenizer=None) -> IndexedStats:
    """Tokenize ``texts`` (one document each; empty ones skipped) into ``prefix``.bin/.idx.

    tokenizer: None = bytes (uint8); a ``BPETokenizer`` writes its own dtype and is copied beside the
    data as ``prefix.tokenizer.json`` (before the .idx, so a complete dataset always has it).

    The files are written under temporary names and renamed into place, ``.idx`` last, so a reader
    that finds ``<prefix>.idx`` finds a complete dataset, and a crash leaves no half-written prefix.

    Args:
        prefix: output path without extension; parent directories are created.
        texts: documents as str.
    Returns:
        IndexedStats with the number of documents and tokens written.
    """
    from moe_sys.data._megatron import IndexedDatasetBuilder

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(f".{prefix.name}.tmp-{os.getpid()}")
    tokenizer = tokenizer or ByteTokenizer()
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=getattr(tokenizer, "dtype", np.uint8))
    documents = tokens = 0
    try:
        for text in texts:
            if not text:
                continue
            ids = tokenizer.document(text)
            builder.add_document(ids, [ids.size])
            documents += 1
            tokens += ids.size
        builder.finalize(f"{tmp}.idx")
        if hasattr(tokenizer, "path"):
            shutil.copy(tokenizer.path, f"{prefix}.tokenizer.json")
        elif os.path.exists(f"{prefix}.tokenizer.json"):  # bytes now: a stale BPE file would mislead readers
            os.remove(f"{prefix}.tokenizer.json")
        os.replace(f"{tmp}.bin", f"{prefix}.bin")
        os.replace(f"{tmp}.idx", f"{prefix}.idx")
    finally:
        builder.data_file.close()
        for ext in (".bin", ".idx"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{tmp}{ext}")
    return IndexedStats(documents=documents, tokens=tokens)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the ``with`` body.

    Used so that concurrent processes (ranks of one job, or two jobs sharing a cache) do expensive
    cache builds once: the first builds, the others block and then find the result.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
