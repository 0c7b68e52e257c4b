"""Config checks: a JobConfig as YAML is validated as POST /v1/jobs would take it, and each refused
field comes back with its line in the YAML (the dashboard shows the error beside it). Both read their
input within actors.common.config_load's bounds (depth, keys and values, errors reported), so a
refusal costs milliseconds and no request here runs long enough to need cancelling when its client
goes away."""

from __future__ import annotations

import json

import yaml
from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from actors.common.config import JobConfig
from actors.common.config_load import UNION_TAGS, InputRefused, cap_errors, check_shape, read_yaml
from service.core import ConfigTooLarge
from service.deps import Principal, ServiceDep
from service.policy import PolicyRefused
from service.quotas import LimitExceeded
from service.schemas import ConfigCheck, ConfigText, FieldError, field_errors

router = APIRouter(prefix="/v1/configs", tags=["configs"])


def yaml_line(root: yaml.Node | None, loc: list[str | int]) -> int | None:
    """The 1-based line of the deepest node of `loc` found in the composed YAML (a missing field: its
    parent's line; a union tag in pydantic's loc is not a YAML key and is passed over)."""
    node, line = root, None
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            hit = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part), None)
            if hit is None:
                if part in UNION_TAGS:
                    continue
                break
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _refused(field: str, msg: str, kind: str, root: yaml.Node | None, value: str = "") -> FieldError:
    loc: list[str | int] = [int(p) if p.isdigit() else p for p in field.split(".")] if field else []
    return FieldError(loc=loc, field=field or "config", msg=msg, type=kind, input=value, line=yaml_line(root, loc))


def strict_config(body: bytes) -> JobConfig:
    """POST /v1/jobs's body as a JobConfig: its shape bounded (depth, keys and values) before pydantic reads
    it, then read strictly (no "20" for 20). RequestValidationError (422) naming the bound and the value,
    or at most MAX_REPORTED_ERRORS of pydantic's errors and their count."""
    try:
        check_shape(json.loads(body))
    except InputRefused as e:
        raise RequestValidationError([{"loc": ("body",), "msg": str(e), "type": e.kind, "input": e.value}]) from None
    except (ValueError, RecursionError):  # not JSON: pydantic says where
        pass
    try:
        return JobConfig.model_validate_json(body, strict=True)
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in cap_errors(e.errors())]
        ) from None


@router.post("/validate", response_model=ConfigCheck)
def validate(body: ConfigText, who: Principal, svc: ServiceDep) -> ConfigCheck:
    """Check a JobConfig given as YAML: parsed safely within bounds (depth, keys and values; no aliases),
    validated strictly (as POST /v1/jobs does) and against the operator's tenancy policy for the caller.
    Always 200: `valid`, the errors with their YAML lines, and the validated config as JSON."""
    try:
        root, data = read_yaml(body.yaml, aliases=False)
    except InputRefused as e:
        err = FieldError(loc=[], field="yaml", msg=str(e), type=e.kind, input="", line=e.line)
        return ConfigCheck(valid=False, errors=[err])
    if data is None:
        data = {}
    if not isinstance(data, dict):
        err = _refused("", f"a JobConfig is a mapping of sections, not a {type(data).__name__}", "type", root)
        return ConfigCheck(valid=False, errors=[err])
    try:
        text = json.dumps(data, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:  # dates, NaN, .inf: YAML has them, a JSON API does not
        return ConfigCheck(valid=False, errors=[_refused("", f"not representable as JSON: {e}", "json", root)])
    try:
        cfg = JobConfig.model_validate_json(text, strict=True)
    except ValidationError as e:
        errors = field_errors(cap_errors(e.errors()), body=False)  # the last one may count the rest
        for err in errors:
            err.line = yaml_line(root, err.loc)
        return ConfigCheck(valid=False, errors=errors)
    try:
        svc.admit(cfg, who, spend=False)  # a check: no job counted, none of the submission rate taken
    except PolicyRefused as e:
        return ConfigCheck(valid=False, errors=[_refused(e.field, str(e), "policy", root)])
    except ConfigTooLarge as e:
        return ConfigCheck(valid=False, errors=[_refused("", str(e), "size", root)])
    except LimitExceeded as e:
        return ConfigCheck(valid=False, errors=[_refused("", str(e), "limit", root)])
    return ConfigCheck(valid=True, errors=[], config=cfg.model_dump(mode="json"))
