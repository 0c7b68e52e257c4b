"""The `model` section of `JobConfig`: which model, in which dtype, and LoRA adapters (`model.lora`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from actors.common.config_base import PATH_LEN, NoNul, StrictModel

__all__ = ["LLAMA_PROJECTIONS", "LoraConfig", "ModelConfig", "vllm_max_lora_rank"]


# the linear layers of a Llama-style block (SmolLM2, Llama, Qwen, Mistral): attention and MLP
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# the ranks vLLM's LoRA slots come in (vllm.config.lora.MaxLoRARanks); an adapter of a smaller rank
# fits the next slot up
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ModuleName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest LoRA slot rank vLLM accepts that holds an adapter of this rank."""
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


class LoraConfig(StrictModel):
    """Low-rank adapters (PEFT's LoRA): the learners train the adapters only, the base weights stay
    frozen, and the engines get the adapter after each step (or the merged weights: `sync`)."""

    rank: int = Field(16, ge=1, le=VLLM_LORA_RANKS[-1], description="Adapter rank r (at most 512, vLLM's largest).")
    alpha: int = Field(
        32, ge=1, le=10_000, description="LoRA alpha: the adapter's update is scaled by alpha / rank (PEFT's default)."
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the adapter's input while training. 0 (the default) keeps the learner's "
        "log-probs equal to the engine's, which never drops.",
    )
    target_modules: list[ModuleName] = Field(
        default_factory=lambda: list(LLAMA_PROJECTIONS),
        min_length=1,
        max_length=32,
        description="Names of the linear layers that get adapters (PEFT's target_modules): by default every "
        "attention and MLP projection of a Llama-style block; never the embeddings or the LM head.",
    )
    sync: Literal["auto", "adapter", "merged"] = Field(
        "auto",
        description="What goes to the engines after each step: the adapter alone (vLLM serves it on the "
        "unchanged base; a few MB) or the base weights with the adapter merged in (the full model, as "
        "without LoRA). auto = adapter where the engines have GPUs (rollout.num_gpus_per_engine > 0), merged "
        "on CPU, where vLLM's LoRA kernels made generation about 6x slower (README, LoRA).",
    )


class ModelConfig(StrictModel):
    path: Annotated[str, NoNul] = Field(
        "smollm2-135m-instruct",
        min_length=1,
        max_length=PATH_LEN,
        description="A built-in model name (smollm2-135m-instruct) or a local Hugging Face checkpoint directory.",
    )
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="Compute dtype of rollout and learner; auto = bfloat16 on GPU or CPUs with AMX/AVX512-BF16, "
        "else float32 (bf16 is several times slower than fp32 on AVX2-only CPUs).",
    )
    lora: LoraConfig | None = Field(
        None,
        description="Train LoRA adapters instead of every parameter (None, the default: full parameters). "
        "LoRA usually wants a learning rate about 10x larger than full training.",
    )
