"""Byte-level BPE tokenizers (Hugging Face ``tokenizers``): load a tokenizer.json, or train one offline.

An indexed dataset made with a BPE tokenizer carries it beside its files as ``<prefix>.tokenizer.json``;
datasets without one are byte-level (``ByteTokenizer``). Ids are stored as uint16 while the vocabulary
fits (<= 65536 ids), else int32 (megatron-core's ``DType`` has no uint32), as megatron's
``GPTDatasetConfig`` expects.

Like ``ByteTokenizer`` this duck-types what megatron's GPTDataset reads: ``vocab_size``, ``eod`` and
``unique_identifiers`` (which carries a hash of the tokenizer file: the sample-index cache key).
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Iterable

import numpy as np

from moe_sys.config.data_vocab import SUFFIX, tokenizer_json_vocab
from moe_sys.data.tokenizer import ByteTokenizer

EOD_TOKEN = "<|endoftext|>"


def tokenizer_file(path: str) -> str:
    """A tokenizer.json path from a file path or a Hugging Face model directory."""
    candidate = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        raise FileNotFoundError(f"{path}: no tokenizer.json")
    return candidate


class BPETokenizer:
    """A tokenizer.json; EOD = ``<|endoftext|>`` (or the tokenizer's only special token)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.path = tokenizer_file(path)
        self.tok = Tokenizer.from_file(self.path)
        self.vocab_size = tokenizer_json_vocab(self.path)
        self.eod = self._eod()
        self.dtype = np.uint16 if self.vocab_size <= 65536 else np.int32
        with open(self.path, "rb") as f:
            digest = hashlib.sha1(f.read()).hexdigest()[:16]
        self.unique_identifiers = OrderedDict(class_="BPETokenizer", vocab_size=self.vocab_size, eod=self.eod,
                                              sha1=digest)

    def _eod(self) -> int:
        eod = self.tok.token_to_id(EOD_TOKEN)
        if eod is None:
            special = [t.content for t in self.tok.get_added_tokens_decoder().values() if t.special]
            if not special:
                raise ValueError(f"{self.path}: no {EOD_TOKEN} or other special token to end documents with")
            eod = self.tok.token_to_id(special[-1])
        return eod

    def tokenize(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=self.dtype)

    def document(self, text: str) -> np.ndarray:
        """``text`` as one EOD-terminated document [N + 1]."""
        return np.append(self.tokenize(text), np.asarray([self.eod], dtype=self.dtype))

    def detokenize(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str) -> BPETokenizer:
    """Train a byte-level BPE on ``texts`` (offline) and save it as ``out_path`` (tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(out_path)
    return BPETokenizer(out_path)


def tokenizer_for(prefix: str):
    """The tokenizer an indexed dataset was made with: ``<prefix>.tokenizer.json``, else bytes."""
    path = prefix + SUFFIX
    return BPETokenizer(path) if os.path.exists(path) else ByteTokenizer()
