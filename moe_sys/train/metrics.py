"""Rank-0 metrics: one JSON object per logged step in metrics.jsonl, mirrored to TensorBoard."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional


class MetricsWriter:
    def __init__(self, run_dir: str, tensorboard: bool, resume_step: Optional[int] = None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_step is not None:
            self._truncate_after(resume_step)
        else:  # a fresh run never appends to another run's records
            open(self.path, "w").close()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records of steps the checkpoint does not contain (they will be redone)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def write(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in _flatten(record).items():
                if key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _flatten(record: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    out: Dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, (list, tuple)):
            out.update(_flatten({str(i): v for i, v in enumerate(value)}, name + "/"))
        elif isinstance(value, (int, float)):
            out[name] = float(value)
    return out
