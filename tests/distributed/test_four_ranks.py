"""Four real gloo ranks: EP=2 x DP=2 and EP=4, one DeepSpeed step each (ZeRO-2, ZeRO-1), equal to EP=1."""
from tests.distributed.engine_case import step_errors
from tests.distributed.spawn import run_ranks

CASES = [(2, 2), (4, 1)]  # (ep_size, zero_stage)


def _cases(rank, world):
    return [step_errors(rank, world, ep, zero) for ep, zero in CASES]


def test_ep2_dp2_and_ep4_equal_ep1():
    for rank_results in run_ranks(_cases, 4):
        for (ep, zero), (errs, edp_sizes) in zip(CASES, rank_results):
            assert edp_sizes == {4 // ep}, (ep, edp_sizes)
            assert max(errs.values()) < 1e-5, (ep, zero, {k: v for k, v in errs.items() if v >= 1e-5})
