"""bf16 training through DeepSpeed (fp32 master weights, fp32 router and combine) follows fp32's loss
curve over 50 steps on two CPU ranks (EP=2); fp16 is refused with one line where DeepSpeed cannot run it."""
import pytest

from tests.distributed.spawn import run_ranks
from tests.e2e.conftest import TINY, run_cli

SETS = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=32",
        "data.seq_len=32", "moe.num_experts=4", "train.micro_batch_size=4", "train.steps=50", "train.warmup_steps=5",
        "train.eval_every=1000", "train.eval_batches=1", "checkpoint.save_final=false",
        "logging.progress_bar=false", "logging.tensorboard=false"]


def _curves(rank, world, tmp):
    from moe_sys.config import load_config
    from moe_sys.train.trainer import train

    curves = {}
    for dtype in ("fp32", "bf16"):
        cfg = load_config(TINY, SETS + [f"train.dtype={dtype}", f"logging.run_dir={tmp}/{dtype}",
                                        f"data.cache_dir={tmp}/cache"], world_size=world)
        curves[dtype] = [r["lm_loss"] for r in train(cfg)]
    return curves


def test_bf16_loss_follows_fp32_over_50_steps(tmp_path):
    curves = run_ranks(_curves, 2, str(tmp_path))[0]
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert fp32[0] - sum(fp32[-10:]) / 10 > 1.0, "the run must learn, else closeness proves nothing"
    assert fp32 != bf16  # really ran in another precision
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.1, list(zip(fp32, bf16))
    assert abs(sum(fp32[-10:]) - sum(bf16[-10:])) / 10 < 0.05


def test_fp16_refused_with_one_line_where_unsupported(tmp_path):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip("DeepSpeed supports fp16 on this machine: nothing to refuse")
    proc = run_cli("train", TINY, "--set", "train.dtype=fp16", "--set", f"logging.run_dir={tmp_path}")
    assert proc.returncode == 2
    assert "config error: train.dtype: fp16 is not supported by DeepSpeed" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "config.yaml").exists()
