"""The base of every config section, in a module of its own so that sections kept outside schema.py
(``moe_sys.config.adapters``, which schema.py imports) can share it without an import cycle."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
