"""Reading a `JobConfig`: YAML files, `--set` overrides and validation errors that name the field,
the value and what is accepted. Imports pydantic and yaml only, like the schema.

Config text is bounded before it costs anything: depth, keys and values (aliases counted as what they
repeat) and file size, checked while the YAML is parsed - before a node is built - or over parsed JSON,
so a refusal costs milliseconds; and at most MAX_REPORTED_ERRORS validation errors are spelled out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from actors.common.config import JobConfig

__all__ = [
    "MAX_CONFIG_DEPTH",
    "MAX_CONFIG_FILE_BYTES",
    "MAX_CONFIG_NODES",
    "MAX_REPORTED_ERRORS",
    "UNION_TAGS",
    "ConfigError",
    "InputRefused",
    "apply_overrides",
    "cap_errors",
    "check_shape",
    "format_validation_error",
    "load_config",
    "read_yaml",
    "show_value",
    "validate_config",
]

# Collections open at once: a JobConfig nests 5 at most; the bound keeps every recursive reader
# (PyYAML's composer and constructor, json, pydantic) far from Python's recursion limit.
MAX_CONFIG_DEPTH = 64
# Keys and values, an alias counted as the nodes it repeats: a JobConfig has about 200, under 1,000 with
# every list at its bound; 10,000 keep parsing and validation in milliseconds.
MAX_CONFIG_NODES = 10_000
MAX_CONFIG_FILE_BYTES = 1 << 20  # a YAML file given to the CLI or the driver (the API takes 96 KiB)
MAX_REPORTED_ERRORS = 50  # validation errors spelled out for one config; the rest are counted

# libyaml where PyYAML was built with it: the pure-Python parser is quadratic in flow nesting
_LOADER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader


class ConfigError(ValueError):
    """A config that does not validate; the message names each field, value and what is accepted."""


class InputRefused(ConfigError):
    """Config text that is not read: over a bound (kind "limit": `value` is what was counted), or not valid
    YAML, or an alias where none is accepted (kind "yaml"). `line` is 1-based, or None."""

    def __init__(self, msg: str, kind: str = "yaml", line: int | None = None, value: int | None = None) -> None:
        super().__init__(msg)
        self.kind, self.line, self.value = kind, line, value


def _too_deep(depth: int, line: int | None = None) -> InputRefused:
    msg = f"nested {depth} levels deep or more: over the limit of {MAX_CONFIG_DEPTH} levels (a JobConfig nests 5)"
    return InputRefused(msg, "limit", line, depth)


def _too_many(nodes: int, line: int | None = None) -> InputRefused:
    msg = (
        f"{nodes} keys and values or more: over the limit of {MAX_CONFIG_NODES} (a JobConfig has a few "
        "hundred; an alias counts the nodes it repeats)"
    )
    return InputRefused(msg, "limit", line, nodes)


def cap_errors(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """At most MAX_REPORTED_ERRORS of pydantic's errors, then one (type "too_many_errors") that counts them
    all: 9,000 unknown keys are not worth 9,000 lines of answer. Capped errors pass through unchanged."""
    if len(errors) == MAX_REPORTED_ERRORS + 1 and errors[-1].get("type") == "too_many_errors":
        return [dict(e) for e in errors]
    shown = [dict(e) for e in errors[:MAX_REPORTED_ERRORS]]
    if len(errors) > MAX_REPORTED_ERRORS:
        msg = f"{len(errors)} errors in all; only the first {MAX_REPORTED_ERRORS} are reported"
        shown.append({"loc": (), "msg": msg, "type": "too_many_errors", "input": len(errors)})
    return shown


def _line(mark: object) -> int | None:
    """The 1-based line of a PyYAML or libyaml mark, or None."""
    line = getattr(mark, "line", None)
    return line + 1 if isinstance(line, int) else None


def _scan(text: str, aliases: bool) -> None:
    """Count the parse events, before any node is built: open collections (depth) and nodes, an alias
    adding the size of its anchor (a few KiB of nested aliases would otherwise expand to gigabytes)."""
    nodes = 0
    sizes: dict[str, int] = {}  # anchor -> nodes it stands for
    open_: list[tuple[str | None, int]] = []  # the open collections: anchor, node count at their start
    for ev in yaml.parse(text, Loader=_LOADER):
        if isinstance(ev, yaml.AliasEvent):
            if not aliases:
                msg = "YAML aliases (*name) are not accepted here; write the values out"
                raise InputRefused(msg, "yaml", _line(ev.start_mark))
            nodes += sizes.get(ev.anchor or "", 1)
        elif isinstance(ev, yaml.ScalarEvent):
            nodes += 1
            if ev.anchor:
                sizes[ev.anchor] = 1
        elif isinstance(ev, yaml.CollectionStartEvent):
            nodes += 1
            open_.append((ev.anchor, nodes))
            if len(open_) > MAX_CONFIG_DEPTH:
                raise _too_deep(len(open_), _line(ev.start_mark))
        elif isinstance(ev, yaml.CollectionEndEvent):
            anchor, start = open_.pop()
            if anchor:
                sizes[anchor] = nodes - start + 1
        if nodes > MAX_CONFIG_NODES:
            raise _too_many(nodes, _line(ev.start_mark))


def read_yaml(text: str, aliases: bool = True) -> tuple[yaml.Node | None, Any]:
    """One YAML document, read within the bounds: its parse events are counted first (a refusal stops the
    parser there), then it is composed and constructed, with libyaml where installed. Returns the root node
    (for line numbers) and the data; raises InputRefused."""
    try:
        _scan(text, aliases)
        root = yaml.compose(text, Loader=_LOADER)
        return root, None if root is None else yaml.constructor.SafeConstructor().construct_document(root)
    except InputRefused:
        raise
    except yaml.YAMLError as e:
        problem, line = getattr(e, "problem", None) or str(e), _line(getattr(e, "problem_mark", None))
        if problem == "exceeded maximum nesting depth":  # libyaml's own (1,000 levels): its scanner reads ahead
            raise _too_deep(MAX_CONFIG_DEPTH + 1, line) from None
        raise InputRefused(f"not valid YAML: {problem}", "yaml", line) from None
    except ValueError as e:  # int() of over 4,300 digits; a lone surrogate libyaml cannot encode
        raise InputRefused(f"not valid YAML: {str(e).split('; use')[0]}") from None


def check_shape(data: Any) -> None:
    """Raise InputRefused if parsed data (JSON) nests deeper than MAX_CONFIG_DEPTH or holds more than
    MAX_CONFIG_NODES keys and values; children are counted before they are visited, so it stops early."""
    nodes, stack = 1, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = list(value.values())
            nodes += 2 * len(children)
        elif isinstance(value, list):
            children, nodes = value, nodes + len(value)
        else:
            continue
        if depth > MAX_CONFIG_DEPTH:
            raise _too_deep(depth)
        if nodes > MAX_CONFIG_NODES:
            raise _too_many(nodes)
        stack.extend((child, depth + 1) for child in children)


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
    for e in cap_errors(err.errors()):
        if e["type"] == "too_many_errors":
            lines.append(e["msg"])
            continue
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
        size = p.stat().st_size
        if size > MAX_CONFIG_FILE_BYTES:
            raise ConfigError(f"config file {str(p)!r} is {size} bytes: over the limit of {MAX_CONFIG_FILE_BYTES}")
        try:
            _, loaded = read_yaml(p.read_text(encoding="utf-8"))
        except InputRefused as e:
            where = f", line {e.line}" if e.line is not None else ""
            raise ConfigError(f"config file {str(p)!r}{where}: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not UTF-8 text: {e}") from None
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
