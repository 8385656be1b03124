"""The one place moe_sys.data imports megatron-core's dataset stack.

Importing ``megatron.core.datasets`` drags in all of ``megatron.core`` (about 5 s, and warnings that
Transformer Engine / Apex are missing, which concern megatron's optimizers, not its datasets). The
other data modules import this module inside functions, so ``import moe_sys.data`` stays cheap and the
irrelevant warnings are silenced here only.

Two megatron warnings are filtered out because they flag choices made on purpose in ``dataset.py``:
the BlendedDataset is built without an index cache (see why there; its indices are cheap to
recompute), and a one-domain config still goes through a BlendedDataset (so items always carry
``domain_id``).
"""

import logging
import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    from megatron.core.datasets.utils import Split


def _drop_expected_blend_warnings(record: logging.LogRecord) -> bool:
    message = str(record.msg)
    return not (message.startswith("Cannot save the BlendedDataset indexes")
                or message.startswith("Building a BlendedDataset for a single MegatronDataset"))


logging.getLogger("megatron.core.datasets.blended_dataset").addFilter(_drop_expected_blend_warnings)

__all__ = [
    "BlendedDataset",
    "BlendedMegatronDatasetBuilder",
    "GPTDataset",
    "GPTDatasetConfig",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "Split",
]
