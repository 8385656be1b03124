"""Dense multitask learning on the embedded glyph scenes (moe_sys/data/scenes.py): one shared ViT
encoder (frozen or not; the ``adapters`` config injects VTAGML's task-conditioned adapters into it) and
one light decoder + head per task (moe_sys/models/dense_heads.py), per-task losses summed with fixed
weights or Kendall et al.'s learned uncertainty, evaluated by moe_sys/eval/dense.py (docs/multitask.md).

The task id of a sample is its ``domain_ids`` entry, which the encoder's routing context carries to
task-conditioned adapters (and task routers): mode ``mixed`` draws one task per sample and masks the
losses per task; mode ``all`` gives every sample every target and, with ``task_conditioned``, runs the
encoder once per task with that task's id (as VTAGML's forward does).

Evaluation-only tasks (``eval_tasks`` not in ``tasks``: VTAGML's zero-shot task transfer) have a
decoder, loaded from ``train.init_from`` and frozen, and a task id, but no loss and no training pass.

Legend: B scenes per rank, H = W image pixels, T tasks, N scenes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from moe_sys.data.glyphs import BLOCKS
from moe_sys.data.scenes import SceneSet, load_scenes
from moe_sys.eval.dense import LOWER_IS_BETTER, PRIMARY, DenseMeter, delta_m
from moe_sys.models.dense_heads import DenseDecoder, GlobalHead
from moe_sys.models.vit import build_vit
from moe_sys.moe.routing import RouterOutput
from moe_sys.tasks.affinity_probe import AffinityProbe
from moe_sys.tasks.base import Task
from moe_sys.tasks.metric import load_encoder_weights
from moe_sys.tasks.multitask_losses import LOSSES, uncertainty_weighted
from moe_sys.train.distributed import to_device
from moe_sys.weights import io as weights_io

TARGETS = {"S": "seg", "D": "height", "N": "normals", "E": "edges", "G": "glyph"}  # task -> batch key


@dataclass
class MultitaskOutput:
    preds: Dict[str, torch.Tensor]  # task -> [B, O, H, W] (G: [B, O])
    routings: List[RouterOutput]
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)  # the encoder's extra weighted losses


class MultitaskModel(nn.Module):
    """encoder (ViT) -> one decoder per task; ``log_var_T`` (uncertainty weighting) lives here so the
    engine trains and checkpoints it with the rest."""

    def __init__(self, encoder: nn.Module, decoders: nn.ModuleDict, uncertainty: bool):
        super().__init__()
        self.encoder, self.decoders = encoder, decoders
        self.num_patches = encoder.embed.num_patches  # read before a prompt adapter may wrap the embedding
        self.log_var_T = nn.Parameter(torch.zeros(len(decoders))) if uncertainty else None

    def forward(self, images_BCHW: torch.Tensor, domain_ids_B: torch.Tensor, per_task: bool = False,
                tasks: Optional[List[str]] = None) -> MultitaskOutput:
        """The predictions of ``tasks`` (default: every decoder's). per_task: one encoder pass per task,
        every sample with that task's id (its position among the decoders); else one pass with
        ``domain_ids_B``, read by every decoder."""
        tasks = list(self.decoders) if tasks is None else tasks
        if not per_task:
            out = self.encoder(images_BCHW, domain_ids_B)
            return MultitaskOutput({t: self._decode(t, out) for t in tasks}, out.routings, out.losses)
        preds, routings, losses, ids = {}, [], {}, list(self.decoders)
        for t in tasks:
            out = self.encoder(images_BCHW, torch.full_like(domain_ids_B, ids.index(t)))
            preds[t], routings = self._decode(t, out), routings + out.routings
            for key, value in out.losses.items():  # averaged over the passes: one batch's worth
                losses[key] = losses.get(key, 0) + value / len(tasks)
        return MultitaskOutput(preds, routings, losses)

    def _decode(self, task: str, out) -> torch.Tensor:
        head = self.decoders[task]
        return head(out.features_BD) if isinstance(head, GlobalHead) else head(out.tokens_BSD, self.num_patches)


def scene_batch(scenes: SceneSet, idx_B: np.ndarray, tasks: List[str], domain_ids_B: np.ndarray
                ) -> Dict[str, torch.Tensor]:
    """Images in [-1, 1] [B, 1, H, W], the targets of ``tasks`` and the domain (= task) ids."""
    arrays = {"seg": scenes.seg_NHW, "height": scenes.height_NHW, "normals": scenes.normals_N3HW,
              "edges": scenes.edges_NHW, "glyph": scenes.largest_domain_N}
    batch = {TARGETS[t]: torch.from_numpy(arrays[TARGETS[t]][idx_B]) for t in tasks}
    images = torch.from_numpy(scenes.images_NHW[idx_B])[:, None] * 2 - 1
    return {"images": images, **batch, "domain_ids": torch.from_numpy(np.asarray(domain_ids_B, np.int64))}


class SceneStream:
    """Endless training batches. Every rank takes its rows (``rank::world``) of the same global batch,
    read in order from one random permutation per epoch (``mixed``: with one random task per position);
    the state is (epoch, position), so a resumed run reads the very same batches."""

    def __init__(self, scenes: SceneSet, tasks: List[str], mixed: bool, batch: int, rank: int, world: int,
                 seed: int):
        self.scenes, self.tasks, self.mixed = scenes, tasks, mixed
        self.batch, self.rank, self.world, self.seed = batch, rank, world, seed
        self.epoch = self.pos = 0

    def _order(self, epoch: int):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        n = len(self.scenes.images_NHW)
        return torch.randperm(n, generator=gen).numpy(), torch.randint(len(self.tasks), (n,), generator=gen).numpy()

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        idx, task_ids, need = [], [], self.batch * self.world
        while len(idx) < need:
            perm, draw = self._order(self.epoch)
            take = min(need - len(idx), len(perm) - self.pos)
            idx += perm[self.pos:self.pos + take].tolist()
            task_ids += draw[self.pos:self.pos + take].tolist()
            self.pos += take
            if self.pos == len(perm):
                self.epoch, self.pos = self.epoch + 1, 0
        mine = slice(self.rank, None, self.world)
        ids = np.asarray(task_ids)[mine] if self.mixed else np.zeros(self.batch, np.int64)
        return scene_batch(self.scenes, np.asarray(idx)[mine], self.tasks, ids)

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


class MultitaskTask(Task):
    throughput_key, throughput_label = "images_per_s", "img/s"
    progress_keys = {"delta_m": "Δm", "S/miou": "mIoU", "D/rmse": "D", "N/mean_angle": "N°", "E/l1": "E",
                     "G/acc": "G"}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.spec = cfg.task.multitask
        self.tasks = list(self.spec.tasks)  # trained
        self.all_tasks, self.eval_tasks = self.spec.model_tasks(), self.spec.evaluated()
        self.train_set, self.test_set = load_splits(cfg)
        self.baseline = baseline_metrics(self.spec)
        self.affinity = AffinityProbe(self.spec.affinity, self.tasks, lambda model, batch: self.per_task_losses(
            self.forward(model, batch), batch), self.shared_parameter_names)

    @classmethod
    def check_inputs(cls, cfg) -> None:
        """Build (and cache) both scene splits once, before any rank starts; check the Delta_m baseline."""
        load_splits(cfg)
        baseline_metrics(cfg.task.multitask)

    def task_names(self) -> List[str]:
        return list(self.tasks)

    def domain_names(self) -> List[str]:
        return list(self.all_tasks)  # the ids batches carry are task ids (evaluation-only tasks have one too)

    def build_model(self):
        cfg, spec = self.cfg, self.spec
        encoder = build_vit(cfg, num_domains=len(self.all_tasks))
        decoders = nn.ModuleDict({t: self._decoder(t) for t in self.all_tasks})
        if cfg.train.init_from:
            state = weights_io.read_model_weights(cfg.train.init_from)
            load_encoder_weights(encoder, cfg.train.init_from, state)
            self._load_decoders(decoders, cfg.train.init_from, state)
        if spec.freeze_encoder:
            encoder.requires_grad_(False)
        for t in self.all_tasks[len(self.tasks):]:
            decoders[t].requires_grad_(False)  # evaluation-only: as trained by the run it came from
        self.model = MultitaskModel(encoder, decoders, spec.weighting == "uncertainty")  # the engine wraps it
        return self.model

    def _load_decoders(self, decoders: nn.ModuleDict, path: str, state: Dict[str, torch.Tensor]) -> None:
        """The decoders a multitask run at ``path`` saved for our tasks; every evaluation-only task needs one."""
        for t in self.all_tasks:
            prefix = f"decoders.{t}."
            saved = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not saved:
                if t not in self.tasks:
                    raise ValueError(f"train.init_from: {path} has no {t} decoder, and {t} is evaluation-only "
                                     "(in task.multitask.eval_tasks, not in tasks)")
                continue
            own = decoders[t].state_dict()
            if set(saved) != set(own) or any(saved[k].shape != own[k].shape for k in own):
                raise ValueError(f"train.init_from: the {t} decoder of {path} does not fit task.multitask's "
                                 f"(another decoder or domain count): {sorted(saved)[:3]} vs {sorted(own)[:3]}")
            decoders[t].load_state_dict(saved)

    def _decoder(self, task: str) -> nn.Module:
        d, width = self.spec.decoder_of(task), self.cfg.model.d_model
        out = self.spec.target_size(task)
        if task == "G":
            return GlobalHead(width, d.hidden, d.layers, out)
        return DenseDecoder(width, d.hidden, d.layers, out, self.cfg.model.vit.image_size)

    def adapter_root(self, model):
        return model.encoder

    def shared_parameter_names(self, model: nn.Module) -> List[str]:
        """Names (as ``model.named_parameters()`` gives them) of the trainable parameters every task
        shares: the encoder's and its adapters', not the decoders' or the uncertainty weights."""
        encoder = {id(p) for p in self.model.encoder.parameters()}
        return [n for n, p in model.named_parameters() if p.requires_grad and id(p) in encoder]

    def probe(self, engine, batch, step):
        """Every ``affinity.every`` steps: TAG lookahead and gradient-cosine affinity (tasks/affinity_probe.py)."""
        return self.affinity(engine, batch, step)

    def state_dict(self):
        return {"affinity": self.affinity.state_dict()}

    def load_state_dict(self, state):
        if "affinity" in state:
            self.affinity.load_state_dict(state["affinity"])

    def build_feeds(self, rank, world):
        stream = SceneStream(self.train_set, self.tasks, self.spec.mode == "mixed", self.cfg.train.micro_batch_size,
                             rank, world, self.cfg.data.seed)
        return stream, lambda: iter(())

    def forward(self, model, batch):
        """The trained tasks' predictions (evaluation-only decoders are not run)."""
        ids = batch["domain_ids"] if self.spec.task_conditioned else torch.zeros_like(batch["domain_ids"])
        return model(batch["images"], ids, per_task=self.spec.task_conditioned and self.spec.mode == "all",
                     tasks=self.tasks)

    def per_task_losses(self, out: MultitaskOutput, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Unweighted loss of every task (differentiable scalars); mode mixed: over that task's samples
        only (zero, still in the graph, when the batch has none)."""
        losses = {}
        for i, t in enumerate(self.tasks):
            pred, target = out.preds[t], batch[TARGETS[t]]
            if self.spec.mode == "mixed":
                rows_B = batch["domain_ids"] == i
                pred, target = pred[rows_B], target[rows_B]
            losses[t] = LOSSES[self.spec.loss_name(t)](pred, target) if len(target) else out.preds[t].sum() * 0
        return losses

    def loss(self, out, batch):
        """Parts: every task's weighted term (``<task>_loss``; uncertainty: exp(-s_t)/2 L_t + s_t/2) and
        the encoder's extra losses."""
        per_task = self.per_task_losses(out, batch)
        losses_T = torch.stack(list(per_task.values()))
        if self.spec.weighting == "uncertainty":
            terms_T = uncertainty_weighted(losses_T, self.model.log_var_T)
        else:
            terms_T = losses_T * torch.tensor([self.spec.weights.get(t, 1.0) for t in self.tasks], device=losses_T.device)
        parts = {**dict(zip(self.tasks, terms_T.unbind())), **out.losses}
        return sum(parts.values()), parts

    def units(self, batch):
        return batch["images"].shape[0]

    @torch.no_grad()
    def evaluate(self, model, batches) -> Dict[str, Any]:
        """Every evaluated task's metrics on all test scenes (each rank its share; the sums meet in one all_reduce),
        Delta_m against the single-task baseline when one is given, the learned log-variances."""
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = np.arange(len(self.test_set.images_NHW))[rank::world]
        meter, size = DenseMeter(self.spec.target_size("S")), self.spec.eval_batch_size
        for start in range(0, len(mine), size):
            idx = mine[start:start + size]
            batch = to_device(scene_batch(self.test_set, idx, self.eval_tasks, np.zeros(len(idx), np.int64)),
                              model.device)
            out = model(batch["images"], batch["domain_ids"], per_task=self.spec.task_conditioned, tasks=self.eval_tasks)
            for t in self.eval_tasks:
                getattr(meter, f"add_{t}")(out.preds[t].float(), batch[TARGETS[t]])
        record: Dict[str, Any] = meter.result(model.device)
        if self.baseline:
            record["delta_m"] = delta_m(record, self.baseline, [PRIMARY[t] for t in self.eval_tasks])
        if self.model.log_var_T is not None:
            record["log_var"] = dict(zip(self.tasks, self.model.log_var_T.detach().float().tolist()))
        return record


def load_splits(cfg):
    """(train, test) SceneSets of task.multitask at the ViT's image size: the test scenes of
    ``test_domains`` (default: the training domains), each split in its font group."""
    s = cfg.task.multitask
    test_domains = s.test_domains or s.domains
    for key, names in (("domains", s.domains), ("test_domains", test_domains)):
        unknown = [d for d in names if d not in BLOCKS]
        if unknown:
            raise ValueError(f"task.multitask.{key}: no embedded glyph domain named {unknown[0]!r}; known: "
                             f"{', '.join(BLOCKS)}")
    load = dict(size=cfg.model.vit.image_size, max_glyphs=s.max_glyphs, seed=s.scene_seed, cache_root=cfg.data.cache_dir,
                fonts=(s.fonts.train, s.fonts.test))
    return load_scenes(s.domains, "train", s.num_train, **load), load_scenes(test_domains, "test", s.num_test, **load)


def baseline_metrics(spec) -> Optional[Dict[str, float]]:
    """The single-task metrics Delta_m compares with: ``baseline``, over the last evaluation of each of
    ``baseline_runs``; None when neither is given. ValueError (one line) for a run without an
    evaluation or a task without a value."""
    if not spec.baseline and not spec.baseline_runs:
        return None
    values: Dict[str, float] = {}
    for run in spec.baseline_runs:
        values.update(last_evaluation(run))
    values.update(spec.baseline)
    missing = [PRIMARY[t] for t in spec.evaluated() if PRIMARY[t] not in values]
    if missing:
        raise ValueError(f"task.multitask.baseline: no single-task value of {', '.join(missing)} (give it there or "
                         "in a baseline_runs entry that evaluated it)")
    return values


def last_evaluation(run_dir: str) -> Dict[str, float]:
    """The dense metrics of the last evaluation in RUN_DIR/metrics.jsonl."""
    from moe_sys.analysis.plot import read_records

    try:
        records = read_records(run_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"task.multitask.baseline_runs: {e}") from None
    evaluations = [{k: v for k, v in r.items() if k in LOWER_IS_BETTER} for r in records]
    found = next((m for m in reversed(evaluations) if m), {})
    if not found:
        path = os.path.join(run_dir, "metrics.jsonl")
        raise ValueError(f"task.multitask.baseline_runs: {path} holds no multitask evaluation")
    return found
