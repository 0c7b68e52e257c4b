"""The reward pool: M `RewardWorker` CPU actors scoring completions with every configured verifier.

A verifier that raises or exceeds `reward.timeout_s` scores 0 for that completion and is counted
in `reward/errors` / `reward/timeouts`; it never fails the job. Items are split into contiguous
shards; the workers' counts are combined by `actors.algo.metrics`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from actors.algo.metrics import combine_parts
from actors.common.config import RewardConfig
from actors.common.pool import ActorPool
from actors.reward.verifiers import build_verifier

__all__ = ["REWARD_WORKER_RESTARTS", "RewardPool", "RewardWorker"]


class RewardWorker:
    """Scores (completion, answer, prompt) triples with every configured verifier."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.verifiers = [build_verifier(v, cfg.timeout_s) for v in cfg.verifiers]
        self.timeout_s = cfg.timeout_s
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


REWARD_WORKER_RESTARTS = 3  # replacements of each reward worker per job


class RewardPool:
    """M RewardWorker actors; items are split into contiguous shards."""

    def __init__(self, cfg: RewardConfig) -> None:
        # verifiers are light: no CPU reserved, so they never starve the rollout engines or learners
        # a worker that dies (a verifier crashed it, its node went) is replaced and its shard scored again
        # there: scoring is a pure function of the batch, so the step is neither lost nor counted twice
        self.pool = ActorPool(
            RewardWorker, cfg.num_workers, lambda i: (cfg,), num_cpus=0, resources=cfg.ray_resources,
            restarts=REWARD_WORKER_RESTARTS,
        )  # fmt: skip

    def score(self, items: list[tuple[str, str, Any]]) -> tuple[list[float], dict[str, float]]:
        parts = self.pool.sharded(items, lambda w, part: w.score.remote(part))
        rewards = [r for part, _ in parts for r in part]
        metrics = combine_parts([{"reward/errors": 0.0, "reward/timeouts": 0.0}] + [m for _, m in parts])
        return rewards, metrics
