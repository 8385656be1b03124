"""The model FLOPs per token behind the GPU run's MFU (bench/gpu/train_mfu.py), against a count by hand."""
from __future__ import annotations

from bench.gpu.train_mfu import COMMON, GPU_RUN, flops_per_token
from moe_sys.config import load_config


def test_flops_per_token_of_the_gpu_model():
    cfg = load_config(GPU_RUN[0], [*GPU_RUN[1:], *COMMON], world_size=1)
    D, F, E, K, L, V, S = 1024, 3584, 8, 2, 12, 256, 2048
    assert (cfg.model.d_model, cfg.model.d_ff, cfg.moe.num_experts, cfg.moe.top_k, cfg.model.n_layers) == (D, F, E, K, L)
    # Per layer: q, k, v, o; the router; E SwiGLU experts of 3 matrices; two RMSNorms. Then the final
    # norm, the untied LM head and the input embedding (a lookup: no FLOPs).
    layer_total, layer_active = 4 * D * D + D * E + E * 3 * D * F + 2 * D, 4 * D * D + D * E + K * 3 * D * F + 2 * D
    got = flops_per_token(cfg)
    assert got["params_total"] == L * layer_total + D + 2 * V * D
    assert got["params_active"] == L * layer_active + D + V * D
    assert got["flops_per_token"] == 6 * got["params_active"] + 12 * L * D * S
    assert 1.0e9 < got["params_total"] < 1.2e9  # "about 1B parameters"
