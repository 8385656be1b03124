"""Shared fixtures for the op tests: the compiled extension, devices, and random routings.

Legend: T tokens, K slots per token, E experts, D row width.
"""
from __future__ import annotations

import pytest
import torch

from moe_sys.ops import build
from tests import tolerance

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.fixture(scope="session")
def kernels():
    """torch.ops.moe_sys after the JIT build; skips only when the machine cannot compile at all."""
    status = build.load()
    if status.library is None:
        if status.reason.startswith(("no C++ compiler", "ninja")):
            pytest.skip(f"compiled ops unavailable: {status.reason}")
        pytest.fail(f"the moe_sys extension failed to build: {status.reason}")
    return torch.ops.moe_sys


def random_routing(T: int, K: int, E: int, *, drop_p: float = 0.2, unused=(0,), seed: int = 0,
                   device="cpu") -> torch.Tensor:
    """expert_ids_TK like a top-k router's: K distinct experts per token, never the ``unused`` ones
    (so some experts get no tokens), and a fraction ``drop_p`` of slots set to -1 (router-dropped)."""
    g = torch.Generator().manual_seed(tolerance.seed(seed))
    scores_TE = torch.rand(T, E, generator=g)
    scores_TE[:, list(unused)] = -1.0
    ids_TK = scores_TE.topk(K, dim=1).indices if T else torch.empty(0, K, dtype=torch.long)
    dropped = torch.rand(T, K, generator=g) < drop_p
    return ids_TK.masked_fill(dropped, -1).to(device)


def randn(*shape, dtype=torch.float32, seed: int = 0, device="cpu", requires_grad=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(tolerance.seed(seed))
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
