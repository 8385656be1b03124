"""``moe-sys prepare-data``: turn a user's text / JSON Lines files into an indexed dataset.

Input conventions (kept deliberately simple):
  * ``*.jsonl`` - one document per non-blank line, the text under ``text_key`` (default ``"text"``).
  * any other file - the whole file is one document (UTF-8). Paragraphs are not split: megatron's
    GPTDataset packs documents into fixed-length samples anyway, so document boundaries only matter
    where the text really changes (the EOD token marks them).
  * a directory - its ``*.txt``, ``*.md``, ``*.rst`` and ``*.jsonl`` files, recursively, sorted.
Output: ``<output_prefix>.bin/.idx`` (bytes by default, as the embedded corpus; with ``--tokenizer`` or
``--train-tokenizer`` BPE ids and ``<output_prefix>.tokenizer.json`` beside them), usable as a
``data.domains[*].path``. Any problem with the input raises ``PrepareDataError`` naming the file (and
line) before an output file appears.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

from moe_sys.data.indexed import IndexedStats, write_indexed_dataset

DIRECTORY_SUFFIXES = (".txt", ".md", ".rst", ".jsonl")


class PrepareDataError(ValueError):
    """A user-facing problem with prepare-data's inputs; the message names the file and line."""


def prepare_data(inputs: Sequence[str | os.PathLike], output_prefix: str | os.PathLike,
                 text_key: str = "text", tokenizer: Optional[str] = None,
                 train_tokenizer: Optional[int] = None) -> IndexedStats:
    """Tokenize ``inputs`` into the indexed dataset ``output_prefix``.bin/.idx.

    Args:
        inputs: files and/or directories (see the module docstring for formats).
        output_prefix: output path without extension.
        text_key: the JSON field holding the text in ``.jsonl`` files.
        tokenizer: a tokenizer.json or a Hugging Face model dir holding one; None = bytes.
        train_tokenizer: train a byte-level BPE of this vocabulary size on the inputs first.
    Returns:
        IndexedStats(documents, tokens) written.
    Raises:
        PrepareDataError: missing input, undecodable file, bad JSON line, missing or non-string key,
            or no documents at all.
    """
    files = expand_inputs(inputs)
    if train_tokenizer is None:
        return write_indexed_dataset(output_prefix, _documents(files, text_key), _load_tokenizer(tokenizer))
    if tokenizer is not None:
        raise PrepareDataError("--tokenizer and --train-tokenizer exclude each other")
    if not 257 <= train_tokenizer <= 2**31 - 1:
        raise PrepareDataError(f"--train-tokenizer: {train_tokenizer}: the vocabulary needs more than the 256 bytes")
    from moe_sys.data.bpe import train_bpe

    texts = list(_documents(files, text_key))
    with tempfile.TemporaryDirectory() as tmp:
        trained = train_bpe(texts, train_tokenizer, os.path.join(tmp, "tokenizer.json"))
        return write_indexed_dataset(output_prefix, texts, trained)


def _load_tokenizer(path: Optional[str]):
    if path is None:
        return None
    from moe_sys.data.bpe import BPETokenizer

    try:
        return BPETokenizer(path)
    except (FileNotFoundError, ValueError) as e:
        raise PrepareDataError(f"--tokenizer: {e}") from None
    except Exception as e:  # tokenizers raises its own exception type for a malformed file
        raise PrepareDataError(f"--tokenizer: {path}: not a tokenizer.json ({str(e).splitlines()[0]})") from None


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Input paths with directories replaced by their matching files; errors on anything missing."""
    if not inputs:
        raise PrepareDataError("no input files given")
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DIRECTORY_SUFFIXES)
            if not found:
                raise PrepareDataError(f"{path}: directory has no {'/'.join(DIRECTORY_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise PrepareDataError(f"{path}: no such file or directory")
    return files


def _documents(files: list[Path], text_key: str) -> Iterator[str]:
    """Non-empty document texts; raising here (inside the writer) means no output is published."""
    found = False
    for path in files:
        texts = _jsonl_documents(path, text_key) if path.suffix == ".jsonl" else [_read_text(path)]
        for text in texts:
            if text:
                found = True
                yield text
    if not found:
        raise PrepareDataError(f"no documents found in {', '.join(map(str, files))}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PrepareDataError(f"{path}: not UTF-8 text (bad byte at offset {err.start})") from None


def _jsonl_documents(path: Path, text_key: str) -> Iterator[str]:
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PrepareDataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise PrepareDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if text_key not in record:
            keys = ", ".join(map(repr, record)) or "none"
            raise PrepareDataError(f"{where}: no {text_key!r} key (keys: {keys})")
        text = record[text_key]
        if not isinstance(text, str):
            raise PrepareDataError(f"{where}: {text_key!r} is {type(text).__name__}, expected a string")
        yield text
