"""The base of every config section, in a module of its own so that sections kept outside schema.py
(``moe_sys.config.adapters``, which schema.py imports) can share it without an import cycle.

Class-wide rules, so no field can forget them: strict types (``true`` is not an integer, ``"8"`` is
not a number; an integer is still a valid float), no inf/NaN, and every integer fits in int64 (the
tensors and numpy arrays it ends up in). Per-field bounds sit on the fields.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from typing_extensions import Annotated

INT64_MAX = 2**63 - 1

# numpy and megatron-core seed their generators with unsigned 32-bit integers.
Seed = Annotated[int, Field(ge=0, lt=2**32, description="random seed in [0, 2^32)")]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _fits_int64(cls, value: Any) -> Any:
        if _too_big(value):
            raise ValueError("integers must lie in [-2^63, 2^63)")
        return value


def _too_big(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return not -INT64_MAX - 1 <= value <= INT64_MAX
    if isinstance(value, (list, tuple)):
        return any(_too_big(v) for v in value)
    if isinstance(value, dict):
        return any(_too_big(v) for v in value.values())
    return False
