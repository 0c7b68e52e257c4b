"""The entropy-masked, clipped policy loss (DAPO's clip-higher on the kept tokens): pure torch.

Everything that must be global over an optimizer step (the kept mask, the token counts that
normalise the loss) comes in from the caller, so micro-batch losses add up to the step's loss
exactly whatever the split. Shapes: B = sequences in a micro-batch, T = response positions.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from actors.common.config import AlgorithmConfig

__all__ = ["LossAgg", "loss_normalizer", "mismatch_weight", "policy_loss"]

LossAgg = Literal["token_mean", "token_mean_selected", "seq_mean_token_mean", "token_sum_norm"]


def loss_normalizer(
    loss_agg: LossAgg,
    *,
    num_valid_tokens: int,
    num_selected_tokens: int,
    num_sequences: int,
    max_response_len: int,
) -> float:
    """The step-global denominator of the loss, from step-global counts (summed over ranks)."""
    if loss_agg == "token_mean":
        return float(max(num_valid_tokens, 1))
    if loss_agg == "token_mean_selected":
        return float(max(num_selected_tokens, 1))
    if loss_agg == "seq_mean_token_mean":
        return float(max(num_sequences, 1))
    if loss_agg == "token_sum_norm":
        return float(max(num_sequences, 1) * max_response_len)
    raise ValueError(
        f"loss_agg={loss_agg!r} is not one of: token_mean, token_mean_selected, seq_mean_token_mean, token_sum_norm"
    )


def _clipped_surrogate(
    log_ratio: torch.Tensor, adv: torch.Tensor, keep: torch.Tensor, algo: AlgorithmConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip surrogate with clip-higher and the optional dual clip: (pg [B, T],
    clipped [B, T], dual_clipped [B, T]); the flags count kept tokens only."""
    ratio = torch.exp(log_ratio)  # [B, T]
    pg1 = -adv * ratio  # [B, T]
    pg2 = -adv * ratio.clamp(1.0 - algo.clip_eps_low, 1.0 + algo.clip_eps_high)  # [B, T]
    pg = torch.maximum(pg1, pg2)  # [B, T]
    clipped = (pg2 > pg1) & keep  # [B, T]
    dual_clipped = torch.zeros_like(keep)
    if algo.dual_clip_c is not None:
        pg3 = -adv * algo.dual_clip_c  # [B, 1]
        dual = torch.minimum(pg, pg3)
        neg = (adv < 0).expand_as(pg)
        dual_clipped = neg & (pg > pg3) & keep
        pg = torch.where(neg, dual, pg)  # [B, T]
    return pg, clipped, dual_clipped


def _sequence_log_ratio(log_ratio: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence-level log-ratio, as a per-token tensor [B, T]: its value is the mean token
    log-ratio of the sequence (over its valid tokens), its gradient that of each token's own log-prob
    (the GSPO-token form: s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)])."""
    v = valid.to(log_ratio.dtype)
    seq = (log_ratio * v).sum(-1, keepdim=True) / v.sum(-1, keepdim=True).clamp(min=1)  # [B, 1]
    return (log_ratio - log_ratio.detach() + seq.detach()).clamp(max=20.0)  # [B, T]


def _surrogate(
    logprobs: torch.Tensor, log_ratio: torch.Tensor, adv: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor,
    algo: AlgorithmConfig, cov_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The per-token policy term of `algo.policy_loss` and its clip flags (kept tokens only):
    - ppo_clip: max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), r the token ratio (dual clip optional);
    - gspo: the same with r = s_i = exp(mean_t log r_t), one ratio per sequence, clipped per sequence;
    - cispo: -sg(min(r, cispo_max_weight)) A log pi: no token loses its gradient, the weight is capped;
    - clip_cov: ppo_clip, 0 (no gradient) on the tokens of cov_mask (actors.algo.covariance);
    - kl_cov: -A r unclipped, plus kl_cov_coef |log r| on the tokens of cov_mask."""
    if algo.policy_loss in ("clip_cov", "kl_cov"):
        if cov_mask is None:
            raise ValueError(f"algorithm.policy_loss={algo.policy_loss!r} needs the step's covariance selection")
        chosen = cov_mask.bool()
        if algo.policy_loss == "kl_cov":
            pg = -adv * torch.exp(log_ratio) + algo.kl_cov_coef * log_ratio.abs() * chosen
            return pg, torch.zeros_like(keep), torch.zeros_like(keep)
        pg, clipped, dual_clipped = _clipped_surrogate(log_ratio, adv, keep, algo)
        return pg * ~chosen, clipped, dual_clipped
    if algo.policy_loss == "gspo":
        return _clipped_surrogate(_sequence_log_ratio(log_ratio, valid), adv, keep, algo)
    if algo.policy_loss == "cispo":
        ratio = torch.exp(log_ratio).detach()  # [B, T]
        weight = ratio.clamp(max=algo.cispo_max_weight)
        return -adv * weight * logprobs, (ratio > algo.cispo_max_weight) & keep, torch.zeros_like(keep)
    return _clipped_surrogate(log_ratio, adv, keep, algo)


def mismatch_weight(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, valid: torch.Tensor, algo: AlgorithmConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The importance weight w = pi_old / pi_engine that corrects the engine / learner mismatch (no
    gradient), per token or per sequence (`mismatch_level`: the product of the sequence's token ratios),
    truncated at C = tis_cap (TIS) or zero above C (MIS, `mismatch_mode`): (w [B, T], limited [B, T],
    the tokens whose weight was truncated or masked)."""
    cap = float(algo.tis_cap or math.inf)
    log_w = (old_logprobs - rollout_logprobs).detach() * valid  # [B, T]
    if algo.mismatch_level == "sequence":
        log_w = log_w.sum(-1, keepdim=True).expand_as(log_w)  # [B, T]: the sequence's weight on each token
    w = torch.exp(log_w.clamp(-20.0, 20.0))  # [B, T]
    limited = (w > cap) & valid
    if algo.mismatch_mode == "mask":
        return torch.where(limited, torch.zeros_like(w), w), limited
    return w.clamp(max=cap), limited


def _kl_term(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    valid: torch.Tensor,
    keep: torch.Tensor,
    algo: AlgorithmConfig,
    num_kept_step: int | None,
    num_valid_step: int | None,
) -> torch.Tensor:
    """This micro-batch's share of the step's mean k3 KL to the reference, over the step's valid
    tokens (or its kept tokens when mask_kl_by_entropy)."""
    if algo.mask_kl_by_entropy:
        weight = keep.to(logprobs.dtype)  # [B, T]
        count = float(keep.sum()) if num_kept_step is None else float(num_kept_step)
    else:
        weight = valid.to(logprobs.dtype)  # [B, T]
        count = float(valid.sum()) if num_valid_step is None else float(num_valid_step)
    d = (ref_logprobs - logprobs).clamp(-20.0, 20.0)  # [B, T]
    k3 = torch.exp(d) - d - 1.0  # [B, T]
    return (k3 * weight).sum() / max(count, 1.0)


def _entropy_bonus(
    entropy: torch.Tensor | None, valid: torch.Tensor, keep: torch.Tensor, algo: AlgorithmConfig,
    num_kept_step: int | None, num_valid_step: int | None,
) -> torch.Tensor:  # fmt: skip
    """This micro-batch's share of the step's mean entropy (with gradient) over its valid tokens, or
    its kept ones (`entropy_bonus_tokens`); 0 when the bonus is off."""
    if algo.entropy_coef == 0:
        return torch.zeros((), dtype=torch.float32 if entropy is None else entropy.dtype)
    if entropy is None:
        raise ValueError("algorithm.entropy_coef > 0 needs the entropy (with its gradient) in policy_loss")
    kept = algo.entropy_bonus_tokens == "kept"
    mask, step_count = (keep, num_kept_step) if kept else (valid, num_valid_step)
    count = float(mask.sum()) if step_count is None else float(step_count)
    return (entropy * mask.to(entropy.dtype)).sum() / max(count, 1.0)


def policy_loss(  # over 60 lines: 40 are the docstring (the formula and the aggregation modes)
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    valid_mask: torch.Tensor,
    entropy_mask: torch.Tensor | None = None,
    algo: AlgorithmConfig | None = None,
    *,
    normalizer: float | None = None,
    num_kept_step: int | None = None,
    max_response_len: int | None = None,
    num_valid_step: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    cov_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The entropy-masked policy loss on the kept tokens: PPO-clip with clip-higher (DAPO), GSPO, CISPO,
    Clip-Cov or KL-Cov.

    logprobs: [B, T] learner log-probs with gradient; old_logprobs, ref_logprobs,
    rollout_logprobs: [B, T] without gradient; advantages: [B] (or [B, T]);
    valid_mask: [B, T] valid response tokens; entropy_mask: [B, T] kept tokens (None = all valid).

    entropy: [B, T] with gradient, needed when entropy_coef > 0; cov_mask: [B, T] the tokens Clip-Cov /
    KL-Cov act on (actors.algo.covariance.plan_covariance), needed for those.
    algo: the algorithm settings (policy_loss, clip_eps_low/high, dual_clip_c, tis_cap, mismatch_*,
    kl_coef, mask_kl_by_entropy, entropy_coef, loss_agg); None = the defaults of AlgorithmConfig.

    Per token (`_surrogate`), r = exp(logp - old): ppo_clip pg = max(-A r, -A clip(r, 1 - eps_low,
    1 + eps_high)), and for A < 0 with dual_clip_c, pg = min(pg, -A c); gspo the same with the
    sequence's ratio s = exp(mean log r) in place of r; cispo pg = -sg(min(r, cispo_max_weight)) A logp;
    clip_cov ppo_clip with the cov_mask tokens detached; kl_cov -A r + kl_cov_coef |log r| on cov_mask.
    With rollout_logprobs and tis_cap, pg is scaled by the mismatch weight (`mismatch_weight`: token or
    sequence, truncated or masked at tis_cap) that corrects the rollout engine / learner mismatch. The
    entropy bonus subtracts entropy_coef x the mean entropy over the step's valid (or kept) tokens.
    KL (k3 estimator, kl_coef > 0) is a separate term, kl_coef x the mean k3 over
    the step's valid tokens (`num_valid_step`; this micro-batch's when None), or over its kept tokens
    (`num_kept_step`) when mask_kl_by_entropy: it does not grow when the filter keeps fewer tokens,
    whatever `loss_agg` is.

    Aggregation (`loss_agg`): the loss of a micro-batch is sum(per-token terms) / normalizer,
    where the normalizer is step-global (see `loss_normalizer`), so micro-batch losses add up to
    the step's loss exactly. With normalizer=None it is computed from this micro-batch alone.
      token_mean_selected (default): mean over kept tokens, the paper's own code. Each kept token
        gets the gradient it would get in plain GRPO, so learning rates tuned for GRPO carry over;
        with rho = 1 it equals token_mean.
      token_mean: mean over all valid tokens (TRL/ms-swift). The gradient shrinks by about rho; Adam
        divides a constant scale out, so the step changes only where grad_clip or Adam's eps bite
        (algorithm.lr_scale is the knob that changes the step).
      seq_mean_token_mean: per-sequence mean over its kept tokens, then mean over sequences.
      token_sum_norm: sum over kept tokens / (num sequences x max_response_len) (Dr.GRPO).

    Returns (loss, metrics). Metrics are contributions: with the step-global `normalizer` and
    `num_kept_step` (kept tokens of the whole step), summing each metric over micro-batches and
    ranks gives the step's value; clipfrac, ratio_mean and approx_kl_old are per kept token,
    kl_ref per token the KL term applies to.
    """
    algo = algo or AlgorithmConfig()
    valid = valid_mask.bool()  # [B, T]
    keep = valid if entropy_mask is None else (entropy_mask.bool() & valid)  # [B, T]
    keep_f = keep.to(logprobs.dtype)  # [B, T]
    adv = advantages.to(logprobs.dtype)
    if adv.dim() == 1:
        adv = adv[:, None]  # [B, 1]

    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)  # [B, T]
    pg, clipped, dual_clipped = _surrogate(logprobs, log_ratio, adv, valid, keep, algo, cov_mask)  # [B, T] each
    w, limited = torch.ones_like(pg), torch.zeros_like(keep)
    if rollout_logprobs is not None and algo.tis_cap is not None:
        w, limited = mismatch_weight(old_logprobs, rollout_logprobs, valid, algo)
        pg = pg * w  # [B, T]

    per_token = pg * keep_f  # [B, T]
    kl_loss = torch.zeros((), device=logprobs.device, dtype=logprobs.dtype)
    if ref_logprobs is not None and algo.kl_coef > 0:
        kl_loss = _kl_term(logprobs, ref_logprobs, valid, keep, algo, num_kept_step, num_valid_step)
    bonus = _entropy_bonus(entropy, valid, keep, algo, num_kept_step, num_valid_step)

    if normalizer is None:
        normalizer = loss_normalizer(
            algo.loss_agg,
            num_valid_tokens=int(valid.sum()),
            num_selected_tokens=int(keep.sum()),
            num_sequences=int(valid.any(-1).sum()),
            max_response_len=max_response_len or valid.shape[-1],
        )
    if algo.loss_agg == "seq_mean_token_mean":
        per_seq = per_token.sum(-1) / keep_f.sum(-1).clamp(min=1)  # [B]
        loss = per_seq.sum() / normalizer
    else:
        loss = per_token.sum() / normalizer
    loss = loss + algo.kl_coef * kl_loss - algo.entropy_coef * bonus

    with torch.no_grad():
        low = torch.zeros_like(clipped) if algo.policy_loss == "cispo" else clipped & (adv < 0).expand_as(clipped)
        # fractions over kept tokens; with a step-global num_kept_step they add up over the step
        per_kept = 1.0 / max(float(keep.sum()) if num_kept_step is None else float(num_kept_step), 1.0)
        metrics = {
            "actor/loss": float(loss),
            "actor/clipfrac": float(clipped.sum()) * per_kept,
            # by bound: above 1 + eps_high (A > 0; CISPO: its weight cap), below 1 - eps_low (A < 0)
            "actor/clipfrac_high": float(clipped.sum() - low.sum()) * per_kept,
            "actor/clipfrac_low": float(low.sum()) * per_kept,
            "actor/dual_clipfrac": float(dual_clipped.sum()) * per_kept,
            "actor/ratio_mean": float((torch.exp(log_ratio) * keep_f).sum()) * per_kept,
            "actor/approx_kl_old": float(((-log_ratio) * keep_f).sum()) * per_kept,
            "actor/kl_ref": float(kl_loss),
            "actor/entropy_bonus": float(bonus),
            "mismatch/weight_mean": float((w * keep_f).sum()) * per_kept,
            "mismatch/limited_frac": float((limited & keep).sum()) * per_kept,
        }
    return loss, metrics
