"""The ``affinity`` spec of a multitask run: how often task affinity is measured (TAG's lookahead and
the gradient cosine on the shared parameters; moe_sys/analysis/affinity.py, docs/multitask.md)."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from moe_sys.config.section import Section


class AffinitySpec(Section):
    every: int = Field(0, ge=0, description="measure TAG lookahead + gradient-cosine affinity every N steps; 0 = off")
    lr: Optional[float] = Field(None, gt=0, description="lookahead step size; None = the optimizer's lr")
