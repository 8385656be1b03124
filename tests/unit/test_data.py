"""moe_sys.data: embedded corpus, prepare-data, blended megatron datasets, resumable batches."""

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_sys.data import (
    DOMAINS,
    EOD,
    BatchStream,
    ByteTokenizer,
    PrepareDataError,
    ResumableBatchSampler,
    build_datasets,
    ensure_corpus,
    eval_batches,
    prepare_data,
)
from moe_sys.data.corpus import build_corpus, corpus_dir, read_manifest

SMALL = {"code": 150_000, "prose": 150_000, "data": 150_000}  # quick corpora for build-behaviour tests
# fork keeps the already-imported torch/megatron (spawn would re-import them: ~6 s per process)
FORK = mp.get_context("fork")


def _bytes(prefix: str) -> bytes:
    return Path(prefix + ".bin").read_bytes()


@pytest.fixture(scope="session")
def corpus_root(tmp_path_factory):
    """The full default embedded corpus, built once per test session."""
    root = tmp_path_factory.mktemp("cache")
    ensure_corpus(root)
    return root


@pytest.fixture(scope="session")
def prefixes(corpus_root):
    return ensure_corpus(corpus_root)  # cached: returns at once


# ---------------------------------------------------------------- tokenizer
def test_byte_tokenizer_eod_and_nul():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256 and tok.eod == EOD == 0
    doc = tok.document("a\x00é")
    assert doc.tolist() == [97, 0xC3, 0xA9, EOD]  # the NUL is dropped, EOD appended
    assert tok.detokenize(tok.tokenize("héllo")) == "héllo"


# ---------------------------------------------------------------- corpus
def test_corpus_has_domains_of_useful_size(prefixes):
    assert list(prefixes) == list(DOMAINS) == ["code", "prose", "data"]
    manifest = read_manifest(prefixes["code"])
    for domain, prefix in prefixes.items():
        data = _bytes(prefix)
        stats = manifest["domains"][domain]
        assert len(data) == stats["tokens"] > 1_000_000, domain
        assert data.count(EOD) == stats["documents"] > 100, domain
        assert data[-1] == EOD
    assert b"\ndef " in _bytes(prefixes["code"])
    assert b"the " in _bytes(prefixes["prose"]) and b"# json.decoder\n" in _bytes(prefixes["prose"])
    assert b"LATIN CAPITAL LETTER A" in _bytes(prefixes["data"])


def test_corpus_build_is_deterministic(tmp_path):
    build_corpus(tmp_path / "a", SMALL)
    build_corpus(tmp_path / "b", SMALL)
    for domain in DOMAINS:
        for ext in (".bin", ".idx"):
            a = (tmp_path / "a" / f"{domain}{ext}").read_bytes()
            assert a == (tmp_path / "b" / f"{domain}{ext}").read_bytes(), domain + ext
        assert len((tmp_path / "a" / f"{domain}.bin").read_bytes()) >= SMALL[domain]


def _ensure_small(root, queue):
    from moe_sys.data import corpus

    build = corpus.build_corpus

    def counting_build(*args, **kwargs):  # records every real build in this process
        with open(root.parent / "builds.log", "a") as log:
            log.write(f"{os.getpid()}\n")
        return build(*args, **kwargs)

    corpus.build_corpus = counting_build
    queue.put(ensure_corpus(root, SMALL))


def test_concurrent_ensure_corpus_is_safe(tmp_path):
    root = tmp_path / "cache"
    stale = corpus_dir(root, SMALL).parent / f".{corpus_dir(root, SMALL).name}.tmp-99999"
    stale.mkdir(parents=True)  # as left by a crashed build: must be ignored and cleaned up
    queue = FORK.Queue()
    procs = [FORK.Process(target=_ensure_small, args=(root, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    assert len((tmp_path / "builds.log").read_text().split()) == 1  # the second process waited, then reused
    build_corpus(tmp_path / "reference", SMALL)
    for domain, prefix in results[0].items():
        assert _bytes(prefix) == (tmp_path / "reference" / f"{domain}.bin").read_bytes()
    leftovers = [p.name for p in corpus_dir(root, SMALL).parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


# ---------------------------------------------------------------- datasets
@pytest.fixture(scope="module")
def blend(corpus_root):
    domains = {"code": (None, 0.8), "prose": (None, 0.2)}
    return build_datasets(domains, seq_len=64, seed=7, num_train_samples=4000, num_valid_samples=100,
                          cache_dir=corpus_root)


def test_dataset_items(blend, prefixes):
    train, valid = blend
    assert len(train) == 4000 and len(valid) == 100
    assert train.domain_names == ["code", "prose"]
    for idx in range(0, 4000, 397):
        item = train[idx]
        assert item["tokens"].shape == item["labels"].shape == item["loss_mask"].shape == (64,)
        assert item["tokens"].dtype == item["labels"].dtype == torch.int64
        assert torch.equal(item["tokens"][1:], item["labels"][:-1])  # labels = next byte
        assert 0 <= int(item["tokens"].min()) and int(item["tokens"].max()) < 256
        # the domain id names the corpus the sample was cut from
        sample = bytes(item["tokens"].tolist() + [int(item["labels"][-1])])
        domain = train.domain_names[item["domain_id"]]
        assert sample.split(b"\x00")[0] in _bytes(prefixes[domain])


def test_valid_split_holds_out_documents(blend, prefixes):
    from moe_sys.data._megatron import IndexedDataset

    train, valid = blend
    for domain, tr, va in zip(train.domain_names, train.blended.datasets, valid.blended.datasets):
        n_docs = len(IndexedDataset(prefixes[domain]).sequence_lengths)
        assert len(tr.indices) == round(0.98 * n_docs) and len(va.indices) == n_docs - len(tr.indices)
        assert not set(tr.indices.tolist()) & set(va.indices.tolist())


def test_domain_ids_follow_weights(blend):
    train, valid = blend
    for ds in (train, valid):
        frac = np.bincount(ds.domain_ids(), minlength=2) / len(ds)
        assert abs(frac[0] - 0.8) < 0.02 and abs(frac[1] - 0.2) < 0.02
    stream = BatchStream(train, micro_batch_size=16, seed=3)
    ids = torch.cat([next(stream)["domain_ids"] for _ in range(25)])
    assert abs(ids.float().mean().item() - 0.2) < 0.06  # shuffled batches keep the mix


def test_build_datasets_is_deterministic(blend, corpus_root):
    again, _ = build_datasets({"code": (None, 0.8), "prose": (None, 0.2)}, seq_len=64, seed=7,
                              num_train_samples=4000, num_valid_samples=100, cache_dir=corpus_root)
    for idx in (0, 1, 1234, 3999):
        assert torch.equal(again[idx]["tokens"], blend[0][idx]["tokens"])


def test_build_datasets_errors(tmp_path, corpus_root):
    with pytest.raises(ValueError, match="not an embedded domain"):
        build_datasets({"poetry": (None, 1.0)}, 64, 0, 10, 0, cache_dir=corpus_root)
    with pytest.raises(FileNotFoundError, match="no indexed dataset"):
        build_datasets({"mine": (str(tmp_path / "nope"), 1.0)}, 64, 0, 10, 0, cache_dir=corpus_root)
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"text": f"doc {i} " * 50}) + "\n" for i in range(3)))
    prepare_data([few], tmp_path / "few")
    with pytest.raises(ValueError, match="too few for a"):
        build_datasets({"few": (str(tmp_path / "few"), 1.0)}, 16, 0, 10, 5, cache_dir=tmp_path)


# ---------------------------------------------------------------- batches
def test_batch_stream_shapes_and_resume(blend):
    train, _ = blend
    stream = BatchStream(train, micro_batch_size=4, dp_rank=1, dp_size=2, seed=11)
    first = [next(stream) for _ in range(5)]
    batch = first[0]
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (4, 64)
    assert batch["domain_ids"].shape == (4,) and batch["domain_ids"].dtype == torch.int64
    state = stream.state_dict()
    assert state["consumed_samples"] == 5 * 4 * 2
    expected = [next(stream) for _ in range(3)]

    resumed = BatchStream(train, micro_batch_size=4, dp_rank=1, dp_size=2, seed=11)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_batch_stream_workers_match_in_process(blend):
    train, _ = blend
    plain = BatchStream(train, micro_batch_size=4, seed=5)
    workers = BatchStream(train, micro_batch_size=4, seed=5, num_workers=2)
    for _ in range(4):
        a, b = next(plain), next(workers)
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["domain_ids"], b["domain_ids"])
    assert workers.consumed_samples == 16  # prefetching workers do not advance the saved position


def test_sampler_shards_one_global_stream():
    def take(rank, world, batch, seed=0, steps=6):
        it = iter(ResumableBatchSampler(10, batch, rank, world, seed))
        return [next(it) for _ in range(steps)]

    single = take(0, 1, 4)
    r0, r1 = take(0, 2, 2), take(1, 2, 2)
    assert [a + b for a, b in zip(r0, r1)] == single  # DP ranks split each global batch
    flat = [i for b in single for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs
    assert flat[:10] != flat[10:20]  # reshuffled each epoch
    assert take(0, 1, 4, seed=1) != single
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatchSampler(5, 4, 0, 2)


def test_eval_batches_cover_equal_steps_per_rank(blend):
    _, valid = blend
    per_rank = [list(eval_batches(valid, micro_batch_size=8, dp_rank=r, dp_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 100 // 16
    assert torch.equal(per_rank[1][0]["tokens"][0], valid[8]["tokens"])


# ---------------------------------------------------------------- prepare-data
def _read_documents(prefix) -> list[bytes]:
    data = Path(f"{prefix}.bin").read_bytes()
    assert data.endswith(b"\x00")
    return data[:-1].split(b"\x00")


def test_prepare_data_round_trip(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\nstill the first, ünïcode\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "second", "id": 1}) + "\n\n" + json.dumps({"body": "x", "text": "third\u2028!"}) + "\n")
    stats = prepare_data([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "out" / "mine")
    docs = _read_documents(tmp_path / "out" / "mine")
    assert docs == ["first document\n\nstill the first, ünïcode\n".encode(), b"second", "third\u2028!".encode()]
    assert stats.documents == 3 and stats.tokens == sum(map(len, docs)) + 3

    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "sub" / "z.md").write_text("zed")
    (tmp_path / "dir" / "y.jsonl").write_text(json.dumps({"content": "why"}) + "\n")
    (tmp_path / "dir" / "skip.bin").write_bytes(b"\xff\xfe")
    prepare_data([tmp_path / "dir"], tmp_path / "d", text_key="content")
    assert _read_documents(tmp_path / "d") == [b"zed", b"why"]  # sorted: sub/z.md before y.jsonl

    # a prepared dataset is a valid training domain next to an embedded one
    (tmp_path / "many.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 20}) + "\n" for i in range(100)))
    prepare_data([tmp_path / "many.jsonl"], tmp_path / "many")
    train, valid = build_datasets({"mine": (str(tmp_path / "many"), 1.0)}, 32, 0, 50, 4, cache_dir=tmp_path)
    assert b"doc " in bytes(train[0]["tokens"].tolist()) and len(valid) == 4


@pytest.mark.parametrize("content, key, message", [
    ('{"text": "ok"}\n{"text": "ok", }\n', "text", r"bad\.jsonl:2: invalid JSON"),
    ('{"text": "ok"}\n\n{"body": "x"}\n', "text", r"bad\.jsonl:3: no 'text' key \(keys: 'body'\)"),
    ('{"text": 5}\n', "text", r"bad\.jsonl:1: 'text' is int, expected a string"),
    ('["text"]\n', "text", r"bad\.jsonl:1: expected a JSON object, got list"),
    ('\n\n', "text", r"no documents found"),
])
def test_prepare_data_errors_name_file_and_line(tmp_path, content, key, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(PrepareDataError, match=message):
        prepare_data([tmp_path / "bad.jsonl"], tmp_path / "out", text_key=key)
    assert not any(tmp_path.glob("out*")) and not any(tmp_path.glob(".out*"))  # nothing half-written


def test_prepare_data_input_errors(tmp_path):
    with pytest.raises(PrepareDataError, match=r"missing\.txt: no such file"):
        prepare_data([tmp_path / "missing.txt"], tmp_path / "out")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(PrepareDataError, match=r"latin1\.txt: not UTF-8 text \(bad byte at offset 3\)"):
        prepare_data([tmp_path / "latin1.txt"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareDataError, match="directory has no"):
        prepare_data([tmp_path / "empty"], tmp_path / "out")
    assert not os.path.exists(tmp_path / "out.bin")
    # a failed run leaves an existing dataset at the prefix untouched
    (tmp_path / "good.txt").write_text("good")
    prepare_data([tmp_path / "good.txt"], tmp_path / "out")
    (tmp_path / "blank.jsonl").write_text("\n")
    with pytest.raises(PrepareDataError, match="no documents found"):
        prepare_data([tmp_path / "blank.jsonl"], tmp_path / "out")
    assert _read_documents(tmp_path / "out") == [b"good"]


# ---------------------------------------------------------------- torch.distributed
def _distributed_build(rank, world, init_file, corpus_root, queue):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train, valid = build_datasets({"prose": (None, 1.0), "code": (None, 3.0)}, seq_len=48, seed=99,
                                      num_train_samples=1000, num_valid_samples=40, cache_dir=corpus_root)
        batch = next(BatchStream(train, micro_batch_size=4, dp_rank=rank, dp_size=world, seed=1))
        queue.put((rank, train.domain_ids().tolist(), train[123]["tokens"].tolist(), batch["tokens"].tolist()))
    finally:
        torch.distributed.destroy_process_group()


def test_build_datasets_under_torch_distributed(tmp_path, corpus_root):
    queue = FORK.Queue()
    procs = [FORK.Process(target=_distributed_build, args=(r, 2, tmp_path / "pg", corpus_root, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, rest) for r, *rest in [queue.get(timeout=120) for _ in procs])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (ids0, item0, batch0), (ids1, item1, batch1) = results[0], results[1]
    assert ids0 == ids1 and item0 == item1  # every rank sees the same dataset
    assert batch0 != batch1  # ... and reads its own shard of it
    local, _ = build_datasets({"prose": (None, 1.0), "code": (None, 3.0)}, seq_len=48, seed=99,
                              num_train_samples=1000, num_valid_samples=40, cache_dir=corpus_root)
    assert local.domain_ids().tolist() == ids0 and local[123]["tokens"].tolist() == item0
