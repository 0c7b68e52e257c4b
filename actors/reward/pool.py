"""The reward pool: M `RewardWorker` CPU actors scoring completions with every configured verifier,
and answering multi-turn episodes' tool calls with the configured environment (`environment`).

A verifier that raises or exceeds `reward.timeout_s` scores 0 for that completion and is counted
in `reward/errors` / `reward/timeouts`; it never fails the job. An environment step that raises or
exceeds `environment.timeout_s` answers with an error the model sees (`ok=False`), counted as a
tool error or timeout. Items are split into contiguous shards; the workers' counts are combined by
`actors.algo.metrics`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from actors.algo.metrics import combine_parts
from actors.common.config import RewardConfig
from actors.common.env_config import EnvironmentConfig
from actors.common.episode import EpisodeState, Observation
from actors.common.pool import ActorPool
from actors.reward.verifiers import build_verifier

__all__ = ["REWARD_WORKER_RESTARTS", "RewardPool", "RewardWorker"]


class RewardWorker:
    """Scores (completion, answer, prompt) triples with every configured verifier."""

    def __init__(self, cfg: RewardConfig, env: EnvironmentConfig | None = None) -> None:
        from actors.reward.environments import build_environment

        self.verifiers = [build_verifier(v, cfg.timeout_s) for v in cfg.verifiers]
        self.timeout_s = cfg.timeout_s
        self.env_cfg = env
        self.env = None if env is None else build_environment(env)
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

    def env_step(self, states: list[EpisodeState]) -> list[Observation]:
        """The environment's answer to each episode's last action, in order."""
        if self.env is None or self.env_cfg is None:
            raise RuntimeError("this reward worker has no environment (the job's config has no `environment`)")
        # the python tool's sandbox stops the program at timeout_s itself; the margin covers its start and exit
        limit = self.env_cfg.timeout_s + 2.0
        futures = [self._pool.submit(self.env, state) for state in states]
        out = []
        for fut in futures:
            try:
                obs = fut.result(timeout=limit)
                if not isinstance(obs, Observation):
                    raise TypeError(f"an environment returned {type(obs).__name__}, not an Observation")
                out.append(obs)
            except FutureTimeout:  # the thread is abandoned, as a verifier's is
                out.append(Observation(f"TimeoutError: no answer within {self.env_cfg.timeout_s:g} s", ok=False,
                                       timed_out=True))  # fmt: skip
            except Exception as e:  # noqa: BLE001 - a user environment's failure must not fail the job
                out.append(Observation(f"error: the tool failed ({type(e).__name__})", ok=False))
        return out

    def ready(self) -> bool:
        return True


REWARD_WORKER_RESTARTS = 3  # replacements of each reward worker per job


class RewardPool:
    """M RewardWorker actors; items are split into contiguous shards."""

    def __init__(self, cfg: RewardConfig, env: EnvironmentConfig | None = None) -> None:
        # verifiers are light: no CPU reserved, so they never starve the rollout engines or learners
        # a worker that dies (a verifier crashed it, its node went) is replaced and its shard scored again
        # there: scoring is a pure function of the batch, so the step is neither lost nor counted twice
        self.pool = ActorPool(
            RewardWorker, cfg.num_workers, lambda i: (cfg, env), num_cpus=0, resources=cfg.ray_resources,
            restarts=REWARD_WORKER_RESTARTS,
        )  # fmt: skip

    def score(self, items: list[tuple[str, str, Any]]) -> tuple[list[float], dict[str, float]]:
        parts = self.pool.sharded(items, lambda w, part: w.score.remote(part))
        rewards = [r for part, _ in parts for r in part]
        metrics = combine_parts([{"reward/errors": 0.0, "reward/timeouts": 0.0}] + [m for _, m in parts])
        return rewards, metrics

    def env_step(self, states: list[EpisodeState]) -> list[Observation]:
        """The environment's answer to each episode's last action (the workers share the episodes)."""
        return [obs for part in self.pool.sharded(states, lambda w, part: w.env_step.remote(part)) for obs in part]
