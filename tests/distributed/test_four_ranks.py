"""Four real gloo ranks, one spawned group: EP=2 x DP=2 and EP=4, one DeepSpeed step each (ZeRO-2,
ZeRO-1), equal to EP=1; and a checkpoint saved at EP=2 x DP=2 continued at EP=4 (resharded by
``--resume``), equal to an uninterrupted EP=4 run."""
from tests.distributed.engine_case import step_errors
from tests.distributed.spawn import run_ranks
from tests.distributed.test_reshard import SWITCH, _cfg, _close, _train

CASES = [(2, 2), (4, 1)]  # (ep_size, zero_stage)


def _cases(rank, world, tmp):
    steps = [step_errors(rank, world, ep, zero) for ep, zero in CASES]
    straight = _train(_cfg(tmp, world, "straight", 4, 1))
    grown = _train(_cfg(tmp, world, "grow", 2, 1, f"train.stop_after={SWITCH}"))
    grown += _train(_cfg(tmp, world, "grow", 4, 1), resume="auto")
    return steps, straight, grown


def test_ep2_dp2_and_ep4_equal_ep1_and_ep2_checkpoint_continues_at_ep4(tmp_path):
    results = run_ranks(_cases, 4, str(tmp_path))
    for steps, _, _ in results:
        for (ep, zero), (errs, edp_sizes) in zip(CASES, steps):
            assert edp_sizes == {4 // ep}, (ep, edp_sizes)
            assert max(errs.values()) < 1e-5, (ep, zero, {k: v for k, v in errs.items() if v >= 1e-5})
    _, straight, grown = results[0]
    assert len(grown) == len(straight) == 4
    _close(grown, straight)
    assert (tmp_path / "grow" / "checkpoints" / "step_00000002-ep4").is_dir()
