"""Reward verifiers: each turns (completion, answer, prompt) into a score.

Built in: `numeric` (the last number of the completion against the answer), `math`
(math-verify's parse + verify, LaTeX and expressions), `regex` (format checks), `code` (the
completion's Python program run against the answer's tests in a bubblewrap sandbox,
actors/reward/sandbox.py) and `plugin` (a user function given as module:function, which the control
plane's tenancy policy gates). The reward of a completion is the weighted sum (`actors.reward.pool.RewardWorker`).
"""

from __future__ import annotations

import ast
import importlib
import json
import re
from collections.abc import Callable
from typing import Any

from actors.common.verifier_config import (
    CodeVerifier,
    MathVerifier,
    NumericVerifier,
    PluginVerifier,
    RegexVerifier,
    Verifier,
)
from actors.reward.sandbox import SandboxLimits, check_sandbox, run_python

__all__ = ["Score", "build_verifier", "extract_program", "io_cases", "last_number"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _numeric(tolerance: float) -> Score:
    def score(completion: str, answer: str, prompt: Any) -> float:
        got, want = last_number(completion), last_number(answer)
        return float(got is not None and want is not None and abs(got - want) <= tolerance)

    return score


def _math(completion: str, answer: str, prompt: Any) -> float:
    from math_verify import parse, verify

    # math-verify's own timeouts use SIGALRM, which only works on the main thread; the worker's
    # thread-level timeout (reward.timeout_s) bounds it instead
    gold = parse(answer if "$" in answer or "\\" in answer else f"${answer}$", parsing_timeout=None)
    return float(verify(gold, parse(completion, parsing_timeout=None), timeout_seconds=None))


def _regex(pattern: str) -> Score:
    rx = re.compile(pattern)
    return lambda completion, answer, prompt: float(rx.search(completion) is not None)


def load_plugin(path: str, field: str) -> Callable[..., Any]:
    """The function at `module:name` (a plugin verifier or environment); ValueError naming `field`."""
    module, _, name = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{field}={path!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ValueError(f"{field}={path!r} is not callable")
    return fn  # type: ignore[no-any-return]


def _plugin(path: str) -> Score:
    score: Score = load_plugin(path, "reward.verifiers[].function")
    return score


_FENCED = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_program(completion: str) -> str:
    """The last fenced code block of a completion (```python ... ```), else the whole completion."""
    blocks = _FENCED.findall(completion)
    return blocks[-1] if blocks else completion


def io_cases(answer: str) -> list[tuple[str, str]] | None:
    """An answer that is a list of {"input": ..., "output": ...} (JSON or a Python literal) as
    (stdin, expected stdout) pairs; None when the answer is test code instead."""
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(answer)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if (
            isinstance(value, list)
            and value
            and all(isinstance(c, dict) and "input" in c and "output" in c for c in value)
        ):
            return [(str(c["input"]), str(c["output"])) for c in value]
    return None


def _code(spec: CodeVerifier, wall_s: float) -> Score:
    """Score 1 when the program passes: the answer's test code (asserts, run after the program in the
    same file) exits 0, or - for an answer of input/output cases - the share of cases whose stdout
    matches (whitespace-trimmed). Anything else (error, limit, timeout) scores 0."""
    limits = SandboxLimits(
        wall_s=wall_s, cpu_s=spec.cpu_s, memory_mb=spec.memory_mb, max_processes=spec.max_processes,
        max_output_bytes=spec.max_output_bytes, max_file_bytes=spec.max_file_bytes,
    )  # fmt: skip

    def score(completion: str, answer: str, prompt: Any) -> float:
        program = extract_program(completion)
        cases = io_cases(answer)
        if cases is None:
            return float(run_python(f"{program}\n\n{answer}\n", limits).ok)
        passed = 0
        for stdin, expected in cases:
            result = run_python(program, limits, stdin)
            passed += result.ok and result.output.strip() == expected.strip()
        return passed / len(cases)

    return score


Score = Callable[[str, str, Any], float]


def build_verifier(spec: Verifier, timeout_s: float = 5.0) -> tuple[str, float, Score]:
    """(name, weight, score function) of one configured verifier; `timeout_s` is the wall-clock limit of
    one program run of the code verifier (reward.timeout_s)."""
    match spec:
        case NumericVerifier():
            return spec.type, spec.weight, _numeric(spec.tolerance)
        case MathVerifier():
            return spec.type, spec.weight, _math
        case RegexVerifier():
            return spec.type, spec.weight, _regex(spec.pattern)
        case PluginVerifier():
            return spec.function, spec.weight, _plugin(spec.function)
        case CodeVerifier():
            check_sandbox()  # a worker that cannot sandbox fails at start, naming why, instead of scoring 0
            return spec.type, spec.weight, _code(spec, timeout_s)
    raise TypeError(f"reward verifier {spec!r} is not one of the types of actors.common.config.Verifier")
