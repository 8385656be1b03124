"""Rank-0 progress bar: step, loss, tokens/s and tqdm's ETA."""
from __future__ import annotations

from typing import Dict


class Progress:
    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def update(self, record: Dict) -> None:
        if self.bar is None:
            return
        postfix = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
        if "val_loss" in record:
            postfix["val"] = f"{record['val_loss']:.3f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
