"""torchvision for the test-only dependencies, on a CPU-only torch.

timm requires torchvision, so ``pip install -e .[dev]`` brings one; beside the CPU build of torch, pip
can only pick PyPI's CUDA build, whose C ops do not load: ``import torchvision`` raises, and so does
every ``transformers`` model import (transformers imports torchvision whenever it is installed).
``hide_if_broken`` (tests/conftest.py) then makes it absent (``sys.modules['torchvision'] = None``), so
transformers runs without it. timm imports torchvision at import time (data transforms,
FrozenBatchNorm2d, FX feature extraction) but its VisionTransformer calls none of it:
``vision_transformer_class`` imports timm with inert stub modules standing in, then hides them again.
Where torchvision works, both use it as is.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from unittest import mock

_BROKEN = False


def hide_if_broken() -> None:
    global _BROKEN
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        return
    except Exception:  # a CUDA-built torchvision beside a CPU torch: RuntimeError from its op registrations
        _BROKEN = True
        _drop_modules()
        sys.modules["torchvision"] = None


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return mock.MagicMock(name=f"{self.__name__}.{name}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _drop_modules() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def vision_transformer_class():
    """timm's VisionTransformer, importable whether or not torchvision works."""
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:  # absent, or hidden by hide_if_broken
        finder = _StubFinder()
        _drop_modules()
        sys.meta_path.insert(0, finder)
        try:
            from timm.models.vision_transformer import VisionTransformer
        finally:
            sys.meta_path.remove(finder)
            _drop_modules()
            if _BROKEN:
                sys.modules["torchvision"] = None
        return VisionTransformer
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer
