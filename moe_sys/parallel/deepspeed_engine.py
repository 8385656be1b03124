"""The only importer of ``deepspeed.initialize``: DeepSpeed config, MoE registration, engine.

DeepSpeed enables its MoE paths (expert-data-parallel gradient reduction, MoE-aware ZeRO, one
checkpoint file per expert) only for modules that are instances of its own ``MoE`` class. Our MoE
layers are made to pass that check, and present their stacked [El, ...] expert weights to
``state_dict`` as per-expert entries under DeepSpeed's key prefix, so DeepSpeed writes and reads
``layer_{L}_expert_{E}_mp_rank_00_model_states.pt`` for them, and a checkpoint can be reloaded at
another expert-parallel size.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from moe_sys.config import deep_merge
from moe_sys.parallel.experts import is_expert_parallel
from moe_sys.parallel.groups import ExpertGroups

DS_EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
log = logging.getLogger("moe_sys")


def build_ds_config(cfg, world_size: int) -> Dict[str, Any]:
    """DeepSpeed config from our sections, with ``cfg.deepspeed`` merged over it."""
    t = cfg.train
    warmup = min(t.warmup_steps, t.steps)
    if warmup < t.warmup_steps:
        log.info("train.warmup_steps=%d exceeds train.steps=%d: warming up over all %d steps", t.warmup_steps,
                 t.steps, warmup)
    ds: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": t.steps, "warmup_num_steps": warmup, "warmup_type": "linear",
                       "warmup_min_ratio": 0.0, "cos_min_ratio": t.min_lr_ratio},
        },
        "bf16": {"enabled": t.dtype == "bf16"},
        "fp16": {"enabled": t.dtype == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return deep_merge(ds, cfg.deepspeed)


def dtype_problem(cfg) -> Optional[str]:
    """One line if DeepSpeed cannot train in ``train.dtype`` on this machine's accelerator, else None.

    bf16 keeps fp32 master weights in DeepSpeed's optimizer; fp16 adds dynamic loss scaling (DeepSpeed's
    ``fp16.loss_scale: 0`` default), which DeepSpeed offers only where its accelerator supports fp16
    (on CPU: only with oneDNN fp16 support, which most CPUs lack).
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if cfg.train.dtype == "fp16" and not accelerator.is_fp16_supported():
        return (f"train.dtype: fp16 is not supported by DeepSpeed on this machine's {accelerator.device_name()} "
                "accelerator; use bf16 (fp32 master weights) or fp32")
    return None


def register_moe_layers(model: nn.Module, groups: ExpertGroups) -> None:
    """Make each expert-parallel layer (MoE block, adapter mixture) an instance of DeepSpeed's MoE and give
    it DeepSpeed's checkpoint view."""
    from deepspeed.moe.layer import MoE

    for layer in model.modules():
        if is_expert_parallel(layer) and not isinstance(layer, MoE):
            # The engine asks each MoE to create its groups; ours were created and passed in already.
            skip_group_setup = {"set_deepspeed_parallelism": lambda self, *args, **kwargs: None}
            layer.__class__ = type(f"DeepSpeed{type(layer).__name__}", (type(layer), MoE), skip_group_setup)
            layer.expert_group_name = groups.name
            layer.num_local_experts = layer.num_experts // groups.ep_size
            layer._register_state_dict_hook(_experts_to_per_expert_keys)
            layer.register_load_state_dict_pre_hook(_per_expert_keys_to_experts)


def _experts_to_per_expert_keys(module, state_dict, prefix, local_metadata):
    """experts.w_EDF [El, D, F] -> deepspeed_moe.experts.deepspeed_experts.{e}.w_EDF [D, F]."""
    for name in [k for k in state_dict if k.startswith(prefix + "experts.")]:
        stacked = state_dict.pop(name)
        param = name[len(prefix + "experts."):]
        for e, weight in enumerate(stacked.unbind(0)):
            state_dict[f"{prefix}{DS_EXPERT_PREFIX}{e}.{param}"] = weight
    return state_dict


def stack_expert_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A whole model's state as DeepSpeed files hold it (per-expert keys) -> stacked [E, ...] bank keys,
    the single-device model's own layout (for reading checkpoints without an engine)."""
    marker = "." + DS_EXPERT_PREFIX
    prefixes = {key[:key.index(marker) + 1] for key in state_dict if marker in key}
    for prefix in prefixes:
        _per_expert_keys_to_experts(None, state_dict, prefix)
    return state_dict


def _per_expert_keys_to_experts(module, state_dict, prefix, *args):
    pattern = re.compile(re.escape(prefix + DS_EXPERT_PREFIX) + r"(\d+)\.(.+)")
    found: Dict[str, Dict[int, torch.Tensor]] = {}
    for key in list(state_dict):
        match = pattern.fullmatch(key)
        if match:
            found.setdefault(match.group(2), {})[int(match.group(1))] = state_dict.pop(key)
    for param, per_expert in found.items():
        state_dict[f"{prefix}experts.{param}"] = torch.stack([per_expert[e] for e in sorted(per_expert)])


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, cfg, world_size: int):
    """deepspeed.initialize with our config; returns (engine, lr_scheduler)."""
    import deepspeed

    from moe_sys.safe_load import make_engine_loads_safe

    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=build_ds_config(cfg, world_size))
    make_engine_loads_safe(engine)
    return engine, scheduler


# Param-group entries that are state, not settings: the schedule recomputes the learning rate.
_NOT_SETTINGS = ("params", "lr", "initial_lr")


def optimizer_settings(engine) -> list:
    """Each param group's settings as this run's config built them (betas, eps, weight decay...)."""
    return [{k: v for k, v in group.items() if k not in _NOT_SETTINGS} for group in engine.optimizer.param_groups]


def reapply_settings(engine, settings: list, grad_clip: float) -> None:
    """``load_checkpoint`` restores the saved param groups' settings and ZeRO's ``clip_grad``; a resumed
    run uses the values of its own config instead. The learning rate is recomputed by the schedule,
    which is built from this config (only its position is restored), so ``train.lr``, warm-up and
    the cosine floor apply too; with an unchanged config every value is the one saved (bit-exact)."""
    groups = engine.optimizer.param_groups
    for group, saved, lr in zip(groups, settings, engine.lr_scheduler.get_lr()):
        group.update(saved)
        group["lr"] = lr
    if hasattr(engine.optimizer, "clip_grad"):  # ZeRO 1/2 keep their own copy of gradient_clipping
        engine.optimizer.clip_grad = grad_clip
