"""The shapes every wire model is built from: the strict base model and a SHA-256.

Split from `protocol.models` so that its topic modules (`protocol.output`) can share
them without importing each other. Data shapes only: no I/O.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

SHA256_PATTERN = r"^[0-9a-f]{64}$"

Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN, description="lower-case hex SHA-256")]


class Strict(BaseModel):
    """Every wire model: unknown fields are errors, and no float may be NaN or infinite
    (a non-finite number cannot be stored as JSON and read back, nor priced)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
