"""Task affinity in multitask training, model-agnostic: TAG's lookahead affinity (Fifty et al., NeurIPS
2021, google-research/google-research ``tag/``), gradient-cosine affinity, their running average over
training, and TAG's search for task groups.

Both affinities look only at the shared parameters theta_s (named by the caller) on one batch:
  lookahead  Z[i, j] = 1 - L_j(theta_s') / L_j(theta_s): how much one step on task i's loss lowers task
             j's loss. theta_s' = theta_s - lr * g_i, g_i = grad_theta_s L_i (plain SGD), or the step the
             training optimizer (any torch.optim.Optimizer: SGD with momentum, Adam, AdamW...) would take
             on g_i from its state, taken by a twin of it on copies of theta_s and of its state, at the
             learning rate lr; TAG's code looks ahead the same way with its momentum optimizer. TAG's
             code also divides Z by lr; we do not.
  cosine     C[i, j] = <g_i, g_j> / (|g_i| |g_j|) over all shared parameters.
Measuring leaves no trace: parameters are swapped in and back (the original tensors), buffers (batch-norm
statistics) are restored, ``.grad`` is never written (torch.autograd.grad), the optimizer is only read,
and every forward replays the caller's RNG state, which is restored at the end (dropout draws the same
masks before and after the lookahead, and training continues as if nothing had been measured).
Data parallelism: ``average`` (a mean over the ranks) turns the per-task losses and gradients into
those of the global batch, so every rank measures the same matrices.

Legend: N tasks, C candidate groups (the 2^N - 1 non-empty subsets).
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

LossesFn = Callable[[Any], torch.Tensor]  # batch -> the N per-task losses [N], computed with the model
MAX_TASKS = 12  # the grouping search is exact, O(k 3^N)
SINGLETON_SCORE = -1e6  # TAG's score for a task alone in its group


def shared_parameters(model: nn.Module, names: Sequence[str]) -> List[nn.Parameter]:
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing or not names:
        raise ValueError(f"shared parameters not in the model: {missing or 'none given'}")
    return [params[n] for n in names]


def measure_affinity(model: nn.Module, shared: Sequence[str], losses_fn: LossesFn, batch: Any,
                     lr: Optional[float] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                     average: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """{"cosine": C [N, N], "losses": the N losses [N]} and, when ``lr`` is given, {"lookahead": Z [N, N]}:
    one forward, N backwards and N lookahead forwards (what a trainer calls every few steps).
    ``average``: a mean over data-parallel ranks applied to every loss and gradient (None: this process)."""
    params = shared_parameters(model, shared)
    average = average or (lambda t: t)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        replay = _rng_replayer(devices)
        losses_N = losses_fn(batch)
        grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses_N]
        grads = _averaged([[torch.zeros_like(p) if g is None else g for p, g in zip(params, task)] for task in grads],
                          average)
        base_N = average(losses_N.detach())
        out = {"cosine": _cosine(grads), "losses": base_N}
        if lr is not None:
            out["lookahead"] = _lookahead_rows(params, grads, lambda b: average(losses_fn(b).detach()), batch, base_N,
                                               lr, optimizer, replay)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return out


def _averaged(grads: List[List[torch.Tensor]], average) -> List[List[torch.Tensor]]:
    """Every task's gradients through ``average`` in one call (one all-reduce of [N, P] under DP)."""
    flat_NP = average(torch.stack([torch.cat([g.reshape(-1) for g in task]) for task in grads]))
    sizes = [g.numel() for g in grads[0]]
    return [[g.view_as(p) for g, p in zip(row.split(sizes), grads[0])] for row in flat_NP]


def lookahead_affinity(model, shared, losses_fn: LossesFn, batch, lr: float, optimizer=None) -> torch.Tensor:
    """TAG's Z [N, N]: Z[i, j] = 1 - L_j(after a step on task i) / L_j (see the module docstring)."""
    return measure_affinity(model, shared, losses_fn, batch, lr, optimizer)["lookahead"]


def gradient_cosine_affinity(model, shared, losses_fn: LossesFn, batch) -> torch.Tensor:
    """C [N, N]: cosine of the per-task gradients on the shared parameters."""
    return measure_affinity(model, shared, losses_fn, batch)["cosine"]


@torch.no_grad()
def _lookahead_rows(params, grads, losses_fn, batch, base_N, lr, optimizer, replay) -> torch.Tensor:
    rows = []
    for grads_i in grads:
        replay()
        with _swapped(params, _lookahead(params, grads_i, lr, optimizer)):
            rows.append(1 - losses_fn(batch) / base_N)
    return torch.stack(rows)


def _cosine(grads: List[List[torch.Tensor]]) -> torch.Tensor:
    g_NP = torch.stack([torch.cat([g.reshape(-1) for g in task]) for task in grads]).double()
    unit_NP = g_NP / g_NP.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (unit_NP @ unit_NP.T).to(grads[0][0].dtype)


def _rng_replayer(devices: List[int]) -> Callable[[], None]:
    """A function that puts the CPU (and the parameters' CUDA devices') RNG back where it is now."""
    cpu, cuda = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]

    def replay() -> None:
        torch.set_rng_state(cpu)
        for d, state in zip(devices, cuda):
            torch.cuda.set_rng_state(state, d)
    return replay


@contextlib.contextmanager
def _swapped(params: List[nn.Parameter], values: List[torch.Tensor]):
    """The parameters hold ``values`` inside the block and their own tensors (bit for bit) after it."""
    originals = [p.data for p in params]
    try:
        for p, v in zip(params, values):
            p.data = v
        yield
    finally:
        for p, original in zip(params, originals):
            p.data = original


def _lookahead(params, grads, lr: float, optimizer) -> List[torch.Tensor]:
    """theta - lr * g per parameter, or ``optimizer``'s own step on g (read, not changed)."""
    if optimizer is None:
        return [p - lr * g for p, g in zip(params, grads)]
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"the lookahead follows a torch.optim.Optimizer's step, not {type(optimizer).__name__}")
    return _twin_step(params, grads, lr, optimizer)


@torch.no_grad()
def _twin_step(params, grads, lr: float, optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    """The parameters after one step of ``optimizer``'s class on copies of them and of their state, with
    ``optimizer``'s settings at learning rate ``lr``: exactly its own update (its own code), while
    ``optimizer`` and the parameters stay untouched. A parameter it does not hold stays where it is."""
    copies = {id(p): p.detach().clone() for p in params}
    groups = [{**group, "lr": lr, "params": [copies[id(p)] for p in group["params"] if id(p) in copies]}
              for group in optimizer.param_groups]
    twin = type(optimizer)([g for g in groups if g["params"]])
    for p, g in zip(params, grads):
        twin_p = copies[id(p)]
        twin_p.grad = g.clone()
        if p in optimizer.state:
            twin.state[twin_p] = copy.deepcopy(optimizer.state[p])
    twin.step()
    return [copies[id(p)] for p in params]


class AffinityAverage:
    """Running mean of affinity matrices over training (TAG averages its Z over the steps measured)."""

    def __init__(self, tasks: Sequence[str]):
        self.tasks = list(tasks)
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {}

    def update(self, matrices: Dict[str, torch.Tensor]) -> None:
        for name, m_NN in matrices.items():
            if tuple(m_NN.shape) != (len(self.tasks),) * 2:
                raise ValueError(f"affinity {name!r} is {tuple(m_NN.shape)}, expected {len(self.tasks)} x {len(self.tasks)}")
            self.sums[name] = self.sums.get(name, 0) + m_NN.detach().double().cpu()
            self.counts[name] = self.counts.get(name, 0) + 1

    def mean(self, name: str) -> torch.Tensor:
        return self.sums[name] / self.counts[name]

    def state_dict(self) -> dict:
        return {"tasks": list(self.tasks), "sums": {k: v.clone() for k, v in self.sums.items()},
                "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        if state["tasks"] != self.tasks:
            raise ValueError(f"affinity state is for tasks {state['tasks']}, this run has {self.tasks}")
        self.sums = {k: v.clone() for k, v in state["sums"].items()}
        self.counts = dict(state["counts"])


@dataclass(frozen=True)
class Grouping:
    groups: Tuple[Tuple[int, ...], ...]  # task indices of each chosen group (a task may be in several)
    assignment: Tuple[int, ...]  # per task: the index in ``groups`` of the group it gets most affinity in
    score: float  # TAG's objective: the mean over tasks of that affinity


def group_scores(affinity_NN: np.ndarray) -> Tuple[List[Tuple[int, ...]], np.ndarray]:
    """Every non-empty group G and score[G, t] = mean_{s in G, s != t} Z[s, t], the affinity onto
    member t (-inf for non-members; SINGLETON_SCORE for a group of one)."""
    n = affinity_NN.shape[0]
    groups = [tuple(t for t in range(n) if mask >> t & 1) for mask in range(1, 2 ** n)]
    score_CN = np.full((len(groups), n), -np.inf)
    for c, members in enumerate(groups):
        for t in members:
            others = [s for s in members if s != t]
            score_CN[c, t] = affinity_NN[others, t].mean() if others else SINGLETON_SCORE
    return groups, score_CN


def select_groups(affinity_NN, k: int) -> Grouping:
    """TAG's network selection: among all choices of at most ``k`` groups that cover every task, the one
    maximising mean_t max_{G chosen, t in G} score[G, t]. Each task is assigned to its best chosen group.

    Exact, as TAG's exhaustive ``select_groups``, but by dynamic programming: the tasks a group is best
    for (its owners O) only need the group G that maximises sum_{t in O} score[G, t] over G >= O, so the
    optimum is the best partition of the tasks into at most k owner sets, O(2^N N + k 3^N) instead of
    C(2^N, k). A group no task is assigned to adds nothing and is left out.
    """
    a_NN = np.asarray(affinity_NN.detach().double().cpu() if torch.is_tensor(affinity_NN) else affinity_NN)
    n = a_NN.shape[0]
    if a_NN.shape != (n, n) or not 1 <= n <= MAX_TASKS or k < 1:
        raise ValueError(f"grouping needs a square affinity of 1..{MAX_TASKS} tasks and k >= 1, "
                         f"got {a_NN.shape} and k={k}")
    groups, score_CN = group_scores(a_NN)
    owner_value, owner_group = _best_group_per_owner_set(score_CN)
    full, blocks = 2 ** n - 1, []
    mask, parts = full, _best_partitions(owner_value, n, k)
    while mask:
        blocks.append(parts[k - len(blocks)][mask])
        mask ^= blocks[-1]
    chosen = sorted({int(owner_group[o]) for o in blocks})
    owner_N = [max(chosen, key=lambda c: score_CN[c, t]) for t in range(n)]
    kept = sorted(set(owner_N))
    best_N = score_CN[owner_N, range(n)]
    return Grouping(tuple(groups[c] for c in kept), tuple(kept.index(c) for c in owner_N), float(best_N.mean()))


def _best_group_per_owner_set(score_CN: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """For every task set O (a bit mask): max over groups G >= O of sum_{t in O} score[G, t], and that G."""
    n = score_CN.shape[1]
    members_ON = (np.arange(2 ** n)[:, None] >> np.arange(n) & 1).astype(bool)
    value_O, group_O = np.full(2 ** n, -np.inf), np.zeros(2 ** n, dtype=np.int64)
    for c in range(score_CN.shape[0]):
        inside_O = (np.arange(2 ** n) & (c + 1)) == np.arange(2 ** n)  # O is a subset of group c (mask c + 1)
        v_O = members_ON @ np.where(np.isfinite(score_CN[c]), score_CN[c], 0.0)
        better_O = inside_O & (v_O > value_O)
        value_O[better_O], group_O[better_O] = v_O[better_O], c
    value_O[0] = 0.0
    return value_O, group_O


def _best_partitions(value_O: np.ndarray, n: int, k: int) -> List[List[int]]:
    """parts[j][mask]: the block holding mask's lowest task in the best split of mask into <= j blocks."""
    best = [[0.0] + [-math.inf] * (2 ** n - 1)]
    parts = [[0] * 2 ** n]
    for _ in range(k):
        prev, row, arg = best[-1], [0.0] * 2 ** n, [0] * 2 ** n
        for mask in range(1, 2 ** n):
            low, rest, top = mask & -mask, mask & (mask - (mask & -mask)), -math.inf
            sub = rest
            while True:  # every block = the lowest task + a subset of the others
                block = sub | low
                v = value_O[block] + prev[mask ^ block]
                if v > top:
                    top, arg[mask] = v, block
                if sub == 0:
                    break
                sub = (sub - 1) & rest
            row[mask] = top
        best.append(row)
        parts.append(arg)
    return parts
