"""The ``task`` section: which kind of problem the one training loop runs (``moe_sys/tasks``)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from moe_sys.config.section import Section


class TaskConfig(Section):
    type: Literal["lm"] = Field("lm", description="lm: next-token language modelling on data.domains")
