"""Reading a `JobConfig`: YAML files, `--set` overrides and validation errors that name the field,
the value and what is accepted. Imports pydantic and yaml only, like the schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from actors.common.config import JobConfig

__all__ = [
    "UNION_TAGS",
    "ConfigError",
    "apply_overrides",
    "format_validation_error",
    "load_config",
    "show_value",
    "validate_config",
]


class ConfigError(ValueError):
    """A config that does not validate; the message names each field, value and what is accepted."""


def show_value(value: Any, limit: int = 80) -> str:
    """A short, printable form of a refused input for an error message: containers are not spelled
    out (they may be huge or nested hundreds deep), strings are escaped to ASCII (a lone surrogate
    must not break the answer that names it)."""
    if isinstance(value, dict):
        return "{...}"
    if isinstance(value, list | tuple):
        return "[...]"
    shown = repr(value)
    if isinstance(value, str | bytes):
        shown = shown.encode("ascii", "backslashreplace").decode()
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in UNION_TAGS))
        where = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or "config")
        shown = show_value(e.get("input"))
        msg = e["msg"]
        if e["type"] == "union_tag_invalid":
            where, shown = f"{where}.type", repr(e["ctx"]["tag"])
            msg = f"unknown type; accepted: {e['ctx']['expected_tags']}"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field (not part of JobConfig; check the spelling)"
        elif e["type"] == "missing":
            msg = "field required"
            lines.append(f"{where}: {msg}")
            continue
        lines.append(f"{where} = {shown}: {msg}")
    return "\n".join(lines)


UNION_TAGS = {"builtin", "jsonl", "parquet", "math", "numeric", "regex", "plugin", "code"}


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML scalars) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example trainer.steps=3")
        key, _, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
            node = nxt
        node[parts[-1]] = _parse_scalar(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a YAML file (or defaults), apply overrides, validate. Raises ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    return validate_config(data, overrides)


def validate_config(data: dict[str, Any], overrides: list[str] | None = None) -> JobConfig:
    """Validate a mapping (a parsed YAML/JSON config) after applying overrides. Raises ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
