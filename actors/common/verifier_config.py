"""The reward verifiers' sections of `JobConfig`: a discriminated union on `type`."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from actors.common.config_base import StrictModel

__all__ = [
    "CodeVerifier",
    "MathVerifier",
    "NumericVerifier",
    "PluginVerifier",
    "RegexVerifier",
    "Verifier",
    "default_verifiers",
]


def _weight() -> Any:
    return Field(1.0, ge=-1e6, le=1e6, description="Weight of this verifier's reward.")


class MathVerifier(StrictModel):
    type: Literal["math"] = "math"
    weight: float = _weight()


class NumericVerifier(StrictModel):
    type: Literal["numeric"] = "numeric"
    weight: float = _weight()
    tolerance: float = Field(
        1e-6, ge=0, le=1e12, description="Absolute tolerance on the last number of the completion."
    )


class RegexVerifier(StrictModel):
    type: Literal["regex"] = "regex"
    weight: float = _weight()
    pattern: str = Field(
        ..., min_length=1, max_length=1024, description="Reward 1 when the completion matches (re.search)."
    )

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        return v


class PluginVerifier(StrictModel):
    type: Literal["plugin"] = "plugin"
    weight: float = _weight()
    function: str = Field(
        ...,
        max_length=256,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="Import path module:function, called as f(completion, answer, prompt) -> float. The "
        "control plane's tenancy policy decides which functions non-admin owners may name.",
    )


class CodeVerifier(StrictModel):
    type: Literal["code"] = "code"
    weight: float = _weight()
    cpu_s: float = Field(5, gt=0, le=600, description="CPU-time limit of one run of the program (RLIMIT_CPU).")
    memory_mb: int = Field(512, ge=64, le=65536, description="Address-space limit of the program (RLIMIT_AS).")
    max_processes: int = Field(
        32, ge=1, le=4096, description="Processes and threads the sandbox user may have at once (RLIMIT_NPROC)."
    )
    max_output_bytes: int = Field(
        65536, ge=1024, le=64 << 20, description="stdout+stderr kept; more kills the program (scores 0)."
    )
    max_file_bytes: int = Field(
        1 << 20, ge=0, le=1 << 30, description="Largest file the program may write in its scratch dir (RLIMIT_FSIZE)."
    )


Verifier = Annotated[
    MathVerifier | NumericVerifier | RegexVerifier | PluginVerifier | CodeVerifier, Field(discriminator="type")
]


def default_verifiers() -> list[Verifier]:
    return [NumericVerifier.model_validate({})]
