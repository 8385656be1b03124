"""The ``task.multitask`` section: dense multitask learning on the embedded glyph scenes
(moe_sys/data/scenes.py) with one shared ViT encoder and a light decoder + head per task
(moe_sys/tasks/multitask.py, docs/multitask.md).

Pydantic only (no torch). Task names are the scene targets: S segmentation, D height ("depth"),
N normals, E edges, G the domain of the largest glyph. VTAGML's protocols are task lists:
S-D = [S, D], S-D-N = [S, D, N], S-D-N-E = [S, D, N, E]; zero-shot task transfer trains some tasks
and evaluates others (``eval_tasks``, their decoders from ``train.init_from``) on other fonts
(``fonts``); unseen scripts are ``test_domains`` other than ``domains``.
"""
from __future__ import annotations

from typing import Dict, List, Literal, Optional

from pydantic import Field, field_validator

from moe_sys.config.affinity import AffinitySpec
from moe_sys.config.section import Seed, Section

# task -> the losses it may use (the first is the default)
TASK_LOSSES: Dict[str, List[str]] = {"S": ["ce"], "D": ["l1", "berhu"], "N": ["cosine"], "E": ["l1"], "G": ["ce"]}
# adapter types that read the task id: they need task_conditioned (each encoder pass sees its task)
TASK_READING_ADAPTERS = ("task_attention", "task_norm", "conditional_bottleneck")


class DecoderSpec(Section):
    """A dense task's decoder: ``layers`` 3x3 convolutions (+ GELU) of width ``hidden`` on the patch grid,
    bilinear upsampling to the image, a 1x1 head; G's head is an MLP on the pooled feature."""

    hidden: int = Field(32, gt=0, description="decoder width")
    layers: int = Field(1, ge=0, description="3x3 conv + GELU layers before upsampling (0: the head alone)")
    out: Optional[int] = Field(None, gt=0, description="output channels; None = the target's size (S: 1 + domains, "
                                                       "D: 1, N: 3, E: 1, G: domains); set, it must match it")


class FontsSpec(Section):
    """The font group of the glyphs in the train and the test scenes (moe_sys/data/glyphs.py): A, the
    training families, or B, the held-out families (DejaVuSerif, STIXNonUni, cm)."""

    train: Literal["A", "B"] = Field("A", description="font group of the training scenes' glyphs")
    test: Literal["A", "B"] = Field("B", description="font group of the test scenes' glyphs")


class MultitaskConfig(Section):
    tasks: List[str] = Field(default_factory=lambda: ["S", "D", "N", "E"], min_length=1,
                             description="scene targets to learn, in task-id order: any of S, D, N, E, G")
    mode: Literal["all", "mixed"] = Field(
        "all", description="all: every sample carries every task's target; mixed: each sample carries one task id "
                           "(its domain_ids entry, as VTAGML) and the losses are masked per task")
    task_conditioned: bool = Field(
        True, description="the encoder sees the task id: mode all runs it once per task with that id (as VTAGML); "
                          "false: one pass per batch shared by every task (the shared-encoder baseline)")
    freeze_encoder: bool = Field(False, description="freeze the encoder (adapters freeze it anyway)")
    decoder: DecoderSpec = Field(default_factory=DecoderSpec, description="every task's decoder")
    decoders: Dict[str, DecoderSpec] = Field(default_factory=dict, description="per-task replacements of `decoder`")
    losses: Dict[str, str] = Field(default_factory=dict, description="task -> loss: S ce; D l1 | berhu; N cosine; "
                                                                     "E l1; G ce (default: the first)")
    weighting: Literal["fixed", "uncertainty"] = Field(
        "fixed", description="fixed: sum of weights[t] * L_t; uncertainty: Kendall et al.'s learned log-variances")
    weights: Dict[str, float] = Field(default_factory=dict, description="fixed weighting: task -> weight (default 1)")
    domains: List[str] = Field(default_factory=lambda: ["latin", "greek", "cyrillic"], min_length=1,
                               description="embedded glyph domains of the scenes (S has 1 + len classes)")
    eval_tasks: Optional[List[str]] = Field(
        None, min_length=1, description="tasks evaluated (default: tasks); one not in `tasks` is evaluation-only: "
                                        "its decoder is loaded from train.init_from, frozen and outside the loss; "
                                        "task ids are the positions in tasks, then the evaluation-only tasks")
    test_domains: Optional[List[str]] = Field(
        None, min_length=1, description="glyph domains of the test scenes (default: domains); other domains = "
                                        "unseen scripts, where S and G (classes = the training domains) are refused")
    fonts: FontsSpec = Field(default_factory=FontsSpec, description="font groups of the train and test scenes")
    num_train: int = Field(2000, gt=0, description="training scenes")
    num_test: int = Field(200, gt=0, description="test scenes (held-out fonts); the evaluation uses all of them")
    max_glyphs: int = Field(3, gt=0, description="glyphs per scene: 1 to this many")
    scene_seed: Seed = Field(0, description="seed of the scene renderer (part of its cache key)")
    eval_batch_size: int = Field(64, gt=0, description="scenes per forward pass in evaluation")
    baseline: Dict[str, float] = Field(
        default_factory=dict, description="single-task metric values for Delta_m, e.g. {S/miou: 0.5, D/rmse: 0.1}")
    baseline_runs: List[str] = Field(
        default_factory=list, description="run dirs of single-task runs whose last evaluation gives the baseline "
                                          "(read when training starts; `baseline` entries win)")
    affinity: AffinitySpec = Field(default_factory=AffinitySpec)

    @field_validator("tasks", "eval_tasks")
    @classmethod
    def _known_tasks(cls, tasks: Optional[List[str]]) -> Optional[List[str]]:
        for t in tasks or []:
            if t not in TASK_LOSSES:
                raise ValueError(f"{t!r} is not a target of the scene data (it provides {', '.join(TASK_LOSSES)})")
        if tasks is not None and len(set(tasks)) != len(tasks):
            raise ValueError(f"names must be unique, got {tasks}")
        return tasks

    def evaluated(self) -> List[str]:
        return list(self.eval_tasks or self.tasks)

    def model_tasks(self) -> List[str]:
        """Every task with a decoder, in task-id order: the trained ones, then the evaluation-only ones."""
        return self.tasks + [t for t in self.evaluated() if t not in self.tasks]

    def loss_name(self, task: str) -> str:
        return self.losses.get(task, TASK_LOSSES[task][0])  # checked by multitask_problems

    def decoder_of(self, task: str) -> DecoderSpec:
        return self.decoders.get(task, self.decoder)

    def target_size(self, task: str) -> int:
        """Output channels the target of ``task`` needs."""
        return {"S": 1 + len(self.domains), "D": 1, "N": 3, "E": 1, "G": len(self.domains)}[task]


def multitask_problems(cfg) -> List[str]:
    """The multitask task's cross-section rules, one 'key: message' line each."""
    m, v, spec = cfg.model, cfg.model.vit, cfg.task.multitask
    problems = []
    problems += [f"task.multitask.decoders.{t}: not a task of task.multitask.tasks or eval_tasks"
                 for t in spec.decoders if t not in spec.model_tasks()]
    for key in ("losses", "weights"):
        problems += [f"task.multitask.{key}.{t}: not a task of task.multitask.tasks {spec.tasks}"
                     for t in getattr(spec, key) if t not in spec.tasks]
    eval_only = spec.model_tasks()[len(spec.tasks):]
    if eval_only and not cfg.train.init_from:
        problems.append(f"task.multitask.eval_tasks: {', '.join(eval_only)} not trained (not in task.multitask.tasks), "
                        "so their decoders must come from train.init_from, which is not set")
    by_domain = [t for t in spec.evaluated() if t in ("S", "G")]
    if spec.test_domains is not None and spec.test_domains != spec.domains and by_domain:
        problems.append(f"task.multitask.eval_tasks: {', '.join(by_domain)} cannot be evaluated on task.multitask."
                        f"test_domains {spec.test_domains}: their classes are the training domains {spec.domains} "
                        "(leave them out of eval_tasks; D, N, E are defined on any domain)")
    problems += [f"task.multitask.losses.{t}: unknown loss {name!r} for {t}; valid: {', '.join(TASK_LOSSES[t])}"
                 for t, name in spec.losses.items() if t in TASK_LOSSES and name not in TASK_LOSSES[t]]
    if m.arch != "vit":
        problems.append(f"model.arch: task.type multitask trains a ViT encoder (model.arch: vit), got {m.arch}")
    if v.in_channels != 1:
        problems.append(f"model.vit.in_channels: the scenes are grey (1 channel), got {v.in_channels}")
    for t in spec.model_tasks():
        out, need = spec.decoder_of(t).out, spec.target_size(t)
        if out is not None and out != need:
            key = f"task.multitask.decoders.{t}.out" if t in spec.decoders else "task.multitask.decoder.out"
            problems.append(f"{key}: {out} outputs, but the {t} target has {need} (decoder output does not match)")
    if not spec.task_conditioned:
        for i, a in enumerate(cfg.adapters.modules):
            if a.type in TASK_READING_ADAPTERS:
                problems.append(f"adapters.modules.{i}: {a.type} reads the task id, but task.multitask."
                                "task_conditioned is false (every task shares one encoder pass)")
    return problems
