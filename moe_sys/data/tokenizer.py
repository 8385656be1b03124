"""Byte-level tokenizer: token id = UTF-8 byte value, vocab 256, no merges, no files.

Why bytes: the embedded corpus must work offline on any machine, so the tokenizer cannot be a
downloaded vocabulary. Bytes need no training, cover every language and every code file, and keep the
model's embedding table tiny (256 rows), which suits the small MoE runs this project trains.

Special-token convention:
  * EOD = 0 (the NUL byte). Every document in an indexed dataset ends with one EOD. NUL never appears
    in real text, and ``tokenize`` drops any NUL it finds, so 0 is unambiguous as a document end.
  * There is no pad token in the vocabulary. megatron-core pads (rarely: only a short tail sample)
    with its own sentinel -1, masks the loss there and maps the id to 0 before returning the sample,
    so a model never sees an id outside [0, 256).

This class duck-types megatron-core's ``MegatronTokenizerBase`` for what ``GPTDataset`` reads:
``vocab_size``, ``eod`` and ``unique_identifiers`` (which goes into the sample-index cache key).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

EOD = 0
VOCAB_SIZE = 256


class ByteTokenizer:
    """UTF-8 bytes as token ids; ``EOD`` (0) ends a document."""

    vocab_size = VOCAB_SIZE
    eod = EOD

    def __init__(self) -> None:
        self.unique_identifiers = OrderedDict(class_="ByteTokenizer", vocab_size=VOCAB_SIZE, eod=EOD)

    def tokenize(self, text: str) -> np.ndarray:
        """Encode ``text`` to uint8 ids [N]; NULs are dropped so 0 only ever means EOD."""
        data = text.encode("utf-8", errors="replace").replace(b"\x00", b"")
        return np.frombuffer(data, dtype=np.uint8)

    def document(self, text: str) -> np.ndarray:
        """Encode ``text`` as one EOD-terminated document: uint8 ids [N + 1]."""
        data = text.encode("utf-8", errors="replace").replace(b"\x00", b"") + bytes([EOD])
        return np.frombuffer(data, dtype=np.uint8)

    def detokenize(self, ids) -> str:
        """Decode ids back to text; EOD becomes a newline, invalid UTF-8 a replacement char."""
        data = bytes(int(i) for i in ids)
        return data.replace(bytes([EOD]), b"\n").decode("utf-8", errors="replace")
