"""What every section of `JobConfig` shares: strict models and the bounds that keep a config startable."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

__all__ = ["CpuCores", "KEY_LEN", "MAX_SEED", "NoNul", "PATH_LEN", "Resources", "StrictModel", "parse_cores"]


class StrictModel(BaseModel):
    # NaN and infinities are refused in every float field: they would reach the driver (or break JSON)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Bounds that keep an accepted config startable: the service hands it to the driver in one
# environment variable (Linux caps one at 128 KiB; service.core refuses a config over MAX_CONFIG_BYTES).
PATH_LEN = 4096
KEY_LEN = 256
MAX_SEED = 2**31 - 1


def _no_nul(path: str) -> str:
    if "\x00" in path:  # no file system has such a name, and os calls raise on it
        raise ValueError("a path cannot hold a NUL byte (\\x00)")
    return path


NoNul = AfterValidator(_no_nul)
Resources = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=64)], Annotated[float, Field(ge=0, le=1e6)]],
    Field(max_length=16),
]


# a CPU list as Linux writes one ("0", "0-3", "0,2-3"): where a pool's threads run
def _core_list(v: object) -> object:  # YAML reads a single core ("0") as a number
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


CPU_LIST = r"^\d{1,4}(-\d{1,4})?(,\d{1,4}(-\d{1,4})?){0,63}$"
CpuCores = Annotated[str, BeforeValidator(_core_list), Field(pattern=CPU_LIST, max_length=400)]


def parse_cores(cores: str) -> list[int]:
    """The cores of a CPU list: "0,2-3" -> [0, 2, 3]."""
    out: list[int] = []
    for part in cores.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return sorted(set(out))
