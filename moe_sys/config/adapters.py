"""The ``adapters`` config section: which adapters go where, and which one each example uses.

Pydantic only (no torch), so reading a config stays cheap. One spec class per adapter type, chosen
by ``type:``; the builders are registered under the same names in ``moe_sys.adapters.base.ADAPTERS``.

Target patterns name modules of the base model: ``*`` matches one name component, ``**`` any number
(``layers.*.attn.qkv`` = the fused q/k/v projection of every layer).
"""
from __future__ import annotations

from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from moe_sys.config.section import Section

Activation = Literal["relu", "gelu", "silu"]


class AdapterSpec(Section):
    name: str = Field(min_length=1, description="unique name; also the prefix of its weights in saved adapter files")
    targets: List[str] = Field(description="module-name patterns of the base model to wrap")

    @field_validator("targets")  # also for the subclasses, which give targets their own defaults
    @classmethod
    def _some_targets(cls, targets: List[str]) -> List[str]:
        if not targets:
            raise ValueError("needs at least one module-name pattern")
        return targets


class SlotSpec(AdapterSpec):
    """An adapter bank: ``slots`` adapters of one type side by side at every target."""

    slots: List[str] = Field(default_factory=list, description="names of the adapters in the bank (default: [name])")
    select: Literal["fixed", "domain"] = Field(
        "fixed", description="fixed: every example uses `active`; domain: each example uses its data domain's slot")
    active: Optional[str] = Field(None, description="slot used when select=fixed (default: the first)")
    domain_slots: Dict[str, str] = Field(
        default_factory=dict, description="data domain -> slot for select=domain (default: the slot named like the "
                                          "domain); examples of unlisted domains get no adapter")

    @model_validator(mode="after")
    def _slots_named(self):
        names = self.slot_names()
        if len(set(names)) != len(names):
            raise ValueError(f"slots must be unique, got {names}")
        unknown = [s for s in [self.active, *self.domain_slots.values()] if s is not None and s not in names]
        if unknown:
            raise ValueError(f"{unknown} are not slots of {self.name!r} (slots: {names})")
        return self

    def slot_names(self) -> List[str]:
        return list(self.slots) or [self.name]


class LoRASpec(SlotSpec):
    """W x + (alpha / r) * B A dropout(x); B starts at zero (Hu et al. 2022)."""

    type: Literal["lora"] = "lora"
    targets: List[str] = Field(default_factory=lambda: ["layers.*.attn.qkv", "layers.*.attn.proj"])
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    rslora: bool = Field(False, description="scale by alpha / sqrt(rank) instead of alpha / rank (Kalajdzievski 2023)")


class BottleneckSpec(SlotSpec):
    """up(act(down(h))) with up zero-initialised, after a sublayer (Houlsby/Pfeiffer) or beside it (He et al.)."""

    type: Literal["bottleneck"] = "bottleneck"
    targets: List[str] = Field(default_factory=lambda: ["layers.*.ffn"])
    dim: int = Field(16, gt=0, description="bottleneck width")
    activation: Activation = "relu"
    placement: Literal["sequential", "parallel"] = Field(
        "sequential", description="sequential: y + s*a(y) on the sublayer output; parallel: y + s*a(x) from its input")
    scale: float = Field(1.0, description="s; He et al. use 4.0 for parallel adapters")


class StochasticSpec(SlotSpec):
    """A parallel bottleneck adapter beside each whole block, dropped per example in training (the
    whole-block reading of PUMA; ``puma`` is its own two-per-block placement)."""

    type: Literal["stochastic"] = "stochastic"
    targets: List[str] = Field(default_factory=lambda: ["layers.*"], description="LM blocks; ViT: [blocks.*]")
    dim: int = Field(32, gt=0, description="bottleneck width (PUMA: 128 on ViT-S)")
    activation: Activation = "gelu"
    p_drop: float = Field(0.5, ge=0, le=1, description="probability that an example's adapter is off in training")
    rescale: bool = Field(True, description="kept adapters are scaled by 1/(1-p_drop) in training (docs/modular.md)")


class PumaSpec(SlotSpec):
    """PUMA's adapters: beside each attention and each MLP sub-layer, reading its normalised input,
    ReLU bottleneck without biases, up zero-initialised, fixed scale, dropped per example in training."""

    type: Literal["puma"] = "puma"
    targets: List[str] = Field(default_factory=lambda: ["blocks.*.attn", "blocks.*.mlp"])
    dim: int = Field(32, gt=0, description="bottleneck width (PUMA: 128 on ViT-S/16)")
    scale: float = Field(0.1, description="fixed output scale (PUMA: 0.1, not trained)")
    p_drop: float = Field(0.5, ge=0, le=1, description="probability that an example's adapter is off at a site in "
                                                       "training (PUMA's adapter_droppath 0.5)")
    rescale: bool = Field(True, description="kept adapters are scaled by 1/(1-p_drop) in training (timm DropPath)")


class PromptPoolSpec(AdapterSpec):
    """PUMA's prompt pool: per image a cosine-weighted mixture of learned prompts, inserted after the class
    token; an orthogonality penalty on keys, attention vectors and prompts (ViT only)."""

    type: Literal["prompt_pool"] = "prompt_pool"
    targets: List[str] = Field(default_factory=lambda: ["embed"])
    components: int = Field(20, gt=0, description="M components (key, attention vector, prompt); PUMA: 20")
    length: int = Field(8, gt=0, description="prompt tokens inserted after the class token; PUMA: 8")
    ortho_coef: float = Field(1e-6, ge=0, description="weight of the orthogonality penalty (PUMA: 1e-6 x "
                                                      "prompt_lambda 1)")


class IA3Spec(SlotSpec):
    """Learned rescaling vectors, initialised to 1: keys, values and the FFN hidden (Liu et al. 2022)."""

    type: Literal["ia3"] = "ia3"
    targets: List[str] = Field(default_factory=lambda: ["layers.*.attn.qkv", "layers.*.ffn.down"])
    feedforward: List[str] = Field(default_factory=lambda: ["layers.*.ffn.down"],
                                   description="targets whose INPUT is rescaled (the FFN hidden before down)")
    fused_qkv: List[str] = Field(default_factory=lambda: ["layers.*.attn.qkv"],
                                 description="fused q/k/v targets: only the k and v rows are rescaled")


class PrefixSpec(SlotSpec):
    """Learned key/value prefixes every query may attend to (Li & Liang 2021)."""

    type: Literal["prefix"] = "prefix"
    targets: List[str] = Field(default_factory=lambda: ["layers.*.attn"])
    length: int = Field(8, gt=0, description="prefix positions per layer")
    reparam_dim: Optional[int] = Field(None, gt=0, description="train the prefix through an MLP of this width "
                                                              "(None: train it directly)")


class TaskConditionedSpec(AdapterSpec):
    """VTAGML's adapters, conditioned on each example's task (its domain id) through a learned task
    embedding and FiLM; they start as the frozen model exactly (moe_sys/adapters/task_conditioned.py)."""

    embed_dim: int = Field(64, gt=0, description="width of the learned task embedding")


class TaskAttentionSpec(TaskConditionedSpec):
    """Task-adapted attention: a task-dependent additive bias (1 + gamma) M + beta on every head's logits."""

    type: Literal["task_attention"] = "task_attention"
    targets: List[str] = Field(default_factory=lambda: ["blocks.*.attn"])
    max_tokens: int = Field(197, gt=0, description="rows of the bias matrix M: at least the tokens per image "
                                                   "(class token + patches + inserted prompts)")
    blocks: int = Field(1, gt=0, description="> 1: the bias is block-diagonal with this many blocks (VTAGML's "
                                             "hidden_size // max_seq_length)")


class TaskNormSpec(TaskConditionedSpec):
    """Task-scaled norm: a LayerNorm whose weight is FiLM-modulated by the task embedding."""

    type: Literal["task_norm"] = "task_norm"
    targets: List[str] = Field(default_factory=lambda: ["blocks.*.norm1", "blocks.*.norm2"])


class ConditionalBottleneckSpec(TaskConditionedSpec):
    """A FiLM-conditioned linear bottleneck after each target block, its output carried to the next one."""

    type: Literal["conditional_bottleneck"] = "conditional_bottleneck"
    targets: List[str] = Field(default_factory=lambda: ["blocks.*"])
    dim: Optional[int] = Field(None, gt=0, description="bottleneck width (default: model width // 3, as VTAGML)")
    scale: float = Field(1.0, description="weight of the bottleneck output added to the block output")


class ExpertSpec(Section):
    """What each expert of a mixture is."""

    kind: Literal["lora", "bottleneck"] = Field(
        "lora", description="lora: the FFN with its own LoRA on gate/up/down; bottleneck: a parallel adapter beside it")
    rank: int = Field(8, gt=0, description="LoRA rank, or bottleneck width")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha")
    rslora: bool = False
    activation: Activation = Field("gelu", description="bottleneck activation")
    scale: float = Field(1.0, description="bottleneck output scale")


class MixtureSpec(AdapterSpec):
    """An MoE layer whose experts are adapters over the frozen dense FFN, routed by the routing issue's
    routers: ``router`` and ``balance`` take the keys of ``moe.router`` and ``moe.balance``."""

    type: Literal["mixture"] = "mixture"
    targets: List[str] = Field(default_factory=lambda: ["layers.*.ffn"])
    expert: ExpertSpec = Field(default_factory=ExpertSpec)
    num_experts: int = Field(4, gt=0)
    top_k: int = Field(2, gt=0)
    capacity_factor: Optional[float] = Field(None, gt=0, description="None = dropless")
    router: Dict[str, Any] = Field(default_factory=dict, description="moe.router keys, e.g. {type: task}")
    balance: Dict[str, Any] = Field(default_factory=dict, description="moe.balance keys (default: its losses)")
    aggregation: Literal["outputs", "params"] = Field(
        "outputs", description="outputs: dispatch tokens, mix the experts' outputs (MoE); params: merge the experts' "
                               "parameters per example, one forward (needs an example- or task-level router)")

    def routing_config(self):
        """This mixture's routing as a ``moe`` section, the form the routers and their checks read."""
        from moe_sys.config.schema import MoEConfig  # not at the top: schema.py imports this module

        return MoEConfig(num_experts=self.num_experts, top_k=self.top_k, capacity_factor=self.capacity_factor,
                         router=self.router, balance=self.balance)


class SmearSpec(AdapterSpec):
    """SMEAR (Muqeeth et al. 2024): a soft router per example, expert parameters merged per example."""

    type: Literal["smear"] = "smear"
    targets: List[str] = Field(default_factory=lambda: ["layers.*.ffn"])
    expert: ExpertSpec = Field(default_factory=ExpertSpec)
    num_experts: int = Field(4, gt=0)
    expert_dropout: float = Field(0.0, ge=0, lt=1, description="training: drop each expert's weight with this "
                                                              "probability and renormalise (SMEAR paper: 0.1)")
    segments: int = Field(1, gt=0, description="1: one decision per sequence from its mean (not causal); n > 1: "
                                               "the sequence is cut into n segments, each routed from the mean of "
                                               "the segments before it (causal)")
    allow_noncausal: bool = Field(False, description="accept segments: 1 in this causal LM, where pooling the "
                                                     "whole sequence lets early tokens' adapter depend on later ones")
    aggregation: Literal["outputs", "params"] = Field(
        "params", description="params: SMEAR; outputs: run every expert and mix outputs (the ensemble it approximates)")


AnySpec = Annotated[Union[LoRASpec, BottleneckSpec, StochasticSpec, PumaSpec, PromptPoolSpec, IA3Spec, PrefixSpec,
                          MixtureSpec, SmearSpec, TaskAttentionSpec, TaskNormSpec, ConditionalBottleneckSpec],
                    Field(discriminator="type")]

# Routers whose decision can change from token to token: their weights cannot be merged per example.
TOKEN_LEVEL_ROUTERS = ("topk", "expert_choice")


class AdaptersConfig(Section):
    modules: List[AnySpec] = Field(default_factory=list, description="adapters to inject, applied in order")
    load_from: Optional[str] = Field(None, description="adapter directory (manifest.json + adapters.safetensors) "
                                                       "whose weights are loaded; its specs are used when `modules` "
                                                       "is empty")
    save: bool = Field(True, description="write the adapters alone to RUN_DIR/adapters when training ends")

    def problems(self, ep_size: int, domains: List[str]) -> List[str]:
        """Cross-field problems as 'key: message' lines."""
        names = [m.name for m in self.modules]
        out = [f"adapters.modules: names must be unique, got {names}"] if len(set(names)) != len(names) else []
        for i, m in enumerate(self.modules):
            key = f"adapters.modules.{i}"
            if isinstance(m, (MixtureSpec, SmearSpec)) and m.num_experts % ep_size:
                out.append(f"{key}.num_experts: {m.num_experts} is not divisible by parallel.ep_size={ep_size}")
            if isinstance(m, MixtureSpec):
                out += _routing_problems(m, key, len(domains))
            if isinstance(m, SmearSpec) and m.segments == 1 and not m.allow_noncausal:
                out.append(f"{key}.segments: 1 routes each sequence from its whole mean, so in this causal LM early "
                           "tokens' adapter depends on later tokens; use segments > 1 (causal) or set "
                           "allow_noncausal: true")
            if isinstance(m, SlotSpec):
                unknown = sorted(set(m.domain_slots) - set(domains))
                if unknown:
                    out.append(f"{key}.domain_slots: {unknown} are not data domains ({domains})")
        return out


def _routing_problems(m: MixtureSpec, key: str, num_domains: int) -> List[str]:
    """The routing issue's own rules, reported under this mixture's keys."""
    try:
        routing = m.routing_config()
    except ValidationError as e:
        return [f"{key}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
    out = [line.replace("moe.", f"{key}.") for line in routing.check(num_domains)]
    if routing.top_k > routing.num_experts:
        out.append(f"{key}.top_k: {m.top_k} exceeds num_experts={m.num_experts}")
    if m.aggregation == "params" and routing.router.type in TOKEN_LEVEL_ROUTERS:
        out.append(f"{key}.aggregation: 'params' merges experts per example, but {routing.router.type} routing "
                   "decides per token; use an example- or task-level router")
    return out
