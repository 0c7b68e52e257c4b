"""Reward verifiers and the reward pool (CPU Ray actors).

Built in: `numeric` (the last number of the completion against the answer), `math`
(math-verify's parse + verify, LaTeX and expressions), `regex` (format checks) and `plugin`
(a user function given as module:function). The reward of a completion is the weighted sum.
A verifier that raises or exceeds `reward.timeout_s` scores 0 for that completion and is counted
in `reward/errors` / `reward/timeouts`; it never fails the job.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

__all__ = ["RewardWorker", "RewardPool", "build_verifiers", "last_number"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _numeric(tolerance: float) -> Callable[[str, str, Any], float]:
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


def _regex(pattern: str) -> Callable[[str, str, Any], float]:
    rx = re.compile(pattern)
    return lambda completion, answer, prompt: float(rx.search(completion) is not None)


def _plugin(path: str) -> Callable[[str, str, Any], float]:
    module, _, name = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward.verifiers[].function={path!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward.verifiers[].function={path!r} is not callable")
    return fn


def build_verifiers(specs: list[dict[str, Any]]) -> list[tuple[str, float, Callable[[str, str, Any], float]]]:
    out: list[tuple[str, float, Callable[[str, str, Any], float]]] = []
    for s in specs:
        kind = s["type"]
        if kind == "numeric":
            out.append((kind, s["weight"], _numeric(s["tolerance"])))
        elif kind == "math":
            out.append((kind, s["weight"], _math))
        elif kind == "regex":
            out.append((kind, s["weight"], _regex(s["pattern"])))
        elif kind == "plugin":
            out.append((s["function"], s["weight"], _plugin(s["function"])))
        else:
            raise ValueError(f"reward verifier type {kind!r} is not one of: numeric, math, regex, plugin")
    return out


class RewardWorker:
    """Scores (completion, answer, prompt) triples with every configured verifier."""

    def __init__(self, verifiers: list[dict[str, Any]], timeout_s: float) -> None:
        self.verifiers = build_verifiers(verifiers)
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="verifier")

    def score(self, items: list[tuple[str, str, Any]]) -> tuple[list[float], dict[str, float]]:
        rewards, errors, timeouts = [], 0, 0
        for completion, answer, prompt in items:
            total = 0.0
            for _name, weight, fn in self.verifiers:
                fut = self._pool.submit(fn, completion, answer, prompt)
                try:
                    total += weight * float(fut.result(timeout=self.timeout_s))
                except FutureTimeout:
                    timeouts += 1  # the thread is abandoned; the completion scores 0 for this verifier
                except Exception:  # noqa: BLE001 - a user verifier's failure must not fail the job
                    errors += 1
            rewards.append(total)
        return rewards, {"reward/errors": float(errors), "reward/timeouts": float(timeouts)}

    def ready(self) -> bool:
        return True


class RewardPool:
    """M RewardWorker actors; items are split into contiguous shards."""

    def __init__(
        self,
        verifiers: list[dict[str, Any]],
        num_workers: int,
        timeout_s: float,
        resources: dict[str, float] | None = None,
    ) -> None:
        import ray

        cls = ray.remote(num_cpus=0, resources=resources or None)(
            RewardWorker
        )  # verifiers are light; don't starve rollout/learners
        self.workers = [cls.remote(verifiers, timeout_s) for _ in range(num_workers)]
        ray.get([w.ready.remote() for w in self.workers])

    def score(self, items: list[tuple[str, str, Any]]) -> tuple[list[float], dict[str, float]]:
        import ray

        k = len(self.workers)
        size = -(-len(items) // k)
        refs = [
            w.score.remote(items[i * size : (i + 1) * size]) for i, w in enumerate(self.workers) if items[i * size :]
        ]
        rewards: list[float] = []
        metrics = {"reward/errors": 0.0, "reward/timeouts": 0.0}
        for part, m in ray.get(refs):
            rewards.extend(part)
            for key, v in m.items():
                metrics[key] += v
        return rewards, metrics
