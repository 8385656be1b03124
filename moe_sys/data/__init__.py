"""Data: the embedded stdlib corpus, prepare-data, megatron-core indexed datasets + blending, batches.

    ensure_corpus()  -> {domain: prefix}       build/cache the default corpus (code, prose, data)
    prepare_data()   -> IndexedStats           user .txt/.jsonl -> <prefix>.bin/.idx
    build_datasets() -> (train, valid)         per-domain GPTDatasets blended by weight; items carry domain_id
    BatchStream                                resumable per-rank batches {tokens, labels, loss_mask, domain_ids}
    eval_batches()                             one in-order, rank-sharded pass for validation

megatron-core is imported lazily (it costs seconds), so importing this package is cheap.
"""

from moe_sys.data.corpus import DOMAINS, default_cache_root, ensure_corpus
from moe_sys.data.dataset import DomainBlendDataset, build_datasets
from moe_sys.data.indexed import IndexedStats
from moe_sys.data.loader import BatchStream, ResumableBatchSampler, collate, eval_batches
from moe_sys.data.prepare import PrepareDataError, prepare_data
from moe_sys.data.tokenizer import EOD, VOCAB_SIZE, ByteTokenizer

__all__ = [
    "DOMAINS",
    "EOD",
    "VOCAB_SIZE",
    "BatchStream",
    "ByteTokenizer",
    "DomainBlendDataset",
    "IndexedStats",
    "PrepareDataError",
    "ResumableBatchSampler",
    "build_datasets",
    "collate",
    "default_cache_root",
    "ensure_corpus",
    "eval_batches",
    "prepare_data",
]
