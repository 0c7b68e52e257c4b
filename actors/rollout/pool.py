"""The rollout pool: N `RolloutEngine` actors; prompts are split into contiguous shards, one per engine.

An engine that dies is started again by Ray (`rollout.engine_restarts`); before it generates, it
gets the weights last pushed to the pool, and the lost shard is generated there again. Not back
within `rollout.engine_restart_timeout_s`: the step fails with an error naming the engine.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from actors.common.batch import Completion
from actors.common.config import LoraConfig, RolloutConfig
from actors.common.pool import ActorPool, shard
from actors.rollout.engine import RolloutEngine
from actors.rollout.stream_engine import StreamingEngine

log = logging.getLogger("forkrl.rollout")

__all__ = ["RolloutPool"]


STATUS_TIMEOUT_S = 60.0  # an engine's answer to a status call (busy seconds), at most


class RolloutPool:
    """streaming: `StreamingEngine` actors (asynchronous mode: one request per group, `submit`), else
    `RolloutEngine` (batch calls)."""

    def __init__(
        self, model_path: str, rollout: RolloutConfig, dtype: str, seed: int, streaming: bool = False,
        lora: LoraConfig | None = None,
    ) -> None:  # fmt: skip
        self.rollout = rollout
        self.pool = ActorPool(
            StreamingEngine if streaming else RolloutEngine,
            rollout.num_engines,
            lambda i: (model_path, rollout, dtype, seed + i, lora),
            num_cpus=rollout.num_cpus_per_engine,
            num_gpus=rollout.num_gpus_per_engine,
            resources=rollout.ray_resources,
            restarts=rollout.engine_restarts,
            retry_calls=False,
            name="rollout engine",
        )
        self.weights: Any = None  # the ObjectRef of the last weights pushed (kept for replacements)
        self.replacements = 0
        # each engine's process id as last seen: a death is handled once, whichever thread sees it first
        # (asynchronous mode: the stream and the weight sync may both find an engine dead)
        self._seen: list[str] = self.pool.all(lambda e: e.incarnation.remote())
        self._lock = threading.Lock()

    def generate(
        self, prompts: list[list[int]], n: int | list[int], max_tokens: int | list[int] | None = None,
        engines: list[int] | None = None, **kw: Any,
    ) -> list[list[Completion]]:  # fmt: skip
        """For each prompt, n samples (n, max_tokens: one for all, or one per prompt); a dead engine's shard
        is generated again on its replacement. The prompts go to the engines in contiguous shards, or each to
        engine `engines[j] % engines` (a tree's requests to the engine whose prefix cache holds its prefix)."""
        k = len(self.pool)
        order = shard(list(range(len(prompts))), k) if engines is None else [
            [j for j, e in enumerate(engines) if e % k == i] for i in range(k)
        ]  # fmt: skip

        def pick(values: Any, idx: list[int]) -> Any:
            return [values[j] for j in idx] if isinstance(values, list) else values

        parts = {i: idx for i, idx in enumerate(order) if idx}

        def call(i: int) -> Any:
            idx = parts[i]
            return self.pool.actors[i].generate.remote(
                [prompts[j] for j in idx], pick(n, idx), max_tokens=pick(max_tokens, idx), **kw
            )

        def again(i: int, error: Exception) -> Any:
            self._replace(i, error)
            return call(i)

        refs = [call(i) for i in parts]
        results = self.pool.gather(
            refs, list(parts), on_death=again, timeout_s=self.rollout.generate_timeout_s,
            timeout_setting="rollout.generate_timeout_s",
        )  # fmt: skip
        out: list[list[Completion]] = [[] for _ in prompts]
        for idx, result in zip(parts.values(), results, strict=True):
            for j, group in zip(idx, result, strict=True):
                out[j] = group
        return out

    def submit(self, i: int, prompt: list[int], n: int, **kw: Any) -> Any:
        """Start one group (n samples of one prompt; or a trajectory's next turn) on engine i (streaming
        engines): its ObjectRef. kw: max_tokens, stop."""
        return self.pool.actors[i].generate_group.remote(prompt, n, **kw)

    def replace(self, i: int, error: Exception) -> None:
        """Engine i died: wait for its replacement and give it the current weights (else raise)."""
        self._replace(i, error)

    def busy_seconds(self) -> list[float]:
        """Each streaming engine's seconds with a request running, since it started."""
        import ray

        def replaced(i: int, error: Exception) -> Any:
            self._replace(i, error)
            return ray.put(0.0)  # a replacement counts from 0 again (the step's difference is clamped at 0)

        # a quick status call: a stalled engine fails it within generate_timeout_s (or a minute if that is longer),
        # named like a stalled generation, whichever of the two calls meets the stall first
        bound = min(STATUS_TIMEOUT_S, self.rollout.generate_timeout_s)
        setting = "rollout.generate_timeout_s" if bound == self.rollout.generate_timeout_s else "a status call's bound"
        refs = [e.busy_seconds.remote() for e in self.pool.actors]
        return [
            float(x)
            for x in self.pool.gather(
                refs, list(range(len(refs))), on_death=replaced, timeout_s=bound, timeout_setting=setting
            )
        ]

    def load_weights(self, weights: Any, timeout_s: float) -> list[dict[str, float]]:
        """Push the learner's weights (an ObjectRef of a `WeightsFile`) to every engine; raise if not
        done in timeout_s. An engine that dies meanwhile gets them when it is replaced."""
        return self.wait_loads(self.start_loads(weights), timeout_s)

    def start_loads(self, weights: Any) -> list[Any]:
        """Start every engine's load of the learner's weights (an ObjectRef of a `WeightsFile`): the calls'
        refs, for `wait_loads`. A streaming engine keeps generating meanwhile (its requests wait for the
        reload, or pause through it in flight)."""
        self.weights = weights  # what a replacement engine gets
        return [e.load_weights.remote(weights) for e in self.pool.actors]

    def wait_loads(self, refs: list[Any], timeout_s: float) -> list[dict[str, float]]:
        """The engines' answers to `start_loads` (tensors, seconds, local, version); raise if not all in
        within timeout_s. An engine that died meanwhile is replaced and gets the weights."""

        def replaced(i: int, error: Exception) -> Any:
            self._replace(i, error)  # the replacement loads self.weights
            import ray

            return ray.put({"tensors": 0.0, "seconds": 0.0})

        try:
            return self.pool.gather(
                refs, list(range(len(refs))), on_death=replaced, timeout_s=timeout_s,
                timeout_setting="learner.weight_sync_timeout_s",
            )  # fmt: skip
        except TimeoutError as e:
            raise TimeoutError(f"weight sync to {e}") from None

    def _replace(self, i: int, error: Exception) -> None:
        """Wait for Ray's replacement of engine i, give it the current weights; else fail naming it."""
        import ray

        engine, timeout = self.pool.actors[i], self.rollout.engine_restart_timeout_s
        name = f"rollout engine {i} ({self.pool.role_class} actor {engine._actor_id.hex()})"
        log.warning("%s died (%s); waiting for its replacement", name, type(error).__name__)
        t0 = time.monotonic()
        while True:
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                raise RuntimeError(
                    f"{name} died and was not replaced within {timeout:.0f} s (rollout.engine_restart_timeout_s, "
                    f"rollout.engine_restarts = {self.rollout.engine_restarts}): {error}"
                ) from error
            try:  # calls to a restarting actor wait for it; a dead one (no restarts left) raises at once
                ray.get(engine.ready.remote(), timeout=left)
                with self._lock:
                    now = ray.get(engine.incarnation.remote(), timeout=left)
                    if now == self._seen[i]:
                        return  # handled already (another thread), or it was only unreachable for a moment
                    if self.weights is not None:
                        ray.get(engine.load_weights.remote(self.weights), timeout=max(1.0, left))
                    self._seen[i] = now
                break
            except ray.exceptions.GetTimeoutError:
                continue
            except ray.exceptions.ActorUnavailableError:
                time.sleep(1)  # not reachable for a moment: try again
            except ray.exceptions.ActorDiedError as e:
                raise RuntimeError(
                    f"{name} died and cannot be replaced (rollout.engine_restarts = "
                    f"{self.rollout.engine_restarts} used up): {e}"
                ) from e
        self.replacements += 1
        log.warning("%s replaced in %.1f s, with the current weights", name, time.monotonic() - t0)

    def shutdown(self) -> None:
        """Shut every engine down, then end its actor (idempotent)."""
        import ray

        engines, self.pool.actors = self.pool.actors, []
        ray.wait([e.shutdown.remote() for e in engines], num_returns=len(engines), timeout=15)
        for e in engines:
            ray.kill(e)
