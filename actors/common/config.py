"""`JobConfig`: the one description of a forkrl training job.

The REST body, the YAML given to `python -m actors.train --config`, and the Helm values of a
RayJob all validate against this schema. It imports pydantic and yaml only - never torch, ray,
vllm or deepspeed (a test proves it) - so the control plane can validate jobs cheaply.
Every default lives here, in one field, with its bounds and a one-line description.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from actors.common.arithmetic import all_questions, is_held_out
from actors.common.config_algorithm import AlgorithmConfig
from actors.common.config_base import KEY_LEN, MAX_SEED, PATH_LEN, CpuCores, NoNul, Resources, StrictModel
from actors.common.env_config import EnvironmentConfig
from actors.common.model_config import LoraConfig, ModelConfig
from actors.common.rollout_config import RolloutConfig
from actors.common.tree_config import TreeConfig
from actors.common.verifier_config import Verifier, default_verifiers

__all__ = [
    "AlgorithmConfig",
    "BuiltinData",
    "DataConfig",
    "EnvironmentConfig",
    "JobConfig",
    "JsonlData",
    "LearnerConfig",
    "LoraConfig",
    "ModelConfig",
    "ParquetData",
    "RewardConfig",
    "RolloutConfig",
    "TrackingConfig",
    "TrainerConfig",
    "TreeConfig",
    "Verifier",
]


class BuiltinData(StrictModel):
    type: Literal["builtin"] = "builtin"
    task: Literal["arithmetic", "countdown_sum"] = Field("arithmetic", description="Built-in verifiable task.")
    num_samples: int = Field(4096, ge=1, le=10_000_000, description="Size of the generated data set.")
    max_operand: int = Field(20, ge=1, le=10**9, description="Largest operand in generated problems.")
    seed: int = Field(
        1234, ge=0, le=MAX_SEED, description="Seed of the generated data set (separate from the trainer seed)."
    )
    held_out: float = Field(
        0.0, ge=0.0, le=0.9,
        description="Share of the task's distinct questions (chosen by a hash of the question's text) that "
        "training never sees; the evaluation asks them, each once. 0: the evaluation draws fresh problems "
        "with seed + 1, which can repeat training questions when the task has few.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _something_left_to_train_on(self) -> BuiltinData:
        # all() stops at the first question left for training: a few hashes, unless every one is held out
        if self.held_out and all(is_held_out(q, self.held_out) for q in all_questions(self.task, self.max_operand)):
            raise ValueError(
                f"held_out={self.held_out} holds out every question of the task with max_operand="
                f"{self.max_operand}: none would be left to train on; lower held_out or raise max_operand"
            )
        return self


class JsonlData(StrictModel):
    type: Literal["jsonl"] = "jsonl"
    path: Annotated[str, NoNul] = Field(
        ..., min_length=1, max_length=PATH_LEN, description="JSONL file, one record per line."
    )
    prompt_key: str = Field(
        "prompt", max_length=KEY_LEN, description="Field holding the prompt (a string or a chat message list)."
    )
    answer_key: str = Field("answer", max_length=KEY_LEN, description="Field holding the reference answer.")


class ParquetData(StrictModel):
    type: Literal["parquet"] = "parquet"
    path: Annotated[str, NoNul] = Field(
        ...,
        min_length=1,
        max_length=PATH_LEN,
        description="Parquet file; verl-style (prompt, reward_model.ground_truth).",
    )
    prompt_key: str = Field(
        "prompt", max_length=KEY_LEN, description="Column holding the prompt (a string or a chat message list)."
    )
    answer_key: str = Field(
        "reward_model.ground_truth",
        max_length=KEY_LEN,
        description="Column (dotted for nested structs) holding the reference answer.",
    )


DataSource = Annotated[BuiltinData | JsonlData | ParquetData, Field(discriminator="type")]


class DataConfig(StrictModel):
    source: DataSource = Field(default_factory=BuiltinData)  # type: ignore[arg-type]
    prompts_per_step: int = Field(8, ge=1, le=65536, description="Prompts sampled per optimizer step.")
    system_prompt: str | None = Field(
        "Answer with just the number.",
        max_length=16384,
        description="System message prepended when a chat template is used.",
    )
    use_chat_template: bool = Field(True, description="Render prompts with the tokenizer's chat template.")
    shuffle: bool = Field(True, description="Shuffle prompts each epoch (seeded; resumable).")
    eval_source: DataSource | None = Field(
        None,
        description="Held-out evaluation data; None = a built-in task regenerated with seed + 1, or the "
        "first trainer.eval_prompts training records for file sources.",
    )


class RewardConfig(StrictModel):
    verifiers: list[Verifier] = Field(
        default_factory=default_verifiers,
        min_length=1,
        max_length=16,
        description="Summed with their weights.",
    )
    num_workers: int = Field(2, ge=1, le=4096, description="Verifier actors in the reward pool.")
    timeout_s: float = Field(
        5.0, gt=0, le=3600, description="Per-completion wall-clock limit of each verifier; a timeout scores 0."
    )
    ray_resources: Resources = Field(
        default_factory=dict,
        description='Extra Ray resources each verifier actor requests, e.g. {"forkrl_reward": 1} to place it on the '
        "chart's reward worker group. Empty: anywhere.",
    )


class LearnerConfig(StrictModel):
    num_learners: int = Field(1, ge=1, le=4096, description="DeepSpeed learner actors (data-parallel ranks).")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    lr: float = Field(1e-6, gt=0, le=1, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, le=1e6, description="Global gradient-norm clip.")
    warmup_steps: int = Field(0, ge=0, le=10_000_000, description="Linear learning-rate warm-up steps.")
    micro_batch_size: int = Field(16, ge=1, le=65536, description="Sequences per forward/backward on one learner.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    share_prompt: bool = Field(
        True,
        description="Run each prompt once for all its completions (its keys/values are repeated per completion; "
        "same numbers as running every sequence whole, fewer tokens). Not used with gradient_checkpointing, "
        "which turns the key/value cache off.",
    )
    entropy_pass: Literal["fused", "separate"] = Field(
        "fused",
        description="fused: one forward per micro-batch, graphs kept until the global threshold is known "
        "(fastest; memory holds the whole step's activations); separate: a no-grad entropy pass first, "
        "then forward+backward per micro-batch (bounded memory, one extra forward).",
    )
    num_cpus_per_learner: float = Field(1, gt=0, le=1024, description="Ray CPUs per learner actor.")
    num_gpus_per_learner: float = Field(0, ge=0, le=64, description="Ray GPUs per learner actor (0 on CPU).")
    cpu_cores: CpuCores | None = Field(
        None,
        description='CPU only: the cores the learners\' torch threads run on, a Linux CPU list ("1", "2-3"), one '
        "thread per core (shared by the learners of a node); None = every core, split over the learners.",
    )
    ray_resources: Resources = Field(
        default_factory=dict,
        description='Extra Ray resources each learner actor requests, e.g. {"forkrl_learner": 1} to place it on the '
        "chart's learner worker group. Empty: anywhere.",
    )
    weight_sync_timeout_s: float = Field(
        120, gt=0, le=86400, description="A weight sync slower than this fails the step."
    )
    collective_timeout_s: float = Field(
        1800,
        gt=0,
        le=86400,
        description="A learner call (a step, a checkpoint) or a collective between learner ranks (gloo, NCCL) that "
        "does not finish within this fails the step, naming the learners still busy.",
    )


Resume = Annotated[Literal["auto", "never"] | Annotated[str, Field(min_length=1, max_length=PATH_LEN)], NoNul]


class TrainerConfig(StrictModel):
    steps: int = Field(20, ge=1, le=10_000_000, description="Optimizer steps.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of sampling order, rollout and learner RNG.")
    save_every: int = Field(10, ge=0, le=10_000_000, description="Checkpoint every K steps; 0 = only at the end.")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="Newest checkpoints kept on disk.")
    eval_every: int = Field(
        0, ge=0, le=10_000_000,
        description="Greedy evaluation before training (step 0), every K steps and at the end; 0 = off.",
    )  # fmt: skip
    eval_prompts: int = Field(32, ge=1, le=100_000, description="Prompts in the evaluation set.")
    output_dir: Annotated[str, NoNul] = Field(
        "runs/forkrl", min_length=1, max_length=PATH_LEN, description="Run directory: metrics, checkpoints, export."
    )
    resume: Resume = Field(
        "auto",
        description="auto: continue from the newest checkpoint in output_dir; never; or a checkpoint path (through "
        "the control plane: a checkpoint of one of the owner's own jobs).",
    )
    export_hf: bool = Field(True, description="Write a Hugging Face checkpoint at the end.")
    max_staleness: int = Field(
        0,
        ge=0,
        le=64,
        description="0: synchronous, on-policy steps (generate, verify, learn, sync, in order). k >= 1: asynchronous - "
        "the engines generate continuously into a bounded buffer while the learner trains; a completion "
        "generated with policy version v is trained at version v + k at most (older ones are dropped and "
        "counted, async/dropped_stale), the engine's log-probs are the behaviour policy of the importance "
        "weight (algorithm.tis_cap). Larger k keeps engines and learner busier and trains on staler data.",
    )
    max_restarts: int = Field(
        2,
        ge=0,
        le=100,
        description="Through the control plane: how often a failed job (its driver, a learner or an engine died, a "
        "timeout) is resubmitted; each attempt resumes from the newest checkpoint (resume: auto).",
    )


class TrackingConfig(StrictModel):
    tensorboard: bool = Field(True, description="Write TensorBoard event files in the run directory.")
    samples_per_step: int = Field(
        4,
        ge=0,
        le=16,
        description="Sampled completions per step logged with per-token entropy and kept flags (metrics.jsonl "
        "`samples`, the dashboard, TensorBoard text, W&B and MLflow tables); 0 = none.",
    )
    wandb_project: str | None = Field(
        None, max_length=128, description="Log to Weights & Biases when set and installed (tenancy policy permitting)."
    )
    wandb_entity: str | None = Field(None, max_length=128, description="W&B entity (team); None = the default.")
    wandb_mode: Literal["online", "offline"] = Field(
        "online", description="offline: W&B writes under <run dir>/wandb, for `wandb sync` later (no network)."
    )
    mlflow_tracking_uri: str | None = Field(
        None, max_length=2048, description="Log to MLflow when set and installed (one of the operator's URIs)."
    )
    mlflow_experiment: str = Field("forkrl", min_length=1, max_length=256, description="MLflow experiment name.")
    log_export: bool = Field(
        True, description="Register the Hugging Face export with W&B (model artifact) and MLflow (run artifact)."
    )
    report_url: str | None = Field(
        None,
        max_length=2048,
        description="Control-plane ingestion URL (set by the service; the bearer token travels in the "
        "FORKRL_REPORT_TOKEN environment variable, never in the config).",
    )


class JobConfig(StrictModel):
    name: str = Field("forkrl-run", min_length=1, max_length=200, description="Human-readable job name.")
    model: ModelConfig = Field(default_factory=ModelConfig)  # type: ignore[arg-type]
    data: DataConfig = Field(default_factory=DataConfig)  # type: ignore[arg-type]
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)  # type: ignore[arg-type]
    reward: RewardConfig = Field(default_factory=RewardConfig)  # type: ignore[arg-type]
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)  # type: ignore[arg-type]
    learner: LearnerConfig = Field(default_factory=LearnerConfig)  # type: ignore[arg-type]
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)  # type: ignore[arg-type]
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)  # type: ignore[arg-type]
    environment: EnvironmentConfig | None = Field(
        None, description="Multi-turn, tool-using episodes (actors.common.env_config); None = single-turn."
    )

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        if self.rollout.max_new_tokens >= self.rollout.max_model_len:
            raise ValueError(
                f"rollout.max_new_tokens={self.rollout.max_new_tokens} must be < rollout.max_model_len="
                f"{self.rollout.max_model_len} (the prompt needs room)"
            )
        if self.rollout.top_p != 1.0:
            raise ValueError(
                f"rollout.top_p = {self.rollout.top_p}: the learner's log-probs ignore nucleus truncation, so the "
                "truncated importance weight would be biased below 1; accepted: 1.0"
            )
        mini = self.algorithm.ppo_mini_batch
        if mini is not None and mini > self.data.prompts_per_step:
            raise ValueError(
                f"algorithm.ppo_mini_batch={mini} must be <= data.prompts_per_step={self.data.prompts_per_step} "
                "(a mini-batch is a part of the rollout batch)"
            )
        if self.trainer.max_staleness and self.algorithm.tis_cap is None:
            raise ValueError(
                f"trainer.max_staleness={self.trainer.max_staleness} trains on completions of older policies: "
                "algorithm.tis_cap must be set (the truncated importance weight between the learner's policy and "
                "the engine's that corrects them); accepted: a number > 0, e.g. 2.0"
            )
        self._environment_fits()
        self._tree_fits()
        lora = self.model.lora
        if lora is not None and lora.sync == "auto":  # resolved here: what is stored and shown is the choice
            sync = "adapter" if self.rollout.num_gpus_per_engine > 0 else "merged"
            self.model.lora = lora.model_copy(update={"sync": sync})
        algo = self.algorithm
        if algo.lr_scale == "inverse_rho" and self.learner.lr / algo.top_entropy_quantile > 1:
            raise ValueError(
                f"algorithm.lr_scale=inverse_rho with learner.lr={self.learner.lr} and algorithm.top_entropy_quantile="
                f"{algo.top_entropy_quantile} trains at {self.learner.lr / algo.top_entropy_quantile:g}; accepted: "
                "learner.lr / top_entropy_quantile <= 1"
            )
        if self.algorithm.overlong_buffer >= self.rollout.max_new_tokens:
            raise ValueError(
                f"algorithm.overlong_buffer={self.algorithm.overlong_buffer} must be < rollout.max_new_tokens="
                f"{self.rollout.max_new_tokens}"
            )
        return self

    def _tree_fits(self) -> None:
        tree, g = self.rollout.tree, self.rollout.group_size
        if tree is None:
            return
        if tree.roots > g:
            raise ValueError(f"rollout.tree.roots={tree.roots} must be <= rollout.group_size={g} (the group's leaves)")
        if self.environment is not None:
            raise ValueError("rollout.tree is not available with environment (multi-turn episodes) yet; accepted: "
                             "rollout.tree unset")  # fmt: skip
        if self.trainer.max_staleness and tree.entropy == "learner":
            raise ValueError(
                f"rollout.tree.entropy=learner with trainer.max_staleness={self.trainer.max_staleness}: in "
                "asynchronous mode the learner trains while the trees grow and cannot score them; accepted: "
                "entropy engine"
            )
        if tree.credit == "tree" and self.algorithm.policy_loss == "gspo":
            raise ValueError(
                "rollout.tree.credit=tree with algorithm.policy_loss=gspo: GSPO's sequence ratio needs every token "
                "of a sequence in the loss, and tree credit keeps a shared token in one copy only; accepted: credit "
                "flat, or another policy_loss"
            )

    def _environment_fits(self) -> None:
        env = self.environment
        if env is None:
            return
        if env.max_tokens >= self.rollout.max_model_len:
            raise ValueError(
                f"environment.max_tokens={env.max_tokens} must be < rollout.max_model_len={self.rollout.max_model_len} "
                "(the prompt and the whole episode share the engine's context)"
            )
