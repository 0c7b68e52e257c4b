"""The `algorithm` section of a job config: the estimator, the entropy filter, the loss method and its
options (see actors.algo.loss, actors.algo.covariance). Re-exported by actors.common.config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from actors.common.config_base import StrictModel

__all__ = ["AlgorithmConfig"]


class AlgorithmConfig(StrictModel):
    estimator: Literal["grpo", "drgrpo"] = Field("grpo", description="grpo: (r-mean)/std; drgrpo: r-mean.")
    top_entropy_quantile: float = Field(
        0.2, gt=0, le=1, description="Fraction of highest-entropy valid response tokens that get gradient (rho)."
    )
    token_selection: Literal["highest", "random", "lowest"] = Field(
        "highest",
        description="Which top_entropy_quantile share of the step's valid response tokens gets gradient: the "
        "highest-entropy ones (the paper), a uniformly random share of the same size (a control; seeded by "
        "trainer.seed and the step) or the lowest-entropy ones (the paper's negative control).",
    )
    log_entropy: bool = Field(True, description="Record entropy statistics and forking tokens every step.")
    loss_agg: Literal["token_mean_selected", "token_mean", "seq_mean_token_mean", "token_sum_norm"] = Field(
        "token_mean_selected", description="Loss normaliser; see actors.algo.loss.policy_loss."
    )
    clip_eps_low: float = Field(0.2, ge=0, lt=1, description="PPO clip below 1 (DAPO: 0.2).")
    clip_eps_high: float = Field(0.28, ge=0, le=10, description="PPO clip above 1, clip-higher (DAPO: 0.28).")
    dual_clip_c: float | None = Field(
        None, gt=1, le=1e3, description="Dual-clip bound for negative advantages; None = off."
    )
    kl_coef: float = Field(0.0, ge=0, le=1e3, description="k3 KL to the initial policy; 0 = no reference model (DAPO).")
    mask_kl_by_entropy: bool = Field(False, description="Apply the entropy mask to the KL term too.")
    tis_cap: float | None = Field(
        2.0,
        gt=0,
        le=1e6,
        description="Cap C of the importance weight w = pi_learner_old / pi_engine that corrects the rollout engine / "
        "learner mismatch (and, with trainer.max_staleness, the staleness); None = no correction.",
    )
    mismatch_level: Literal["token", "sequence"] = Field(
        "token",
        description="The mismatch weight per token, or one per sequence (the product of its tokens' ratios, every "
        "token of the sequence gets it).",
    )
    mismatch_mode: Literal["truncate", "mask"] = Field(
        "truncate",
        description="truncate (TIS): w -> min(w, C); mask (MIS): w where w <= C, 0 where above (the token or the "
        "sequence is dropped from the gradient).",
    )
    policy_loss: Literal["ppo_clip", "gspo", "cispo", "clip_cov", "kl_cov"] = Field(
        "ppo_clip",
        description="The surrogate: ppo_clip (token ratio, clip-higher: DAPO); gspo (one length-normalised ratio "
        "per sequence, clipped per sequence: arXiv 2507.18071; GSPO's own clip ranges are about 3e-4 / 4e-4); "
        "cispo (every token keeps its gradient, weighted by the stop-gradient ratio capped at cispo_max_weight: "
        "MiniMax-M1, arXiv 2506.13585); clip_cov / kl_cov (ppo_clip with a few high log-prob/advantage "
        "covariance tokens detached, or unclipped with those tokens KL-penalised: arXiv 2505.22617, taken over "
        "the whole step). See actors.algo.loss and actors.algo.covariance.",
    )
    clip_cov_ratio: float = Field(
        2e-4, gt=0, le=1, description="Clip-Cov: the share of the step's kept tokens detached."
    )
    clip_cov_lb: float = Field(1.0, ge=-1e6, le=1e6, description="Clip-Cov: candidates have covariance above this.")
    clip_cov_ub: float = Field(5.0, ge=-1e6, le=1e6, description="Clip-Cov: candidates have covariance below this.")
    kl_cov_ratio: float = Field(
        2e-3,
        gt=0,
        le=1,
        description="KL-Cov: the share of the step's kept tokens, highest covariance first, penalised.",
    )
    kl_cov_coef: float = Field(1.0, ge=0, le=1e3, description="KL-Cov: the coefficient of |log r| on those tokens.")
    cispo_max_weight: float = Field(
        4.0, gt=1, le=1e3, description="CISPO: the cap of its stop-gradient importance weight (no lower bound)."
    )
    entropy_coef: float = Field(
        0.0, ge=0, le=10, description="Entropy bonus: the loss minus this x the mean entropy (0 = off)."
    )
    entropy_bonus_tokens: Literal["valid", "kept"] = Field(
        "valid",
        description="The tokens the entropy bonus averages over: every valid response token, or the kept (forking) "
        "tokens only.",
    )
    lr_scale: Literal["none", "inverse_rho"] = Field(
        "none",
        description="inverse_rho: the learning rate is learner.lr / top_entropy_quantile. The kept tokens carry a "
        "fifth of the signal at rho 0.2; rescaling the loss would not change Adam's step (it is scale-free), "
        "the learning rate does.",
    )
    dynamic_sampling: bool = Field(
        True,
        description="DAPO dynamic sampling: drop groups whose verifier scores are all equal and generate more "
        "prompts until the step holds data.prompts_per_step groups with signal (at most "
        "dynamic_sampling_max_rounds rounds).",
    )
    dynamic_sampling_max_rounds: int = Field(
        3, ge=1, le=1000, description="Generation rounds per step at most; the step trains on what it has then."
    )
    overlong_buffer: int = Field(
        16, ge=0, le=131072, description="Soft overlong penalty window in tokens (DAPO); 0 = off."
    )
    overlong_penalty: float = Field(1.0, ge=0, le=1e6, description="Penalty at the hard limit, linear over the buffer.")
    overlong_mask: bool = Field(
        False, description="Leave truncated responses (hit rollout.max_new_tokens) out of the loss (DAPO)."
    )
    ppo_mini_batch: int | None = Field(
        None,
        ge=1,
        description="Prompts (groups) per optimizer step; a rollout batch of data.prompts_per_step prompts then "
        "takes several steps, with old log-probs taken once before the first (the paper: 512 / 32). "
        "None = one optimizer step per rollout.",
    )
    ppo_epochs: int = Field(1, ge=1, le=100, description="Passes over the rollout batch's mini-batches.")

    @model_validator(mode="after")
    def _methods_compose(self) -> AlgorithmConfig:
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(
                f"algorithm.clip_cov_lb={self.clip_cov_lb} must be < algorithm.clip_cov_ub={self.clip_cov_ub}"
            )
        if self.dual_clip_c is not None and self.policy_loss not in ("ppo_clip", "clip_cov"):
            raise ValueError(
                f"algorithm.dual_clip_c={self.dual_clip_c} bounds the token ratio of ppo_clip and clip_cov; with "
                f"algorithm.policy_loss={self.policy_loss!r} accepted is null"
            )
        return self
