"""Optimizer groups: a prefix's learning-rate multiplier holds through DeepSpeed's warm-up/cosine schedule."""
import torch
import torch.nn as nn
from deepspeed.runtime.lr_schedules import WarmupCosineLR

from moe_sys.config.schema import TrainConfig
from moe_sys.train.optim import build_optimizer


def test_prefix_group_gets_scaled_lr_through_the_schedule():
    model = nn.ModuleDict({"encoder": nn.Linear(3, 4), "criterion": nn.Linear(4, 5, bias=False)})
    cfg = TrainConfig(lr=1e-3, weight_decay=0.1)
    opt = build_optimizer(model, cfg, {"criterion.": 100.0})
    by_name = {g["name"]: g for g in opt.param_groups}
    scaled = by_name["lr_x_criterion."]
    assert [p is model["criterion"].weight for p in scaled["params"]] == [True]
    assert scaled["lr"] == 1e-3 * 100 and scaled["weight_decay"] == 0.0
    assert {id(p) for p in by_name["decay"]["params"]} == {id(model["encoder"].weight)}
    sched = WarmupCosineLR(opt, total_num_steps=10, warmup_num_steps=2, cos_min_ratio=0.1)
    seen = []
    for _ in range(5):
        opt.step()
        sched.step()
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        seen.append(lrs["decay"])
        assert abs(lrs["lr_x_criterion."] - 100 * lrs["decay"]) <= 1e-12 * lrs["lr_x_criterion."]
    assert max(seen) > 0
