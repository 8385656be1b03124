"""Planner: model states agree with DeepSpeed's own estimate, parameter counts with the built model,
expert state divides over the expert-data-parallel group; measured loads give the hand-computed imbalance."""
import json

import pytest
import torch

from moe_sys.cli import main
from moe_sys.config import load_config
from moe_sys.models.transformer import TransformerLM
from moe_sys.plan import comm, memory

TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "data.seq_len=32"]


def test_dense_zero2_model_states_equal_deepspeeds_estimate():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = load_config(None, TINY + ["moe.enabled=false", "train.dtype=bf16", "parallel.zero_stage=2",
                                    "parallel.ep_size=1"], world_size=8)
    counts = memory.count_params(cfg)
    ours = sum(memory.model_state_bytes(counts, cfg, world=8).values())
    _, theirs = estimate_zero2_model_states_mem_needs(counts.dense, num_gpus_per_node=4, num_nodes=2, cpu_offload=False)
    assert abs(ours - theirs) <= 1


def test_counts_match_the_model_and_expert_state_splits_over_edp():
    cfg = load_config(None, TINY + ["moe.shared_experts=1", "moe.first_moe_layer=1", "parallel.ep_size=4",
                                    "parallel.zero_stage=1", "train.dtype=bf16"], world_size=8)
    counts = memory.count_params(cfg)
    model = TransformerLM(cfg.model, cfg.moe, num_domains=len(cfg.data.domains))
    assert counts.dense + counts.expert == sum(p.numel() for p in model.parameters())
    assert counts.expert == 8 * 3 * 32 * 64  # one MoE layer: 8 SwiGLU experts
    states = memory.model_state_bytes(counts, cfg, world=8)
    assert states["optimizer"] == 16 * (counts.dense / 8 + counts.expert / 4 / 2)  # experts: edp = 8 / 4
    assert memory.activation_bytes(cfg, "full") < memory.activation_bytes(cfg, "moe") < memory.activation_bytes(cfg, "none")


def test_from_run_imbalance_by_hand(tmp_path, capsys):
    load = [0.3] + [0.1] * 7
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(3):
            f.write(json.dumps({"step": step, "expert_load": [load, [0.125] * 8]}) + "\n")
    load_LE = comm.measured_load(str(tmp_path))
    assert comm.imbalance_at(load_LE, 2) == pytest.approx([1.2, 1.0])  # ranks hold 0.6 / 0.4 of the rows
    assert comm.imbalance_at(load_LE, 8) == pytest.approx([2.4, 1.0])
    cfg = load_config(None, TINY + ["parallel.ep_size=2"], world_size=2)
    rows = comm.simulate(cfg, load_LE, [2, 8, 16], link_gbps=10.0)
    assert rows[1]["a2a_bytes"] > comm.a2a_bytes_per_step(cfg, 8) and "problem" in rows[2]
    assert main(["plan", "configs/tiny.yaml", "--gpus", "2", "--gpu-memory", "1", "--from-run", str(tmp_path),
                 "--ep-sizes", "2,8"]) == 0
    out = capsys.readouterr().out
    assert "fits in 1 GiB" in out and "2.40" in out
    assert main(["plan", "configs/tiny.yaml", "--gpus", "2", "--gpu-memory", "0.001"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["plan", "configs/tiny.yaml", "--gpus", "2", "--gpu-memory", "1", "--from-run", str(tmp_path / "x")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
