"""Typed config tree: one section per component, a description per field.

Unknown keys are errors (``extra='forbid'``); cross-field rules live in ``Config.check``, so the
loader can report every problem as one line naming the key.
"""
from __future__ import annotations

import os
from typing import Annotated, Any, Dict, List, Literal, Optional

from pydantic import Field

from moe_sys.config import paths
from moe_sys.config.adapters import AdaptersConfig
from moe_sys.config.data_vocab import vocab_problems
from moe_sys.config.multitask import multitask_problems
from moe_sys.config.routing_rules import routing_problems
from moe_sys.config.section import Seed, Section
from moe_sys.config.task import TaskConfig


class ViTConfig(Section):
    """The image encoder of ``model.arch: vit`` (timm's and Hugging Face's ViT layout); d_model, n_layers,
    n_heads, d_ff, norm_eps, init_std and the attention keys (qkv_bias: true for timm/HF ViTs; n_kv_heads,
    head_dim, qk_norm) come from the model section, FFN slots from ``moe``; the output projection and
    the MLPs always have biases."""

    image_size: int = Field(32, gt=0, description="side of the square input images, in pixels")
    patch_size: int = Field(4, gt=0, description="side of the square patches; must divide image_size")
    in_channels: int = Field(1, gt=0, description="1 = grey (the glyph data), 3 = RGB")
    pool: Literal["cls", "mean"] = Field("cls", description="features: the class token, or the mean of the patch "
                                         "tokens, under the final LayerNorm (timm's global_pool token / avg)")
    pretrained: Optional[str] = Field(None, description="timm ViT state dict (.safetensors or .pth) or Hugging Face "
                                      "ViTModel directory (config.json + model.safetensors) loaded when the model is "
                                      "built; timm ViTs use norm_eps 1e-6, HF ones 1e-12")


class ModelConfig(Section):
    arch: Literal["lm", "vit"] = Field("lm", description="lm: the decoder-only language model; vit: the image "
                                       "encoder (model.vit)")
    vocab_size: int = Field(256, gt=0, lt=2**31, description="256 = byte-level vocabulary of the embedded corpus")
    d_model: int = Field(128, gt=0, description="hidden size D")
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    n_kv_heads: Optional[int] = Field(None, gt=0, description="key/value heads (grouped-query attention); "
                                      "None = n_heads")
    head_dim: Optional[int] = Field(None, gt=0, description="features per head; None = d_model / n_heads")
    qkv_bias: bool = Field(False, description="bias on the q/k/v projection (Qwen2)")
    qk_norm: Literal["none", "head", "full"] = Field(
        "none", description="RMSNorm on queries and keys before rotary: per head (Qwen3) or over all heads (OLMoE)")
    d_ff: int = Field(256, gt=0, description="FFN hidden size F of dense blocks (and of experts unless moe.d_expert)")
    max_seq_len: int = Field(256, gt=0, description="longest sequence rotary tables are built for")
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0, lt=1)
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0, lt=1)
    vit: ViTConfig = Field(default_factory=ViTConfig)


class RouterConfig(Section):
    """How tokens pick experts. Semantics and the differences from DeepSpeed/Megatron: docs/routing.md."""

    type: Literal["topk", "expert_choice", "example", "task"] = Field(
        "topk", description="topk: each token picks K experts; expert_choice: each expert picks its top tokens; "
        "example: one choice per sequence from its mean hidden state; task: by the sample's domain id")
    score: Literal["softmax", "sigmoid"] = Field("softmax", description="expert affinity, computed in fp32")
    pre_softmax: bool = Field(True, description="softmax over all E then top-k (DeepSpeed); false: top-k on logits, "
                              "softmax over the K (Megatron's default)")
    normalize: Optional[bool] = Field(None, description="renormalise the kept weights to sum 1; None = when top_k > 1")
    scale: float = Field(1.0, gt=0, description="multiplies the gate weights (DeepSeek-V3 routed_scaling_factor)")
    drop_policy: Literal["position", "probs", "random", "priority"] = Field(
        "position", description="which slots an over-capacity expert drops: later positions (first choices first), "
        "lowest affinity, a random priority, or priority: first choices first, each by the token's highest gate "
        "(V-MoE's batch prioritized routing)")
    num_groups: Optional[int] = Field(None, gt=0, description="group-limited routing: experts split into this many "
                                      "groups (e.g. one per EP rank or node)")
    group_topk: Optional[int] = Field(None, gt=0, description="groups each token may use (top groups by the sum of "
                                      "their best top_k/group_topk scores)")
    jitter_eps: float = Field(0.0, ge=0, lt=1, description="training: router input times U[1-eps, 1+eps]")
    noisy_gating: bool = Field(False, description="training: Shazeer noisy top-k, logits + N(0,1)*softplus(x W_noise)")
    sample_second: bool = Field(False, description="training: slots 2..K sampled by Gumbel-max (DeepSpeed top-2)")
    allow_noncausal: bool = Field(False, description="accept routers whose choice for a token reads later tokens "
                                  "(expert_choice, example) in this causal LM")
    task_table: Optional[List[List[int]]] = Field(None, description="task router: the top_k experts of each domain, "
                                                  "in data.domains order; None = learned task embedding")


class BalanceLossConfig(Section):
    type: Literal["switch", "seq", "global", "z", "mi"] = Field(
        description="switch: micro-batch aux loss; seq: per sequence; global: expert counts over the data-parallel "
        "group and the step's micro-batches; z: router z-loss; mi: -(H(expert) - H(expert|domain))")
    coef: float = Field(ge=0)


class BiasConfig(Section):
    enabled: bool = Field(False, description="aux-loss-free balancing: per-expert bias on the selection scores")
    update_rate: float = Field(1e-3, gt=0, description="u in b += u * sign(mean load - load), once per optimizer step")


class BalanceConfig(Section):
    losses: List[BalanceLossConfig] = Field(
        default_factory=lambda: [BalanceLossConfig(type="switch", coef=1e-2), BalanceLossConfig(type="z", coef=1e-3)],
        description="weighted losses added to the LM loss")
    bias: BiasConfig = Field(default_factory=BiasConfig)


class MoEConfig(Section):
    enabled: bool = Field(True, description="false = a dense model: every FFN is dense, the other moe keys are unused")
    num_experts: int = Field(8, gt=0, description="routed experts per MoE layer (E)")
    top_k: int = Field(2, gt=0, description="experts per token (K)")
    every: int = Field(1, gt=0, description="an MoE block replaces the FFN in every `every`-th layer")
    first_moe_layer: int = Field(0, ge=0, description="index of the first layer whose FFN is MoE")
    d_expert: Optional[int] = Field(None, gt=0, description="expert FFN size; None = model.d_ff")
    activation: Literal["swiglu", "gelu"] = "swiglu"
    capacity_factor: Optional[float] = Field(None, gt=0, description="None = dropless; else C = ceil(T*K/E*cf)")
    eval_capacity_factor: Optional[float] = Field(None, gt=0, description="None = same as capacity_factor")
    min_capacity: int = Field(4, ge=0)
    shared_experts: int = Field(0, ge=0, description="always-on experts beside the routed ones (one dense FFN of "
                                "shared_experts * expert width)")
    shared_gate: bool = Field(False, description="scale the shared experts' output by a learned per-token sigmoid")
    d_shared: Optional[int] = Field(None, gt=0, description="width of the shared FFN; None = shared_experts * expert "
                                    "width (Qwen2-MoE's shared_expert_intermediate_size)")
    dense_layers: List[int] = Field(default_factory=list, description="layers whose FFN stays dense even where "
                                    "first_moe_layer/every would make it MoE (Qwen-MoE's mlp_only_layers)")
    router: RouterConfig = Field(default_factory=RouterConfig)
    balance: BalanceConfig = Field(default_factory=BalanceConfig)

    def is_moe_layer(self, i: int) -> bool:
        """Does layer i hold an MoE block?"""
        placed = i >= self.first_moe_layer and (i - self.first_moe_layer) % self.every == 0
        return self.enabled and placed and i not in self.dense_layers

    def check(self, num_domains: int) -> List[str]:
        """Router/balance rules, one line each (see docs/routing.md)."""
        return routing_problems(self, num_domains)


class DomainConfig(Section):
    name: str = Field(min_length=1)
    path: Optional[str] = Field(None, description="indexed-dataset prefix (.bin/.idx); None = embedded corpus")
    weight: float = Field(1.0, gt=0)


class DataConfig(Section):
    domains: List[DomainConfig] = Field(
        default_factory=lambda: [DomainConfig(name="code", weight=0.5), DomainConfig(name="prose", weight=0.3),
                                 DomainConfig(name="data", weight=0.2)],
        min_length=1)
    seq_len: int = Field(128, gt=0)
    seed: Seed = 1234
    valid_fraction: float = Field(0.02, gt=0, lt=1)
    cache_dir: Optional[str] = Field(None, description="where corpora and sample indices are cached; None = ~/.cache/moe_sys")
    embedded_bpe: Optional[int] = Field(None, gt=256, description="tokenise the embedded corpus with a byte-level BPE "
                                        "of this vocabulary, trained on it once and cached; None = bytes")


class TrainConfig(Section):
    steps: int = Field(200, gt=0, description="optimizer steps; the LR schedule spans them")
    stop_after: Optional[int] = Field(None, gt=0, description="end this invocation after this step (resume later)")
    micro_batch_size: int = Field(8, gt=0, description="sequences per rank per micro-step")
    grad_accum_steps: int = Field(1, gt=0)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    warmup_steps: int = Field(20, ge=1, description="linear warm-up steps (DeepSpeed's WarmupCosineLR needs at least 1); "
                                                   "more than train.steps warms up over all steps, with a log line")
    weight_decay: float = Field(0.1, ge=0)
    betas: List[Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=lambda: [0.9, 0.95], min_length=2, max_length=2, description="Adam's (beta1, beta2), in [0, 1)")
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    eval_every: int = Field(50, gt=0)
    eval_batches: int = Field(4, gt=0)
    seed: Seed = 42
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    activation_checkpointing: Literal["none", "full", "moe"] = Field(
        "none", description="recompute in the backward pass instead of keeping activations: full = whole blocks, "
        "moe = only the routed experts' computation (routing decisions and balancing counts are not redone)")
    init_from: Optional[str] = Field(None, description="start from these model weights (run dir, DeepSpeed checkpoint "
                                     "dir, .safetensors file or Hugging Face model dir); optimizer, schedule and "
                                     "step start fresh")


class ParallelConfig(Section):
    procs: int = Field(2, gt=0, description="local ranks `moe-sys train` launches when no launcher started it")
    ep_size: int = Field(2, gt=0, description="expert-parallel group size")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto = nccl on GPU, gloo on CPU")
    zero_stage: int = Field(0, ge=0, le=2, description="ZeRO stage 0, 1 or 2")


class CheckpointConfig(Section):
    every: int = Field(100, ge=0, description="save every N steps (0 = only at the end)")
    keep: int = Field(2, ge=0, description="checkpoints kept (0 = all)")
    save_final: bool = True


class LoggingConfig(Section):
    run_dir: str = Field("runs/tiny", min_length=1, description="where the resolved config, metrics and checkpoints go")
    log_every: int = Field(10, gt=0)
    tensorboard: bool = True
    progress_bar: bool = True


class OpsConfig(Section):
    impl: Literal["auto", "reference", "kernel"] = "auto"


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    ops: OpsConfig = Field(default_factory=OpsConfig)
    adapters: AdaptersConfig = Field(default_factory=AdaptersConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    deepspeed: Dict[str, Any] = Field(default_factory=dict, description="merged over the generated DeepSpeed config")

    def check(self, world_size: Optional[int] = None) -> List[str]:
        """Cross-field problems as (key, message) lines; empty when the config is consistent."""
        m, moe, p = self.model, self.moe, self.parallel
        problems = []
        rotary = m.arch == "lm"  # rotary positions pair a head's features; the ViT has none
        if m.head_dim is None and (m.d_model % m.n_heads or (rotary and (m.d_model // m.n_heads) % 2)):
            size = "of even size" if rotary else "of equal size"
            problems.append(f"model.n_heads: d_model={m.d_model} must split into {m.n_heads} heads {size}")
        if rotary and m.head_dim is not None and m.head_dim % 2:
            problems.append(f"model.head_dim: {m.head_dim} must be even (rotary pairs)")
        if m.n_kv_heads is not None and m.n_heads % m.n_kv_heads:
            problems.append(f"model.n_kv_heads: n_heads={m.n_heads} must be a multiple of n_kv_heads={m.n_kv_heads}")
        if m.arch == "vit":
            problems += vit_problems(m)
        if moe.top_k > moe.num_experts:
            problems.append(f"moe.top_k: {moe.top_k} exceeds moe.num_experts={moe.num_experts}")
        if moe.num_experts % p.ep_size:
            problems.append(f"moe.num_experts: {moe.num_experts} is not divisible by parallel.ep_size={p.ep_size}")
        if self.data.seq_len > m.max_seq_len:
            problems.append(f"data.seq_len: {self.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        routed = self.task.routing_domains(self.data.domains)
        problems += moe.check(len(routed))
        if moe.first_moe_layer >= m.n_layers:
            problems.append(f"moe.first_moe_layer: {moe.first_moe_layer} but model.n_layers={m.n_layers}")
        names = [d.name for d in self.data.domains]
        if len(set(names)) != len(names):
            problems.append(f"data.domains: names must be unique, got {names}")
        if self.task.type == "metric" and m.arch != "vit":
            problems.append(f"model.arch: task.type metric trains an image encoder (model.arch: vit), got {m.arch}")
        problems += paths.problems(self)
        if self.task.type == "metric":
            problems += metric_problems(self)
        if self.task.type == "multitask":
            problems += multitask_problems(self)
        if self.task.type == "lm":
            problems += vocab_problems(m.vocab_size, self.data.domains, self.data.embedded_bpe)
        problems += self.adapters.problems(p.ep_size, routed)
        world = world_size or p.procs
        if world % p.ep_size:
            problems.append(f"parallel.ep_size: world size {world} is not divisible by ep_size={p.ep_size}")
        return problems


def metric_problems(cfg: "Config") -> List[str]:
    """The metric task's rules: image folders exist, m_per_class divides the batch."""
    problems = [f"data.domains.{i}.path: no image folder at {d.path!r} (one sub-folder of images per class)"
                for i, d in enumerate(cfg.data.domains) if d.path is not None and not os.path.isdir(d.path)]
    m = cfg.task.metric.sampler.m_per_class
    if cfg.train.micro_batch_size % m:
        problems.append(f"task.metric.sampler.m_per_class: {m} does not divide train.micro_batch_size="
                        f"{cfg.train.micro_batch_size}")
    return problems


def vit_problems(m: ModelConfig) -> List[str]:
    """The ViT's own rules, one line each."""
    v, problems = m.vit, []
    if v.image_size % v.patch_size:
        problems.append(f"model.vit.image_size: {v.image_size} is not divisible by model.vit.patch_size={v.patch_size}")
    if v.pretrained is not None:  # that it exists: config.paths; a HF directory's config.json must agree
        from moe_sys.weights.vit_hf import config_problems  # torch only for configs that load weights

        problems += config_problems(v.pretrained, m)
    return problems
