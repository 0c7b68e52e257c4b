"""`rollout`: the rollout engines of a job (`actors.common.config.JobConfig`): sampling, vLLM's engine
settings, placement, restarts and timeouts, asynchronous mode's weight loads, and tree rollouts
(`actors.common.tree_config`). Pydantic only, like the rest of the config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from actors.common.config_base import CpuCores, Resources, StrictModel
from actors.common.tree_config import TreeConfig

__all__ = ["RolloutConfig"]


class RolloutConfig(StrictModel):
    num_engines: int = Field(1, ge=1, le=1024, description="vLLM engine actors in the rollout pool.")
    group_size: int = Field(8, ge=2, le=1024, description="Completions sampled per prompt (the GRPO group).")
    temperature: float = Field(1.0, gt=0, le=10, description="Sampling temperature; also used by the learner.")
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Nucleus sampling mass. Only 1.0 is accepted: the learner's log-probs do not model the "
        "truncation, so the importance weight of a truncated sampler would be biased.",
    )
    max_new_tokens: int = Field(64, ge=1, le=131072, description="Longest completion.")
    max_model_len: int = Field(512, ge=16, le=1_048_576, description="Prompt + completion context of the engine.")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="vLLM memory fraction (CPU: of RAM).")
    cpu_kv_cache_gib: int = Field(2, ge=1, le=1024, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE).")
    kv_block_size: int | None = Field(
        None,
        ge=8,
        le=1024,
        description="vLLM's KV cache block size in tokens. Its prefix cache shares whole blocks only, so tree "
        "rollouts (rollout.tree) with short prompts share more with smaller blocks (e.g. 32 on CPU, whose default "
        "is 128). None = vLLM's default.",
    )
    num_cpus_per_engine: float = Field(1, gt=0, le=1024, description="Ray CPUs reserved per engine actor.")
    num_gpus_per_engine: float = Field(0, ge=0, le=64, description="Ray GPUs per engine actor (0 on CPU).")
    cpu_cores: CpuCores | None = Field(
        None,
        description='CPU only: the cores the engines\' vLLM threads run on, a Linux CPU list ("0", "0-3", "0,2"); '
        "None = every core. With learner.cpu_cores, the pools get cores of their own (asynchronous mode).",
    )
    ray_resources: Resources = Field(
        default_factory=dict,
        description='Extra Ray resources each engine actor requests, e.g. {"forkrl_rollout": 1} to place it on the '
        "chart's rollout worker group. Empty: anywhere.",
    )
    engine_restarts: int = Field(
        2, ge=0, le=100, description="Replacements of each engine that dies; a replacement gets the current weights."
    )
    engine_process: Literal["auto", "in_actor", "separate"] = Field(
        "auto",
        description="Where vLLM's engine core and its worker run. in_actor: inside the engine actor (vLLM's "
        "in-process client, uni executor): two process starts fewer, about 20 s of start-up on a 2-core CPU box; "
        "separate: vLLM's own processes; auto: in_actor for CPU engines of the synchronous mode, separate for GPU "
        "engines. The streaming engine (trainer.max_staleness >= 1) always runs its core apart (vLLM's AsyncLLM).",
    )
    generate_timeout_s: float = Field(
        3600,
        gt=0,
        le=86400,
        description="A generation call that does not finish within this fails the step, naming "
        "the engines still busy (a stalled engine never hangs the job).",
    )
    engine_restart_timeout_s: float = Field(
        600, gt=0, le=86400, description="A dead engine not replaced and synced within this fails the step, naming it."
    )
    inflight_weight_updates: bool = Field(
        False,
        description="Asynchronous mode (trainer.max_staleness >= 1): new weights reach the engines mid-generation "
        "(generation pauses, keeping its requests and their KV cache, reloads, resumes), so a completion may span "
        "two policy versions (recorded per completion). False: each engine first finishes the requests it is "
        "running (new ones wait), then reloads.",
    )
    max_inflight_groups: int | None = Field(
        None,
        ge=1,
        le=65536,
        description="Asynchronous mode: groups being generated at once over the pool at most. None = "
        "data.prompts_per_step per engine.",
    )
    weight_load: Literal["auto", "wait", "background"] = Field(
        "auto",
        description="Asynchronous mode: wait = after each step the learner waits until every engine has loaded the "
        "new weights; background = it goes on to its next step once it has written them and the engines load "
        "meanwhile (each completion still carries the version its engine had when its request started, so the "
        "staleness bound holds); auto = background at trainer.max_staleness >= 2 (11% more sequences/s there), "
        "wait at 1 (no better there: bench/async_rl.py, README).",
    )
    tree: TreeConfig | None = Field(
        None,
        description="Forking-token tree rollouts (actors.common.tree_config): each group grows as a tree, branching "
        "where the policy is uncertain; None = every completion sampled on its own.",
    )
