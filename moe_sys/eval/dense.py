"""Dense-prediction metrics of the multitask task and the multitask score Delta_m.

Each metric is a ratio of sums (``DenseMeter`` adds the sums of every batch, then of every rank with one
all_reduce), so a distributed evaluation equals the evaluation of all samples on one device.

  S/miou        mean over classes with a non-empty union of |pred = c and target = c| / |pred = c or target = c|
  D/rmse        sqrt(mean over all pixels of (pred - target)^2)
  D/abs_rel     mean over pixels with target > 0 of |pred - target| / target (undefined where the height is 0)
  N/mean_angle  mean over pixels of the angle between pred and target normals, in degrees
  E/l1          mean over pixels of |pred - target|
  G/acc         fraction of samples whose argmax is the label

  Delta_m = mean over metrics i of (-1)^{l_i} (M_i - M_single_i) / M_single_i * 100, l_i = 1 where lower
  is better (Maninis et al. 2019, as VTAGML reports it): > 0 means better than the single-task models.

Legend: B samples, C classes, H, W pixels.
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOWER_IS_BETTER = {"S/miou": False, "D/rmse": True, "D/abs_rel": True, "N/mean_angle": True, "E/l1": True,
                   "G/acc": False}
PRIMARY = {"S": "S/miou", "D": "D/rmse", "N": "N/mean_angle", "E": "E/l1", "G": "G/acc"}  # Delta_m's metric per task


def confusion(pred_BHW: torch.Tensor, target_BHW: torch.Tensor, classes: int) -> torch.Tensor:
    """[C, C] counts, rows = target class, columns = predicted class."""
    index = target_BHW.reshape(-1) * classes + pred_BHW.reshape(-1)
    return torch.bincount(index, minlength=classes * classes).reshape(classes, classes)


def miou(confusion_CC: torch.Tensor) -> float:
    tp_C = confusion_CC.diag().double()
    union_C = confusion_CC.sum(0).double() + confusion_CC.sum(1).double() - tp_C
    present = union_C > 0
    return float((tp_C[present] / union_C[present]).mean()) if present.any() else float("nan")


def angles_deg(pred_B3HW: torch.Tensor, target_B3HW: torch.Tensor) -> torch.Tensor:
    """Angle [B, H, W] in degrees between the (normalised) predicted normals and the unit targets."""
    cos = F.cosine_similarity(pred_B3HW.double(), target_B3HW.double(), dim=1, eps=1e-12)
    return torch.rad2deg(torch.acos(cos.clamp(-1, 1)))


class DenseMeter:
    """Sums of one evaluation; ``add_<task>`` per batch, ``result()`` once (a collective when distributed)."""

    def __init__(self, seg_classes: int = 0):
        self.seg_classes = seg_classes
        self.sums: Dict[str, torch.Tensor] = {}

    def _add(self, **values) -> None:
        for key, value in values.items():
            value = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
            self.sums[key] = self.sums.get(key, 0) + value

    def add_S(self, logits_BCHW, target_BHW):
        self._add(confusion=confusion(logits_BCHW.argmax(1), target_BHW, self.seg_classes))

    def add_D(self, pred_B1HW, target_BHW):
        err_BHW = pred_B1HW[:, 0].double() - target_BHW.double()
        valid = target_BHW > 0
        self._add(d_sq=(err_BHW ** 2).sum(), d_n=err_BHW.numel(),
                  d_rel=(err_BHW.abs()[valid] / target_BHW.double()[valid]).sum(), d_valid=valid.sum())

    def add_N(self, pred_B3HW, target_B3HW):
        a = angles_deg(pred_B3HW, target_B3HW)
        self._add(n_angle=a.sum(), n_n=a.numel())

    def add_E(self, pred_B1HW, target_BHW):
        self._add(e_abs=(pred_B1HW[:, 0].double() - target_BHW.double()).abs().sum(), e_n=target_BHW.numel())

    def add_G(self, logits_BC, target_B):
        self._add(g_correct=(logits_BC.argmax(1) == target_B).sum(), g_n=target_B.numel())

    def result(self, device=None) -> Dict[str, float]:
        """Metrics of every task that got samples; all ranks (in a process group) return the same.
        device: where the all_reduce runs (the backend's device: the GPU for NCCL)."""
        keys = sorted(self.sums)
        if dist.is_initialized():
            flat = torch.cat([self.sums[k].reshape(-1) for k in keys]).to(device)
            dist.all_reduce(flat)
            flat = flat.cpu()
            sizes = [self.sums[k].numel() for k in keys]
            self.sums = {k: v.reshape(self.sums[k].shape) for k, v in zip(keys, flat.split(sizes))}
        s, out = self.sums, {}
        if "confusion" in s:
            out["S/miou"] = miou(s["confusion"])
        if "d_n" in s:
            out["D/rmse"] = float((s["d_sq"] / s["d_n"]).sqrt())
            out["D/abs_rel"] = float(s["d_rel"] / s["d_valid"]) if s["d_valid"] > 0 else float("nan")
        if "n_n" in s:
            out["N/mean_angle"] = float(s["n_angle"] / s["n_n"])
        if "e_n" in s:
            out["E/l1"] = float(s["e_abs"] / s["e_n"])
        if "g_n" in s:
            out["G/acc"] = float(s["g_correct"] / s["g_n"])
        return out


def delta_m(metrics: Dict[str, float], baseline: Dict[str, float], keys: Iterable[str]) -> float:
    """Delta_m (module docstring) over ``keys``, each in both ``metrics`` and ``baseline``."""
    terms = [(-1 if LOWER_IS_BETTER[k] else 1) * (metrics[k] - baseline[k]) / baseline[k] * 100 for k in keys]
    return sum(terms) / len(terms)
