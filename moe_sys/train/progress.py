"""Rank-0 progress bar: step, loss, throughput, the latest evaluation and tqdm's ETA."""
from __future__ import annotations

from typing import Dict, Optional, Tuple


class Progress:
    def __init__(self, total: int, start: int, enabled: bool, throughput: Tuple[str, str] = ("tokens_per_s", "tok/s"),
                 eval_keys: Optional[Dict[str, str]] = None):
        """throughput: (the record's units-per-second key, its label); eval_keys: record key -> short
        label of the evaluation entries to show (the task decides both)."""
        self.bar = None
        self.throughput_key, self.label = throughput
        self.eval_keys = eval_keys if eval_keys is not None else {"val_loss": "val"}
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def update(self, record: Dict) -> None:
        if self.bar is None:
            return
        postfix = {"loss": f"{record['loss']:.3f}", self.label: f"{record[self.throughput_key]:.0f}"}
        for key, label in self.eval_keys.items():
            if key in record:
                postfix[label] = f"{record[key]:.3f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
