"""The embedded default corpus: built on first use from the standard library, cached, never downloaded.

Layout under the cache root (default ``~/.cache/moe_sys``)::

    corpus/py3.11.7-v1-<caps hash>/{code,prose,data}.{bin,idx}, manifest.json

The directory name carries the Python version (the stdlib text differs between releases), the corpus
format version and a hash of the size caps, so a cache is never reused for a different corpus.

Deterministic: candidate documents are ordered by a SHA-1 of their stable key (not by file name, so a
size cap keeps a spread of the stdlib, and megatron's contiguous train/valid split of documents holds
out a random sample rather than the alphabetically last modules) and taken until the cap.

Safe under concurrency: one process builds while others block on a file lock; the build writes into a
temporary directory that is renamed into place only when complete, so a crash or a concurrent reader
never sees half a corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
import unicodedata
from pathlib import Path
from typing import Iterator, Mapping

from moe_sys.data import stdlib_text
from moe_sys.data.indexed import file_lock, write_indexed_dataset

logger = logging.getLogger(__name__)

CORPUS_VERSION = 1
DOMAINS = stdlib_text.DOMAINS
# Bytes (= tokens) per domain. A tiny training run reads 1-2M tokens; prose and data are a little
# under their caps on CPython 3.11, code is cut at the cap.
DEFAULT_MAX_BYTES = {"code": 4_000_000, "prose": 3_000_000, "data": 3_000_000}
_MANIFEST = "manifest.json"


def default_cache_root() -> Path:
    """``~/.cache/moe_sys``: where corpora and megatron sample indices live unless configured."""
    return Path.home() / ".cache" / "moe_sys"


def corpus_dir(cache_root: str | os.PathLike | None = None, max_bytes: Mapping[str, int] | None = None,
               bpe_vocab: int | None = None) -> Path:
    """The directory the embedded corpus for this interpreter, these caps and tokenizer lives in."""
    caps = dict(sorted((max_bytes or DEFAULT_MAX_BYTES).items()))
    digest = hashlib.sha1(json.dumps(caps).encode()).hexdigest()[:8]
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    tokenizer = f"-bpe{bpe_vocab}" if bpe_vocab else ""
    return root / "corpus" / f"py{platform.python_version()}-v{CORPUS_VERSION}-{digest}{tokenizer}"


def ensure_corpus(cache_root: str | os.PathLike | None = None,
                  max_bytes: Mapping[str, int] | None = None, bpe_vocab: int | None = None) -> dict[str, str]:
    """Build the embedded corpus if it is not cached yet; return ``{domain: indexed-dataset prefix}``.

    Safe to call from many processes at once (all ranks of a job may call it): one builds, the others
    wait on a lock and then reuse the result.

    Args:
        cache_root: cache root directory; None = ``default_cache_root()``.
        max_bytes: per-domain size caps in bytes; None = ``DEFAULT_MAX_BYTES``.
        bpe_vocab: tokenise with a byte-level BPE of this vocabulary trained on the corpus; None = bytes.
    Returns:
        dict mapping each of ``DOMAINS`` to its prefix (``<dir>/<domain>``, without .bin/.idx).
    """
    final = corpus_dir(cache_root, max_bytes, bpe_vocab)
    if not (final / _MANIFEST).exists():
        with file_lock(final.parent / f"{final.name}.lock"):
            if not (final / _MANIFEST).exists():
                _build_and_publish(final, max_bytes, bpe_vocab)
    return {domain: str(final / domain) for domain in DOMAINS}


def _build_and_publish(final: Path, max_bytes: Mapping[str, int] | None, bpe_vocab: int | None = None) -> None:
    """Build into a fresh temp dir next to ``final`` and rename it into place (caller holds the lock)."""
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by crashed builds
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    try:
        manifest = build_corpus(tmp, max_bytes, bpe_vocab)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = ", ".join(f"{d} {m['tokens'] / 1e6:.2f}M tok/{m['documents']} docs"
                      for d, m in manifest["domains"].items())
    logger.info("built embedded corpus at %s in %.1fs: %s", final, manifest["build_seconds"], sizes)


def build_corpus(out_dir: str | os.PathLike, max_bytes: Mapping[str, int] | None = None,
                 bpe_vocab: int | None = None) -> dict:
    """Write every domain's indexed dataset plus ``manifest.json`` into ``out_dir`` (no caching).

    Args:
        out_dir: directory to create and fill.
        max_bytes: per-domain size caps; None = ``DEFAULT_MAX_BYTES``.
        bpe_vocab: train a byte-level BPE of this vocabulary on all domains first (``tokenizer.json``,
            and ``<domain>.tokenizer.json`` beside each dataset); None = bytes.
    Returns:
        the manifest: versions, and per domain its document and token counts.
    """
    caps = {**DEFAULT_MAX_BYTES, **(max_bytes or {})}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    domains, tokenizer = {}, None
    texts = {domain: _take(stdlib_text.sources(domain), caps[domain]) for domain in DOMAINS}
    if bpe_vocab:
        from moe_sys.data.bpe import train_bpe

        texts = {domain: list(t) for domain, t in texts.items()}
        tokenizer = train_bpe([t for d in DOMAINS for t in texts[d]], bpe_vocab, str(out_dir / "tokenizer.json"))
    for domain in DOMAINS:
        stats = write_indexed_dataset(out_dir / domain, texts[domain], tokenizer)
        domains[domain] = {"documents": stats.documents, "tokens": stats.tokens, "max_bytes": caps[domain]}
    manifest = {
        "corpus_version": CORPUS_VERSION,
        "python": platform.python_version(),
        "unicodedata": unicodedata.unidata_version,
        "eod": tokenizer.eod if tokenizer else 0,
        "tokenizer": f"bpe-{bpe_vocab}" if bpe_vocab else "bytes",
        "domains": domains,
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    (out_dir / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(prefix_or_dir: str | os.PathLike) -> dict:
    """The manifest of a built corpus, given its directory or one of its domain prefixes."""
    path = Path(prefix_or_dir)
    directory = path if path.is_dir() else path.parent
    return json.loads((directory / _MANIFEST).read_text())


def _take(sources: list[stdlib_text.Source], max_bytes: int) -> Iterator[str]:
    """Texts of ``sources`` in hash-of-key order until ``max_bytes`` (the last one may overshoot)."""
    total = 0
    for src in sorted(sources, key=lambda s: hashlib.sha1(s.key.encode()).hexdigest()):
        if total >= max_bytes:
            return
        text = src.load()
        total += len(text.encode("utf-8", errors="replace"))
        yield text
