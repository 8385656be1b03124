"""One rule for comparing two computations of the same values whose sums run in different orders:
expert-parallel vs single-device, a compiled kernel vs the pure-PyTorch reference, one CPU vector ISA
vs another (the compiled kernels follow the machine's ISA, and their reduction order with it).

Recursive summation of n terms is exact to within about n * u times the terms' magnitude (u = eps/2,
Higham, *Accuracy and Stability of Numerical Algorithms*, 4.2), so two orders differ by up to about
n * eps times it, plus the final rounding of each result to its dtype. The bound therefore scales
with the values' magnitude (the expected tensor's largest entry; an element-wise bound fails where
terms cancel) and with ``reduction``, the longest chain of terms summed into one output.

``MOE_SYS_TEST_SEED`` shifts every seed the comparison tests draw their inputs and weights with, so a
loop can run them on fresh random values (bench/tolerance_repeat.sh); unset, the seeds are the usual ones.
"""
import os
from typing import Optional

import torch

SEED_OFFSET = int(os.environ.get("MOE_SYS_TEST_SEED", "0"))


def seed(base: int) -> int:
    """The seed to use where a test would use ``base``."""
    return base + 7919 * SEED_OFFSET


def bound(dtype: torch.dtype, reduction: int, floor: float = 0.0, accumulate: torch.dtype = torch.float32) -> float:
    """Largest allowed |actual - expected| / max|expected|: two roundings of the result to ``dtype``
    plus ``reduction`` terms accumulated in ``accumulate`` (fp32 for bf16/fp16 kernels too), plus
    twice ``floor``: the reference's own measured error against a float64 run of it (``rel_err``),
    for values whose terms cancel, where the result's magnitude understates the terms' (SMEAR's
    input gradient sums through a softmax over experts): each fp32 order may be that far off."""
    accumulate = torch.float64 if dtype == torch.float64 else accumulate
    return 2 * torch.finfo(dtype).eps + reduction * torch.finfo(accumulate).eps + 2 * floor


def rel_err(actual: torch.Tensor, expected: torch.Tensor, magnitude: Optional[torch.Tensor] = None) -> float:
    """max |actual - expected| over the values' magnitude: the largest entry of ``magnitude`` (the same
    computation on the inputs' absolute values, i.e. each output's sum of |terms|, where terms may
    cancel), else of ``expected``."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = (expected if magnitude is None else magnitude.detach().double()).abs().max() if expected.numel() else None
    return float((actual - expected).abs().max() / scale.clamp_min(1e-30)) if expected.numel() else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, reduction: int, what: str = "",
                 magnitude: Optional[torch.Tensor] = None) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (what, actual.shape, expected.shape,
                                                                               actual.dtype, expected.dtype)
    err, tol = rel_err(actual, expected, magnitude), bound(expected.dtype, reduction)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} ({expected.dtype}, reduction {reduction})"
