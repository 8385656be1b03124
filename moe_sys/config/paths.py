"""What a config names on disk, checked before anything starts: one 'key: problem' line each.

Only existence and kind (file or directory, the files a directory must hold) are checked here,
without reading the files: the readers (moe_sys.adapters.io, moe_sys.data) say what is wrong
inside one. Torch-free, like the rest of the config package.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

from pydantic import TypeAdapter, ValidationError

from moe_sys.config.adapters import AnySpec

# Model weights as moe_sys.weights.io.read_model_weights finds them: a DeepSpeed run dir, its
# checkpoints/ dir (both through `latest`), one tag dir, or a Hugging Face model dir (config.json).
_CHECKPOINT_MARKERS = (("checkpoints", "latest"), ("latest",), ("mp_rank_00_model_states.pt",), ("config.json",))
ADAPTER_FILES = ("manifest.json", "adapters.safetensors")


def problems(cfg) -> List[str]:
    out = []
    for i, d in enumerate(cfg.data.domains if cfg.task.type == "lm" else ()):  # image folders: schema.metric_problems
        if d.path is not None and not all(os.path.isfile(d.path + ext) for ext in (".bin", ".idx")):
            out.append(f"data.domains.{i}.path: no indexed dataset at {d.path!r} (.bin/.idx); "
                       "build one with `moe-sys prepare-data`")
    checks = [("train.init_from", cfg.train.init_from, _weights_problem),
              ("adapters.load_from", cfg.adapters.load_from, _adapter_dir_problem),
              ("logging.run_dir", cfg.logging.run_dir, _not_a_file),
              ("data.cache_dir", cfg.data.cache_dir, _not_a_file),
              ("model.vit.pretrained", cfg.model.vit.pretrained if cfg.model.arch == "vit" else None,
               _vit_weights_problem)]
    for key, path, check in checks:
        problem = check(path) if path is not None else None
        if problem:
            out.append(f"{key}: {path!r} {problem}")
    return out


def _vit_weights_problem(path: str) -> Optional[str]:
    """A Hugging Face ViT directory, or a timm state dict file (moe_sys.weights.vit)."""
    if os.path.isdir(path) or (os.path.isfile(path) and path.endswith((".safetensors", ".pth", ".pt", ".bin"))):
        return None
    return "does not exist" if not os.path.exists(path) else "is not a .safetensors/.pth/.pt/.bin file or a directory"


def _weights_problem(path: str) -> Optional[str]:
    if os.path.isfile(path):
        return None if path.endswith(".safetensors") else "is not a .safetensors file"
    if not os.path.isdir(path):
        return "does not exist" + _producer_hint(path)
    if any(os.path.exists(os.path.join(path, *marker)) for marker in _CHECKPOINT_MARKERS):
        return None
    return ("holds no DeepSpeed checkpoint (a run dir, its checkpoints/ dir or a tag dir) nor a Hugging Face "
            "model (config.json), nor is a .safetensors file")


def _producer_hint(path: str) -> str:
    """'; create it first with `moe-sys train configs/X.yaml`' when a shipped config writes that run dir
    (configs/uml_puma.yaml starts from the run of configs/vit_pretrain.yaml)."""
    import glob

    import yaml

    for candidate in sorted(glob.glob("configs/*.yaml")):
        with open(candidate, encoding="utf-8") as f:
            run_dir = ((yaml.safe_load(f) or {}).get("logging") or {}).get("run_dir")
        if run_dir and os.path.normpath(run_dir) == os.path.normpath(path):
            return f"; create it first with `moe-sys train {candidate}`"
    return ""


def _adapter_dir_problem(path: str) -> Optional[str]:
    if not os.path.isdir(path):
        return "is not a directory" if os.path.exists(path) else "does not exist"
    missing = [name for name in ADAPTER_FILES if not os.path.isfile(os.path.join(path, name))]
    if missing:
        return f"is not an adapter directory (no {' or '.join(missing)})"
    return _manifest_problem(os.path.join(path, ADAPTER_FILES[0]))


def _manifest_problem(path: str) -> Optional[str]:
    """The manifest's adapter specs must validate like adapters.modules (moe_sys.adapters.io reads them)."""
    from moe_sys.config.loader import describe_errors  # loader -> schema -> this module

    try:
        with open(path, encoding="utf-8") as f:
            specs = json.load(f)["specs"]
        TypeAdapter(List[AnySpec]).validate_python(specs)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        return f"holds a damaged {os.path.basename(path)} ({type(e).__name__})"
    except ValidationError as e:
        return f"holds a manifest whose specs do not validate: specs.{describe_errors(e, List[AnySpec])[0]}"
    return None


def _not_a_file(path: str) -> Optional[str]:
    return "is a file; a directory is expected" if os.path.isfile(path) else None


def resume_problem(run_dir: str) -> Optional[str]:
    """Why ``--resume`` into ``run_dir`` cannot work, or None (which checkpoint loads is the trainer's call)."""
    root = os.path.join(run_dir, "checkpoints")
    if os.path.exists(os.path.join(root, "latest")):
        return None
    tags = [d for d in os.listdir(root) if d.startswith("step_")] if os.path.isdir(root) else []
    return None if tags else f"--resume: no checkpoint in {root} (nothing to resume; drop --resume to start afresh)"
