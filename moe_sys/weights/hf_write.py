"""``moe-sys convert``: a Hugging Face dir -> a moe_sys model dir (config.yaml + model.safetensors), and a
moe_sys run -> a Hugging Face dir that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

Both write into a temporary sibling of the output and rename it at the end: the output directory
exists only when the whole conversion succeeded.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator, Optional

from moe_sys.config import dump_config, load_config
from moe_sys.config.schema import Config
from moe_sys.weights.hf_family import FAMILIES, Family, HFConversionError
from moe_sys.weights.hf_read import SINGLE_FILE, read_hf_model
from moe_sys.weights.hf_state import Mapper
from moe_sys.weights.io import read_model_weights, save_model_weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "generation_config.json")


@contextmanager
def staged(out: str) -> Iterator[str]:
    """A temporary directory renamed to ``out`` when the block succeeds, removed when it fails."""
    if os.path.exists(out) and os.listdir(out):
        raise HFConversionError(f"{out}: output directory exists and is not empty")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        yield tmp
        if os.path.exists(out):
            os.rmdir(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_tokenizer(src: str, dst: str) -> None:
    """The tokenizer files beside a model; a bare tokenizer.json (moe_sys's BPE) gets the small
    tokenizer_config.json transformers' AutoTokenizer needs."""
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    has_config = os.path.isfile(os.path.join(src, "tokenizer_config.json"))
    if os.path.isfile(os.path.join(dst, "tokenizer.json")) and not has_config:
        from moe_sys.data.bpe import EOD_TOKEN

        with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN}, f, indent=2)


def from_hf(hf_dir: str, out: str) -> str:
    """Write OUT/config.yaml (train.init_from = OUT/model.safetensors; edit and train it) and the weights."""
    cfg, state = read_hf_model(hf_dir)
    weights = os.path.join(os.path.abspath(out), SINGLE_FILE)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": weights})})
    with staged(out) as tmp:
        save_model_weights(state, os.path.join(tmp, SINGLE_FILE))
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(dump_config(cfg))
        copy_tokenizer(hf_dir, tmp)
    return (f"wrote {out}/config.yaml and {out}/{SINGLE_FILE} ({len(state)} tensors); "
            f"train with `moe-sys train {out}/config.yaml`")


def pick_family(cfg: Config) -> Family:
    """The HF family that expresses this model exactly; one line naming the key otherwise."""
    m, moe = cfg.model, cfg.moe
    if cfg.adapters.modules or cfg.adapters.load_from:
        raise HFConversionError("adapters: the model has unmerged adapters; merge them into the base first")
    if not moe.enabled:
        return _dense_family(m)
    _check_routing(moe)
    all_moe = all(moe.is_moe_layer(i) for i in range(m.n_layers))
    if moe.shared_experts:
        if not moe.shared_gate or m.qk_norm != "none":
            raise HFConversionError("moe.shared_experts: Qwen2-MoE (the family with shared experts) gates them "
                                    "(moe.shared_gate=true) and has no QK-norm")
        return FAMILIES["qwen2_moe"]
    if m.qkv_bias:
        raise HFConversionError("model.qkv_bias: no Hugging Face MoE family without shared experts has q/k/v biases")
    if m.qk_norm == "head":
        return FAMILIES["qwen3_moe"]
    if not all_moe:
        raise HFConversionError("moe.dense_layers: dense layers need Qwen2-MoE (shared experts) or Qwen3-MoE (QK-norm)")
    if m.qk_norm == "full":
        return FAMILIES["olmoe"]
    if not _renormalizes(moe):
        raise HFConversionError("moe.router.normalize: Mixtral always renormalises the top-k weights")
    return FAMILIES["mixtral"]


def _dense_family(m) -> Family:
    if m.qk_norm == "full" or (m.qkv_bias and m.qk_norm != "none"):
        raise HFConversionError(f"model.qk_norm: {m.qk_norm!r} with qkv_bias={m.qkv_bias} has no dense HF family")
    return FAMILIES["qwen3" if m.qk_norm == "head" else "qwen2" if m.qkv_bias else "llama"]


def _renormalizes(moe) -> bool:
    r = moe.router
    return not r.pre_softmax or (r.normalize if r.normalize is not None else moe.top_k > 1)


def _check_routing(moe) -> None:
    r = moe.router
    refusals = [
        (r.type != "topk", f"moe.router.type: {r.type!r}: HF families route each token by top-k"),
        (r.score != "softmax", f"moe.router.score: {r.score!r}: the supported HF MoE families use softmax"),
        (r.num_groups is not None, "moe.router.num_groups: group-limited routing has no supported HF family"),
        (r.scale != 1.0, "moe.router.scale: scaled gate weights have no supported HF family"),
        (moe.balance.bias.enabled, "moe.balance.bias.enabled: the aux-loss-free bias has no place in HF families"),
        (moe.activation != "swiglu", f"moe.activation: {moe.activation!r}: HF MoE experts are SwiGLU"),
        (r.noisy_gating, "moe.router.noisy_gating: the noise weights have no place in HF families"),
    ]
    for bad, message in refusals:
        if bad:
            raise HFConversionError(message)


def hf_config(cfg: Config, family: Family, dtype: str) -> dict:
    fields = family.to_hf(cfg)
    if cfg.moe.enabled:
        fields["norm_topk_prob"] = _renormalizes(cfg.moe)
    return {"architectures": [family.architecture], "model_type": family.model_type, "dtype": dtype, **fields}


def to_hf(run_dir: str, out: str, weights: Optional[str] = None) -> str:
    """Export a run (or a `convert from-hf` dir) to a Hugging Face directory with the tokenizer beside it."""
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    family = pick_family(cfg)
    source = weights or (os.path.join(run_dir, SINGLE_FILE) if os.path.isfile(os.path.join(run_dir, SINGLE_FILE))
                         else run_dir)
    state = read_model_weights(source)
    mapper = Mapper(cfg, family)
    known = {key for key, _, _ in mapper.rules()} | ({"head.weight"} if cfg.model.tie_embeddings else set())
    extra = sorted(set(state) - known)
    if extra:
        raise HFConversionError(f"{source}: {extra[0]} has no place in a {family.model_type} checkpoint")
    hf_state = mapper.to_hf(state)
    dtype = str(next(iter(hf_state.values())).dtype).replace("torch.", "")
    with staged(out) as tmp:
        save_model_weights(hf_state, os.path.join(tmp, SINGLE_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(cfg, family, dtype), f, indent=2)
        copy_tokenizer(run_dir, tmp)
    return f"wrote {out} as {family.architecture} ({len(hf_state)} tensors)"


def convert_lora(direction: str, source: str, base: Optional[str], out: str) -> str:
    """``convert lora-to-peft`` / ``lora-from-peft``: a LoRA between moe_sys's adapter dir and PEFT's."""
    from moe_sys.weights import peft_lora

    if base is None:
        raise HFConversionError(f"convert {direction}: --base (the base model's dir with config.yaml) is required")
    cfg = load_config(os.path.join(base, "config.yaml"))
    cfg = cfg.model_copy(update={"adapters": type(cfg.adapters)()})  # the family of the base model alone
    family = pick_family(cfg)
    with staged(out) as tmp:
        if direction == "lora-to-peft":
            peft_lora.export_lora(source, cfg, family, tmp)
        else:
            peft_lora.import_lora(source, cfg, family, tmp)
    return f"wrote {out} ({direction}, {family.architecture} module names)"
