"""A streaming rollout engine for asynchronous mode: vLLM's `AsyncLLM` in an async Ray actor.

Each group (one prompt, n samples) is its own request, so the engine batches whatever is running
continuously and a group comes back as soon as it is done, not with a whole batch. New weights
arrive as a `WeightsFile` (`actors.common.weight_sync`) without stopping the actor:
  in flight (rollout.inflight_weight_updates): generation pauses with its requests and their KV cache
    kept, the weights reload, generation resumes; a request then spans two policy versions;
  between requests (default): the engine finishes what it is running (new requests wait), reloads,
    then takes the waiting ones.
Loads run one at a time, in the order they arrive. Every completion carries the (first, last) policy
version that generated it: a request that arrives during a load waits for it and counts from the new
version (the version it is generated with). The engine counts the
seconds it had at least one request running (`busy_seconds`): the driver's engine-idle metric.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from typing import Any

from actors.common.batch import Completion
from actors.common.config import LoraConfig, RolloutConfig
from actors.common.weight_sync import WeightsFile, file_header, is_local, local_copy, shm_dir
from actors.rollout.engine import adapter_request, block_args, completions, engine_env, lora_args, sampling_params

__all__ = ["StreamingEngine"]


class StreamingEngine:
    def __init__(
        self, model_path: str, rollout: RolloutConfig, dtype: str, seed: int, lora: LoraConfig | None = None
    ) -> None:
        engine_env(rollout)
        self.model_path, self.rollout, self.dtype, self.seed, self.lora = model_path, rollout, dtype, seed, lora
        self.adapter: Any = None  # the LoRARequest every request names, once an adapter was loaded
        self.llm: Any = None  # AsyncLLM needs the actor's event loop: built by the first call (ready)
        self.version = 0  # the policy version of the loaded weights (0: the initial model)
        self._ids = itertools.count()
        self._running = 0
        self._busy = 0.0  # seconds with at least one request running, up to _since
        self._since = time.monotonic()
        self._shm = shm_dir("forkrl-weights-")
        self._incarnation = uuid.uuid4().hex
        self._load_lock = asyncio.Lock()  # one load at a time
        self._not_loading = asyncio.Event()  # clear during a load: new requests wait for its version
        self._not_loading.set()

    async def ready(self) -> bool:
        if self.llm is None:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            args = AsyncEngineArgs(
                model=self.model_path,
                dtype=self.dtype,  # type: ignore[arg-type]
                max_model_len=self.rollout.max_model_len,
                gpu_memory_utilization=self.rollout.gpu_memory_utilization,
                enforce_eager=True,
                seed=self.seed,
                logprobs_mode="processed_logprobs",
                worker_extension_cls="actors.common.weight_sync.WeightSyncExtension",
                **lora_args(self.lora),
                **block_args(self.rollout),
            )
            self.llm = AsyncLLM.from_engine_args(args)
            await self.llm.collective_rpc("forkrl_watch_engine", args=(os.getpid(),))  # they end with this process
        return True

    def incarnation(self) -> str:
        """This process's id: a replacement started by Ray has a new one."""
        return self._incarnation

    def _mark(self, delta: int) -> None:
        now = time.monotonic()
        if self._running:
            self._busy += now - self._since
        self._since, self._running = now, self._running + delta

    def busy_seconds(self) -> float:
        """Seconds this engine had at least one request running, since it started."""
        self._mark(0)
        return self._busy

    async def generate_group(
        self, prompt: list[int], n: int, seed: int | None = None, temperature: float | None = None,
        max_tokens: int | None = None, stop: list[str] | None = None, top_logprobs: int = 0,
    ) -> list[Completion]:  # fmt: skip
        """n samples of one prompt (or a multi-turn trajectory's next turn: its context, n = 1; a tree's
        branch), each tagged with the (first, last) policy version that produced it; top_logprobs: k > 0
        adds each position's entropy estimate."""
        from vllm.inputs import TokensPrompt

        await self.ready()
        params = sampling_params(self.rollout, n, seed, temperature, max_tokens, stop, top_logprobs)
        await self._not_loading.wait()
        first = self.version
        self._mark(+1)
        try:
            final = None
            request = TokensPrompt(prompt_token_ids=prompt)
            async for out in self.llm.generate(request, params, str(next(self._ids)), lora_request=self.adapter):
                final = out
        finally:
            self._mark(-1)
        if final is None:
            raise RuntimeError("vLLM ended a request without an output")
        return completions(final, (first, self.version), top_logprobs)

    async def generate(
        self, prompts: list[list[int]], n: int, seed: int | None = None, temperature: float | None = None,
        max_tokens: int | list[int] | None = None, stop: list[str] | None = None,
    ) -> list[list[Completion]]:  # fmt: skip
        """For each prompt, n samples (the pool's batch call: evaluation); max_tokens: one or one per prompt."""
        caps = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
        calls = (self.generate_group(p, n, seed, temperature, m, stop) for p, m in zip(prompts, caps, strict=True))
        return list(await asyncio.gather(*calls))

    async def load_weights(self, weights: WeightsFile) -> dict[str, float]:
        """Reload all weights from the learner's file without ending the requests that are running."""
        await self.ready()
        t0 = time.perf_counter()
        # from another node: the bytes are awaited, so this engine generates on meanwhile
        blob = None if is_local(weights) else await weights.owner.read_weights.remote(weights.path)
        path, own = local_copy(weights, self._shm, blob)
        mode = "keep" if self.rollout.inflight_weight_updates else "wait"
        try:
            async with self._load_lock:
                self._not_loading.clear()
                try:
                    await self.llm.pause_generation(mode=mode, clear_cache=False)
                    try:
                        if weights.adapter_config is not None:  # LoRA: the adapter alone, into its slot
                            await self.llm.add_lora(adapter_request(path, reload=True))
                            self.adapter, counts = adapter_request(path), [file_header(path)]
                        else:
                            counts = await self.llm.collective_rpc("forkrl_reload_weights", args=(path,))
                        await self.llm.reset_prefix_cache()  # cached prompts were computed with the old weights
                        self.version = int(counts[0][1])
                    finally:
                        await self.llm.resume_generation()
                finally:
                    self._not_loading.set()
        finally:
            if own:
                os.unlink(own)
        tensors, version = counts[0]
        return {
            "tensors": float(tensors),
            "seconds": time.perf_counter() - t0,
            "local": float(own is None),
            "version": float(version),
        }

    def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
