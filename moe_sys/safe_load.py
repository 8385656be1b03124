"""The one way moe_sys reads torch files: nothing it loads can run code.

A ``.pt`` file is a pickle, and unpickling can call any function the file names. Every torch file
moe_sys reads (DeepSpeed checkpoints, model weights for ``train.init_from`` and ``merge``) goes through
``load_torch``: ``torch.load(weights_only=True)`` plus an allow-list of the few plain classes
DeepSpeed 0.19's own files contain. Anything else is refused with ``UnsafeFileError`` naming the
file, before a single object is built. ``check_torch`` reads a file's pickle without running it, so a
command can refuse a checkpoint before it starts any rank.
"""
from __future__ import annotations

import functools
import pickle
import zipfile
from typing import Any, List, Sequence

import torch

from moe_sys.errors import UserError


class UnsafeFileError(UserError):
    """A file moe_sys refuses to load (one line: the file and why)."""


@functools.lru_cache(maxsize=None)
def _allowed() -> tuple:
    """What DeepSpeed's ZeRO optimizer files hold besides tensors and containers (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on its files): plain data classes."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


def numpy_arrays() -> list:
    """What a pickled numpy array names (checkpoints' RNG states before they were safetensors); its
    elements still go through the weights-only unpickler."""
    import numpy as np
    from numpy._core.multiarray import _reconstruct

    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct]


def _names(objects: Sequence[Any]) -> set:
    return {f"{obj.__module__}.{obj.__qualname__}" for obj in objects}


def check_torch(path: str, also_allow: Sequence[Any] = ()) -> None:
    """Refuse ``path`` unless ``load_torch`` would accept it; reads the pickle, runs nothing."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise UnsafeFileError(f"{path}: not a readable torch file ({_first_line(e)})") from None
    refused = sorted(set(names) - _names([*_allowed(), *also_allow]))
    if refused:
        raise UnsafeFileError(f"{path}: refused to load: it would run code ({', '.join(refused[:3])})")


def load_torch(path: str, map_location: Any = "cpu", also_allow: Sequence[Any] = ()) -> Any:
    """torch.load with ``weights_only=True`` and DeepSpeed's allow-list (plus ``also_allow``);
    refuses anything else."""
    try:
        with torch.serialization.safe_globals([*_allowed(), *also_allow]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(f"{path}: refused to load: it would run code ({_unsupported(e)})") from None
    except (zipfile.BadZipFile, RuntimeError, EOFError) as e:
        raise UnsafeFileError(f"{path}: not a readable torch file ({_first_line(e)})") from None


def make_engine_loads_safe(engine) -> None:
    """DeepSpeed's checkpoint engine loads model, expert and optimizer files with ``weights_only=False``;
    every one of those loads goes through ``engine.checkpoint_engine.load``, so that is replaced."""
    engine.checkpoint_engine.load = load_torch


def load_safetensors(path: str) -> dict:
    """safetensors (no code by design); a damaged or foreign file gets one line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise UnsafeFileError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def _unsupported(e: BaseException) -> str:
    """The line of torch's long weights-only message that names what the file asked for."""
    lines = [line.strip() for line in str(e).splitlines() if "Unsupported" in line or "GLOBAL" in line]
    return lines[0][:200] if lines else _first_line(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


__all__: List[str] = ["UnsafeFileError", "check_torch", "load_torch", "load_safetensors", "make_engine_loads_safe"]
