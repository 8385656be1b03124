"""Byte-level BPE data: trained offline, round-trips text, stored as uint16 that megatron-core reads
back, copied beside the data, and a model vocabulary smaller than the data's fails the config check."""
from __future__ import annotations

import json

import numpy as np
import pytest

import tokenizers  # noqa: E402,F401  (dev extra: a hard test dependency)

from moe_sys.cli import main  # noqa: E402
from moe_sys.config import ConfigError, load_config  # noqa: E402
from moe_sys.data import stdlib_text  # noqa: E402
from moe_sys.data.bpe import BPETokenizer  # noqa: E402

TEXT = "héllo wörld — naïve café ✓\n\tdef f(x):\n        return x ** 2  # 日本語"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few hundred KB of the embedded corpus's sources, as .txt files."""
    root = tmp_path_factory.mktemp("bpe")
    size = 0
    for i, source in enumerate(sorted(stdlib_text.sources("code"), key=lambda s: s.key)):
        text = source.load()
        (root / f"{i}.txt").write_text(text)
        size += len(text)
        if size > 300_000:
            break
    assert main(["prepare-data", str(root), "--output", str(root / "data" / "code"), "--train-tokenizer", "700"]) == 0
    return root


def test_trained_bpe_round_trips_and_stores_uint16(corpus):
    from moe_sys.data._megatron import IndexedDataset

    prefix = str(corpus / "data" / "code")
    tok = BPETokenizer(prefix + ".tokenizer.json")
    assert tok.vocab_size == 700 and tok.detokenize(tok.tokenize(TEXT)) == TEXT
    assert len(tok.tokenize(TEXT * 4)) < len((TEXT * 4).encode()) * 0.9  # merges shorten the text
    data = IndexedDataset(prefix)
    assert data.index.dtype == np.uint16
    first = (corpus / "0.txt").read_text()
    assert data[0].tolist() == tok.document(first).tolist()


def test_prepare_data_with_a_given_tokenizer_matches(corpus, tmp_path):
    prefix = tmp_path / "again"
    assert main(["prepare-data", str(corpus / "0.txt"), "--output", str(prefix),
                 "--tokenizer", str(corpus / "data" / "code.tokenizer.json")]) == 0
    from moe_sys.data._megatron import IndexedDataset

    again, first = IndexedDataset(str(prefix)), IndexedDataset(str(corpus / "data" / "code"))  # keep the mmaps open
    assert again[0].tolist() == first[0].tolist()


def test_vocab_mismatch_fails_the_config_in_one_line(corpus):
    domain = f"data.domains=[{{name: code, path: '{corpus / 'data' / 'code'}'}}]"
    with pytest.raises(ConfigError, match=r"model.vocab_size: 256 is smaller than data.domains.0 \(code\)"):
        load_config(None, [domain])
    assert load_config(None, [domain, "model.vocab_size=700"]).model.vocab_size == 700


def test_bad_tokenizer_is_one_line(tmp_path, capsys):
    (tmp_path / "doc.txt").write_text("some text")
    (tmp_path / "tok.json").write_text(json.dumps({"not": "a tokenizer"}))
    code = main(["prepare-data", str(tmp_path / "doc.txt"), "--output", str(tmp_path / "out"),
                 "--tokenizer", str(tmp_path / "tok.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --tokenizer:") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out.bin").exists()


def test_embedded_corpus_with_bpe(tmp_path):
    from moe_sys.data._megatron import IndexedDataset
    from moe_sys.data.corpus import DOMAINS, build_corpus

    manifest = build_corpus(tmp_path, {"code": 40_000, "prose": 40_000, "data": 40_000}, bpe_vocab=400)
    tok = BPETokenizer(str(tmp_path / "tokenizer.json"))
    assert manifest["tokenizer"] == "bpe-400" and manifest["eod"] == tok.eod
    for domain in DOMAINS:
        data = IndexedDataset(str(tmp_path / domain))
        assert data.index.dtype == np.uint16 and (tmp_path / f"{domain}.tokenizer.json").exists()
        text = tok.detokenize(data[0][:-1])
        assert tok.document(text).tolist() == data[0].tolist()
    with pytest.raises(ConfigError, match="model.vocab_size: 256 is smaller than data.domains.0 .*embedded-bpe-400"):
        load_config(None, ["data.embedded_bpe=400"])
    assert load_config(None, ["data.embedded_bpe=400", "model.vocab_size=400"]).data.embedded_bpe == 400
