"""The per-tensor math of ``moe-sys merge``: one tensor's task vectors -> its merged delta.

A method is a recipe (sparsify, elect signs or not, normalise or not) and a convention says how each
step is computed. Two conventions, chosen by name:

  peft      ``peft.utils.merge_utils`` (the default). magnitude: keep the int(density * n) largest
            |tau_i|; random (DARE): keep each entry with probability density, divide by density;
            the majority sign is elected from the UNWEIGHTED sparsified task vectors; the disjoint
            mean of the weighted agreeing entries divides by HOW MANY agree.
  mergekit  ``mergekit/merge_methods/generalized_task_arithmetic.py`` and ``mergekit/sparsify.py``
            (arcee-ai/mergekit a6e4028). Same magnitude trim; random keeps each entry with
            probability density and rescales the tensor to its former L1 norm (``rescale: true``);
            signs are elected from the WEIGHTED task vectors w_i tau_i and agree when sign(w_i tau_i)
            matches; with ``normalize`` (ties; not dare_ties) the sum of the agreeing weighted entries
            is divided by the SUM OF THE AGREEING WEIGHTS (0 -> 1).

Majority sign ("total" as in TIES, or "frequency": the commoner sign): gamma = +1 where the sum is
>= 0, else -1; a zero entry agrees with neither. ``average`` is sum_i w_i tau_i / sum_i w_i in both.

Trimming and DARE's rescaling treat every slot of an adapter bank and every expert of an expert bank
as its own tensor, as PEFT (one adapter per slot) and mergekit (one Hugging Face tensor per expert)
see them: the leading N (slots) and E (experts) letters of a tensor's shape suffix (``A_NIR``,
``w_up_EDF``) split it into units. Ties in magnitude are broken by ``torch.topk`` (PEFT's op).

Legend: M merged models, U units (slots or experts) of a tensor, n entries per unit.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch


@dataclass(frozen=True)
class Recipe:
    """What a method does; the convention decides how (``average`` is the same in both)."""

    sparsify: Optional[str]  # None | "magnitude" | "random" (DARE)
    elect: bool  # TIES' sign election and disjoint merge
    mergekit_normalize: bool  # mergekit's per-method default of ``normalize``


RECIPES: Dict[str, Recipe] = {
    "average": Recipe(None, False, True),
    "task_arithmetic": Recipe(None, False, False),
    "magnitude_prune": Recipe("magnitude", False, False),
    "ties": Recipe("magnitude", True, True),
    "dare_linear": Recipe("random", False, False),
    "dare_ties": Recipe("random", True, False),
}
METHODS = tuple(RECIPES)
SIGN_METHODS = ("total", "frequency")
UNIT_LETTERS = "NE"  # slots of an adapter bank, experts of an expert bank
_SUFFIX = re.compile(r"_([A-Z]+)$")


@dataclass(frozen=True)
class MergeOptions:
    method: str
    weights: Optional[Sequence[float]] = None  # per model; default 1 each
    lam: float = 1.0  # lambda (ignored by average)
    density: float = 0.2  # fraction of each task vector's unit TIES / magnitude_prune / DARE keep
    seed: int = 0  # DARE's drop masks
    convention: str = "peft"  # peft | mergekit: whose formulas (below)
    majority_sign: str = "total"  # total | frequency: how TIES elects each entry's sign


def check_options(opts: MergeOptions, count: int) -> None:
    """ValueError naming the option (as ``moe-sys merge`` spells it) that cannot merge ``count`` inputs."""
    choices = {"method": (opts.method, METHODS), "--convention": (opts.convention, tuple(CONVENTIONS)),
               "--majority-sign": (opts.majority_sign, SIGN_METHODS)}
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{flag}: unknown {value!r}; choose from {', '.join(allowed)}")
    if not 0 < opts.density <= 1:
        raise ValueError(f"--density: {opts.density} must lie in (0, 1]")
    if opts.weights is not None and len(opts.weights) != count:
        raise ValueError(f"--weights: {len(opts.weights)} weights for {count} inputs (one per input)")


def stacked_units(key: str, shape) -> int:
    """How many leading dims of the tensor ``key`` index slots or experts (0 = one plain tensor)."""
    found = _SUFFIX.search(key.rsplit(".", 1)[-1])
    letters = found.group(1) if found else ""
    if len(letters) != len(shape):
        return 0
    lead = len(letters) - len(letters.lstrip(UNIT_LETTERS))
    return min(lead, len(shape) - 1)  # a 1-D bank (e.g. bias_E) stays one tensor


def majority_agrees(t_MUn: torch.Tensor, sign_method: str) -> torch.Tensor:
    """Where each entry's sign equals the elected sign (+1 where the total/frequency is >= 0)."""
    sign_MUn = t_MUn.sign()
    score_Un = (t_MUn if sign_method == "total" else sign_MUn).sum(0)
    return sign_MUn == torch.where(score_Un >= 0, 1.0, -1.0)


def keep_top(tau_MUn: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density * n) largest magnitudes of each unit of each task vector."""
    k = int(density * tau_MUn.shape[-1])
    keep_MUn = torch.zeros_like(tau_MUn)
    keep_MUn.scatter_(-1, tau_MUn.abs().topk(k, dim=-1).indices, 1.0)
    return tau_MUn * keep_MUn


def drop_random(tau_MUn: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's mask: each entry kept with probability density, one Bernoulli draw per model in order
    (as PEFT's ``random_pruning`` draws, so a seeded generator gives PEFT's masks)."""
    keep_MUn = torch.stack([torch.bernoulli(torch.full_like(t, density), generator=generator) for t in tau_MUn])
    return tau_MUn * keep_MUn


def l1_rescaled(masked_MUn: torch.Tensor, tau_MUn: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mergekit's ``rescaled_masked_tensor`` with the L1 norm, per unit (left alone when either norm < eps)."""
    before, after = tau_MUn.abs().sum(-1, keepdim=True), masked_MUn.abs().sum(-1, keepdim=True)
    ok = (before >= eps) & (after >= eps)
    return torch.where(ok, masked_MUn * (before / torch.where(ok, after, 1.0)), masked_MUn)


def _peft(tau_MUn, w_M1, recipe: Recipe, density: float, sign_method: str, generator) -> torch.Tensor:
    """peft.utils.merge_utils: signs from the unweighted vectors, disjoint mean over the agreeing count."""
    if recipe.sparsify == "magnitude":
        tau_MUn = keep_top(tau_MUn, density)
    elif recipe.sparsify == "random":
        tau_MUn = drop_random(tau_MUn, density, generator) / density
    weighted_MUn = tau_MUn * w_M1
    if not recipe.elect:
        return weighted_MUn.sum(0)
    agree_MUn = majority_agrees(tau_MUn, sign_method)
    return (weighted_MUn * agree_MUn).sum(0) / agree_MUn.sum(0).clamp_min(1)


def _mergekit(tau_MUn, w_M1, recipe: Recipe, density: float, sign_method: str, generator) -> torch.Tensor:
    """mergekit's GTATask.execute: signs from the weighted vectors, divided by the agreeing weights."""
    if recipe.sparsify == "magnitude":
        tau_MUn = keep_top(tau_MUn, density)
    elif recipe.sparsify == "random":
        tau_MUn = l1_rescaled(drop_random(tau_MUn, density, generator), tau_MUn)
    weighted_MUn = tau_MUn * w_M1
    if recipe.elect:
        agree_MUn = majority_agrees(weighted_MUn, sign_method)
        mixed_Un, divisor_Un = (weighted_MUn * agree_MUn).sum(0), (w_M1 * agree_MUn).sum(0)
        divisor_Un = torch.where(divisor_Un == 0, 1.0, divisor_Un)
    else:
        mixed_Un, divisor_Un = weighted_MUn.sum(0), w_M1.sum(0)
        divisor_Un = torch.where(divisor_Un.abs() < 1e-8, 1.0, divisor_Un)
    return mixed_Un / divisor_Un if recipe.mergekit_normalize else mixed_Un


CONVENTIONS: Dict[str, Callable[..., torch.Tensor]] = {"peft": _peft, "mergekit": _mergekit}


def merge_tensor(key: str, tau_M: torch.Tensor, w_M: torch.Tensor, opts: MergeOptions,
                 generator: torch.Generator) -> torch.Tensor:
    """[M, ...] task vectors of the tensor ``key`` and their weights [M] -> the merged delta [...]
    (before lambda). Density >= 1 keeps everything, as both PEFT and mergekit do."""
    units = stacked_units(key, tau_M.shape[1:])
    tau_MUn = tau_M.reshape(tau_M.shape[0], math.prod(tau_M.shape[1:1 + units]), -1)
    w_M1 = w_M.view(-1, 1, 1)
    if opts.method == "average":
        return (tau_MUn * (w_M1 / w_M.sum())).sum(0).view(tau_M.shape[1:])
    recipe = RECIPES[opts.method]
    if opts.density >= 1:
        recipe = Recipe(None, recipe.elect, recipe.mergekit_normalize)
    out_Un = CONVENTIONS[opts.convention](tau_MUn, w_M1, recipe, opts.density, opts.majority_sign, generator)
    return out_Un.view(tau_M.shape[1:])
