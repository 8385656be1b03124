"""configs/mixtral_like.yaml and deepseek_like.yaml, shrunk by the README's --set lines, build, shard over
two real gloo ranks (EP=2) and train a few bf16 steps on CPU: their routing, shared experts, dense first
layer and DeepSpeed settings at least run."""
import math
import os

from tests.distributed.spawn import run_ranks
from tests.e2e.conftest import REPO

# The same lines as README.md ("Running the large configs on a laptop").
SHRINK = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.d_ff=128", "model.max_seq_len=64",
          "data.seq_len=64", "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.steps=3",
          "train.warmup_steps=1", "train.eval_batches=1", "parallel.procs=2", "parallel.ep_size=2"]
DEEPSEEK = ["moe.num_experts=16", "moe.d_expert=32", "moe.router.num_groups=4", "moe.router.group_topk=2"]
CONFIGS = {"mixtral_like": SHRINK, "deepseek_like": SHRINK + DEEPSEEK}


def _train_both(rank, world, tmp):
    from moe_sys.config import load_config
    from moe_sys.train.trainer import train

    out = {}
    for name, sets in CONFIGS.items():
        quiet = [f"logging.run_dir={tmp}/{name}", "logging.progress_bar=false", "logging.tensorboard=false",
                 f"data.cache_dir={tmp}/cache", "checkpoint.save_final=false"]
        cfg = load_config(os.path.join(REPO, "configs", f"{name}.yaml"), sets + quiet, world_size=world)
        history = train(cfg)
        out[name] = (cfg.train.dtype, [r["loss"] for r in history], [len(layer) for layer in history[-1]["expert_load"]])
    return out


def test_mixtral_and_deepseek_like_shrunk_train_on_cpu(tmp_path):
    results = run_ranks(_train_both, 2, str(tmp_path))[0]
    dtype, losses, experts = results["mixtral_like"]
    assert dtype == "bf16" and len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert experts == [8, 8]  # both layers MoE, every expert's load reported across the two EP ranks
    dtype, losses, experts = results["deepseek_like"]
    assert dtype == "bf16" and len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert experts == [16]  # layer 0 stays dense (first_moe_layer=1)
