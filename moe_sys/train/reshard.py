"""Continue a checkpoint at another expert-parallel size (EP) or world size.

Of a DeepSpeed MoE checkpoint, the model is already free of the topology: one file per expert under its
global id, the replicated weights and buffers (the aux-free bias) in ``mp_rank_00_model_states.pt``.
The optimizer state is not: ZeRO-1/2 files hold each rank's flat fp32 partition of every parameter group
(expert groups partitioned over their expert-data-parallel group), ZeRO-0 files one torch optimizer
state per EP rank, holding only that rank's experts. DeepSpeed's universal checkpoint repartitions dense
parameters, but its converter skips native MoE experts (deepspeedai/DeepSpeed#5716; ds_to_universal.py
prints "assuming native DeepSpeed MoE and skipping"), and its loader unpickles files
(``weights_only=False``), which no moe_sys resume does. So the mapping is ours:

    extract:  every rank's optimizer file -> each parameter's whole fp32 master, exp_avg, exp_avg_sq
              (an expert bank as [E, ...] in global expert order) -> ``optimizer_state.safetensors``
              in a new tag ``step_N-epQ``, beside links to the (unchanged) model and RNG files
    apply:    DeepSpeed loads the model at the new EP (its per-expert files), then every rank puts its
              rows of each parameter where its optimizer keeps them: ZeRO-1/2 and bf16 through
              DeepSpeed's fragment map (``_hp_mapping`` + ``map_to_flat_opt_states``, the pieces its
              universal loader uses, so any data-parallel size works); ZeRO-0 into torch's Adam state.

A resharded tag holds no per-rank optimizer file, so it loads at any EP and world size.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
from collections import defaultdict
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from moe_sys import safe_load
from moe_sys.errors import UserError

OPTIMIZER_FILE = "optimizer_state.safetensors"  # marks a resharded tag
MODEL_FILE = "mp_rank_00_model_states.pt"
STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")
_COPIED = re.compile(r"mp_rank_\d+_model_states\.pt|layer_\d+_expert_\d+_mp_rank_\d+_model_states\.pt|rng_rank\d+\..+")


def layout(engine, ep_size: int) -> Dict:
    """What a resume at another topology must know of this one (saved in the client state): EP size,
    world size, global batch, and each optimizer group's parameter names (ZeRO-0 files hold indices)."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    groups = [[names.get(id(p)) for p in g["params"]] for g in engine.optimizer.param_groups]
    return {"ep_size": ep_size, "world_size": dist.get_world_size(), "global_batch": engine.train_batch_size(),
            "param_groups": groups if all(None not in g for g in groups) else None}


def saved_layout(tag_dir: str) -> Optional[Dict]:
    """The layout a checkpoint was saved with; None for one written before resharding existed."""
    return _model_states(tag_dir).get("layout")


def is_resharded(tag_dir: str) -> bool:
    return os.path.exists(os.path.join(tag_dir, OPTIMIZER_FILE))


def resharded_tag(tag: str, ep_size: int) -> str:
    return f"{tag.split('-')[0]}-ep{ep_size}"


def _model_states(tag_dir: str) -> Dict:
    return safe_load.load_torch(os.path.join(tag_dir, MODEL_FILE))


def check_ep_size(tag_dir: str, ep_size: int) -> None:
    """One line if ``ep_size`` cannot split every expert-parallel layer of the checkpoint."""
    experts = _model_states(tag_dir).get("num_experts") or []
    bad = sorted({e for e in experts if e % ep_size})
    if ep_size < 1 or bad:
        raise UserError(f"--ep-size {ep_size}: does not divide the {bad or experts} experts of {tag_dir}")


def write(root: str, tag: str, ep_size: int) -> str:
    """Write tag ``step_N-ep{ep_size}`` from ``tag`` in checkpoint dir ``root`` (the original is only
    read): built in a temp dir, published by rename (``checkpoint._publish``); returns the new tag."""
    from safetensors.torch import save_file

    from moe_sys.train import checkpoint, manifest

    src = os.path.join(root, tag)
    if saved_layout(src) is None:
        raise UserError(f"{src}: saved before moe-sys recorded checkpoint layouts; resume it once at its own "
                        "ep_size and save again to reshard it")
    check_ep_size(src, ep_size)
    tensors, step = optimizer_state(src)
    new_tag = resharded_tag(tag, ep_size)
    tmp = os.path.join(root, checkpoint.TMP_PREFIX + new_tag)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in os.listdir(src):
        if _COPIED.fullmatch(name):
            _link_or_copy(os.path.join(src, name), os.path.join(tmp, name))
    save_file(tensors, os.path.join(tmp, OPTIMIZER_FILE), metadata={"step": json.dumps(step), "from": tag})
    manifest.write(tmp)
    checkpoint._publish(root, checkpoint.TMP_PREFIX + new_tag, new_tag)
    return new_tag


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the filesystem has them: checkpoint files are never changed in place."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def optimizer_state(tag_dir: str):
    """``{"{param}/{fp32|exp_avg|exp_avg_sq}": whole tensor}`` and the optimizer step of a checkpoint."""
    if is_resharded(tag_dir):
        from safetensors import safe_open

        with safe_open(os.path.join(tag_dir, OPTIMIZER_FILE), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["step"])
    states = _model_states(tag_dir)
    saved = states["layout"]
    partitioned = sorted(glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*_mp_rank_00_optim_states.pt")), key=_rank)
    if partitioned:
        shapes = {n: s for group in states["param_shapes"] for n, s in group.items()}
        per_param, step = _from_partitions([_load(p)["optimizer_state_dict"] for p in partitioned], shapes,
                                           saved["ep_size"])
    else:
        per_ep = sorted(glob.glob(os.path.join(tag_dir, "expp_rank_*_mp_rank_00_optim_states.pt")), key=_rank)
        if not per_ep or saved.get("param_groups") is None:
            raise UserError(f"{tag_dir}: no optimizer files this version can reshard")
        per_param, step = _from_torch_states([_load(p)["optimizer"] for p in per_ep], saved["param_groups"])
    tensors = {f"{name}/{key}": torch.cat(parts).contiguous() for name, keys in per_param.items()
               for key, parts in keys.items()}
    return tensors, step


def _rank(path: str) -> int:
    return int(re.search(r"rank_(\d+)_mp", os.path.basename(path)).group(1))


def _load(path: str) -> Dict:
    return safe_load.load_torch(path)


def _from_partitions(sds: List[Dict], shapes: Dict, ep_size: int):
    """ZeRO-1/2 (and bf16) files, one per data-parallel rank. A group's flat fp32 partition and Adam
    moments are cut in rank order (expert groups: over ranks e, e+P, e+2P, ... holding EP rank e's
    experts, DeepSpeed's layout); ``param_slice_mappings`` say where each parameter's piece lies."""
    world = len(sds)
    per_param: Dict[str, Dict[str, list]] = defaultdict(lambda: defaultdict(list))
    base = sds[0]["base_optimizer_state"]
    for g, group in enumerate(base["param_groups"]):
        owners = range(ep_size) if group.get("moe") else [0]
        for owner in owners:  # EP rank whose experts these are, in global expert order
            pieces: Dict[str, Dict[str, list]] = defaultdict(lambda: defaultdict(list))
            for r in (range(owner, world, ep_size) if group.get("moe") else range(world)):
                flat = {"fp32": sds[r]["single_partition_of_fp32_groups"][g], **sds[r]["base_optimizer_state"]["state"][g]}
                for name, frag in sds[r]["param_slice_mappings"][g].items():
                    for key in STATE_KEYS:
                        pieces[name][key].append(flat[key].narrow(0, frag.start, frag.numel))
            for name, keys in pieces.items():
                for key, parts in keys.items():
                    per_param[name][key].append(torch.cat(parts).view(shapes[name]))
    return per_param, _step(base["state"][0]["step"])


def _from_torch_states(sds: List[Dict], group_names: List[List[str]]):
    """ZeRO-0 fp32 files, one per EP rank: torch Adam states by parameter index. Dense states are the
    same on every rank (take EP rank 0's); expert states are stacked in EP-rank order. The fp32
    masters are the model weights themselves."""
    per_param: Dict[str, Dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for e, sd in enumerate(sds):
        for group, names in zip(sd["param_groups"], group_names):
            if e and not group.get("moe"):
                continue
            for index, name in zip(group["params"], names):
                for key in ("exp_avg", "exp_avg_sq"):
                    per_param[name][key].append(sd["state"][index][key])
    first = next(iter(sds[0]["state"].values()))
    return per_param, _step(first["step"])


def _step(value) -> int:
    return int(value.item() if torch.is_tensor(value) else value)


def apply(engine, tag_dir: str) -> None:
    """Put this rank's rows of every parameter's optimizer state (and fp32 master) into ``engine``,
    whose model DeepSpeed has just loaded."""
    from safetensors import safe_open

    from moe_sys.parallel.groups import expert_parallel_rank

    optimizer = engine.optimizer
    partitioned = any(hasattr(p, "_hp_mapping") for p in engine.module.parameters())
    with safe_open(os.path.join(tag_dir, OPTIMIZER_FILE), "pt") as f:
        step, keys = json.loads(f.metadata()["step"]), set(f.keys())
        for name, param in engine.module.named_parameters():
            if f"{name}/exp_avg" not in keys:
                continue  # frozen: no optimizer state
            rows = slice(None)
            if getattr(param, "allreduce", True) is False:  # an expert bank: this EP rank's experts
                first = expert_parallel_rank(param.group_name) * param.shape[0]
                rows = slice(first, first + param.shape[0])
            values = {key: f.get_slice(f"{name}/{key}")[rows] for key in STATE_KEYS if f"{name}/{key}" in keys}
            (_put_fragment if partitioned else _put_torch_state)(optimizer, param, values, step)
    if partitioned:
        _link_flat_states(optimizer, step)


def _put_fragment(optimizer, param, values: Dict[str, torch.Tensor], step: int) -> None:
    """This rank's piece of ``param`` (``_hp_mapping`` is None where its partition holds none of it)."""
    mapping = param._hp_mapping
    if mapping is None:
        return
    where = mapping.lp_fragment_address
    mapping.optim_fragment = {}
    for key, value in values.items():
        piece = value.flatten().narrow(0, where.start, where.numel).to(mapping.get_hp_fragment().device)
        if key == "fp32":
            mapping.get_hp_fragment().data.copy_(piece)
        else:
            mapping.optim_fragment[key] = piece.clone()


def _link_flat_states(optimizer, step: int) -> None:
    """Assemble each group's flat moment buffers from the pieces, as DeepSpeed's universal loader does,
    then refresh the model weights from the fp32 masters."""
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    lp_groups = getattr(optimizer, "bit16_groups", None) or optimizer.bf16_groups
    for group, lp_params in zip(optimizer.optimizer.param_groups, lp_groups):
        flat = group["params"][0]
        map_to_flat_opt_states(flat, lp_params, optimizer.optimizer.state, ["exp_avg", "exp_avg_sq"])
        optimizer.optimizer.state[flat]["step"] = torch.tensor(float(step))
    optimizer.update_lp_params()


def _put_torch_state(optimizer, param, values: Dict[str, torch.Tensor], step: int) -> None:
    """ZeRO-0 fp32: the optimizer is torch's Adam over the model's own parameters."""
    with torch.no_grad():
        if "fp32" in values:
            param.copy_(values["fp32"].view_as(param))
    optimizer.state[param] = {"step": torch.tensor(float(step)),
                              **{k: values[k].reshape(param.shape).to(param).clone() for k in ("exp_avg", "exp_avg_sq")}}
