"""Activation checkpointing with the all-to-all inside, on two real gloo ranks (EP=2): the recomputed
dispatch exchanges the forward's rows, so gradients and balancing state equal the run without it."""
import torch
import torch.distributed as dist

from tests.distributed.spawn import run_ranks


def _sharded():
    from moe_sys.moe import balance
    from moe_sys.parallel.experts import shard_and_mark_experts
    from moe_sys.parallel.groups import create_expert_groups
    from tests.unit.test_recompute import tiny_model

    model = tiny_model(ep_size=2)
    shard_and_mark_experts(model, create_expert_groups(2))
    balance.set_group(model, dist.group.WORLD)
    return model


def _all_modes(rank, world):
    from tests.unit.test_recompute import assert_same, step_state

    tokens_BS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(10 + rank))
    plain = step_state(_sharded, "none", tokens_BS)
    for mode in ("full", "moe"):
        assert_same(step_state(_sharded, mode, tokens_BS), plain)
    return [float(c.sum()) for c in plain["global"]]


def test_checkpointing_at_ep2_equals_plain():
    per_rank = run_ranks(_all_modes, 2)
    # Global counts summed over both ranks once per micro-batch: 2 ranks x 32 tokens x 2 choices.
    assert per_rank[0] == per_rank[1] == [128.0, 128.0]
