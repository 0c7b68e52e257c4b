"""What every section of `JobConfig` shares: strict models and the bounds that keep a config startable."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["KEY_LEN", "MAX_SEED", "PATH_LEN", "Resources", "StrictModel"]


class StrictModel(BaseModel):
    # NaN and infinities are refused in every float field: they would reach the driver (or break JSON)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Bounds that keep an accepted config startable: the service hands it to the driver in one
# environment variable (Linux caps one at 128 KiB; service.core refuses a config over MAX_CONFIG_BYTES).
PATH_LEN = 4096
KEY_LEN = 256
MAX_SEED = 2**31 - 1
Resources = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=64)], Annotated[float, Field(ge=0, le=1e6)]],
    Field(max_length=16),
]
