"""Eight real gloo ranks, ZeRO-2, EP=4 x DP=2: one DeepSpeed step equals EP=1, expert gradients reduced
over the 2-rank expert-data-parallel group only."""
from tests.distributed.engine_case import step_errors
from tests.distributed.spawn import run_ranks


def _case(rank, world):
    return step_errors(rank, world, ep_size=4, zero_stage=2)


def test_ep4_dp2_zero2_equals_ep1():
    for errs, edp_sizes in run_ranks(_case, 8):
        assert edp_sizes == {2}
        assert max(errs.values()) < 1e-5, {k: v for k, v in errs.items() if v >= 1e-5}
