"""The entropy-filtered GRPO core: pure torch, no Ray, no DeepSpeed, no process groups.

Method (Wang et al., "Beyond the 80/20 Rule", arXiv 2506.01939, on the DAPO recipe): the policy
gradient flows only through the `top_entropy_quantile` (rho) highest-entropy valid response tokens
of an optimizer step. Everything here takes tensors and plain numbers; whatever must be global
over an optimizer step (the entropy threshold, the token counts that normalise the loss) is
computed by the caller over the whole step and passed in, so results never depend on how the
step is split into micro-batches and ranks.

Shapes: B = sequences in a micro-batch (prompts x group size), T = response positions, V = vocab,
N = valid response tokens of the whole optimizer step.

Tie rule (exact selection): exactly k = ceil(rho * N) tokens are kept. Every token with entropy
strictly above the threshold tau is kept; tokens whose entropy equals tau are kept in the step's
canonical order - sequence order of the step's batch, then position - until k are kept. The
learner shards the batch contiguously over ranks and micro-batches, so a token's canonical rank
among the ties is a prefix count that the caller passes in as `tie_offset`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, TypeVar

import torch

from actors.config import AlgorithmConfig
from actors.logits import token_entropy, token_logprobs, token_logprobs_and_entropy

__all__ = [
    "EntropyThreshold",
    "LossAgg",
    "count_ties",
    "entropy_stats",
    "entropy_threshold",
    "group_advantages",
    "groups_with_signal",
    "merge_step_metrics",
    "mini_batches",
    "selection_values",
    "high_entropy_mask",
    "kth_largest",
    "loss_normalizer",
    "num_kept",
    "overlong_penalty",
    "policy_loss",
    "token_entropy",
    "token_logprobs",
    "token_logprobs_and_entropy",
]

T = TypeVar("T")
LossAgg = Literal["token_mean", "token_mean_selected", "seq_mean_token_mean", "token_sum_norm"]


# ---------------------------------------------------------------------------------------------
# Exact, global threshold
# ---------------------------------------------------------------------------------------------


def num_kept(num_valid: int, top_entropy_quantile: float) -> int:
    """k = ceil(rho * N), computed in decimal so that rho = 0.7, N = 10 gives 7, not 8."""
    if not 0.0 < top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile={top_entropy_quantile!r} is out of range: accepted is 0 < rho <= 1")
    if num_valid < 0:
        raise ValueError(f"num_valid={num_valid!r} must be >= 0")
    return min(num_valid, math.ceil(Decimal(repr(float(top_entropy_quantile))) * num_valid))


@dataclass(frozen=True)
class EntropyThreshold:
    """The global selection of one optimizer step.

    Keep a token iff entropy > tau, or entropy == tau and its canonical rank among the tied
    tokens is < ties_to_keep. Then exactly k = num_above + ties_to_keep tokens are kept.
    """

    tau: float  # entropy of the k-th highest token; +inf when nothing is kept
    k: int  # tokens kept over the whole step
    num_valid: int  # N: valid response tokens over the whole step
    num_above: int  # tokens with entropy strictly above tau
    ties_to_keep: int  # tokens with entropy == tau that are kept (the first ones in order)


def entropy_threshold(valid_entropies: torch.Tensor, top_entropy_quantile: float) -> EntropyThreshold:
    """Exact threshold over all valid entropies of an optimizer step.

    valid_entropies: [N] entropies of valid response tokens only (never padding or prompt).
    A selection, not a sort, so it works past the 2^24 elements where torch.quantile raises.
    rho = 1 keeps everything; N = 0 keeps nothing (tau = +inf).
    """
    values = selection_values(valid_entropies.detach().reshape(-1))  # [N]
    n = values.numel()
    k = num_kept(n, top_entropy_quantile)
    if k == 0:
        return EntropyThreshold(tau=math.inf, k=0, num_valid=n, num_above=0, ties_to_keep=0)
    tau = kth_largest(values, k)
    num_above = int((values > tau).sum())
    return EntropyThreshold(tau=tau, k=k, num_valid=n, num_above=num_above, ties_to_keep=k - num_above)


def kth_largest(values: torch.Tensor, k: int, method: str | None = None) -> float:
    """The exact k-th largest of a 1-D tensor (1 <= k <= numel).

    CUDA: topk(k, unsorted) then its minimum (1.45 ms over 67M values on an H200, where kthvalue
    takes 493 ms); elsewhere kthvalue of the (n - k + 1)-th smallest, a linear-time selection.
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    method = method or ("topk" if values.is_cuda else "kthvalue")
    if method == "topk":
        return float(torch.topk(values, k, sorted=False).values.min())
    if method == "kthvalue":
        return float(torch.kthvalue(values, n - k + 1).values)
    raise ValueError(f"method={method!r}: accepted are 'topk', 'kthvalue'")


def selection_values(entropy: torch.Tensor) -> torch.Tensor:
    """The dtype every comparison with tau is made in: float64 stays float64, the rest become float32
    (exact for float16/bfloat16). Threshold, masks and tie counts all use it, so the number kept is
    exactly k whatever the input dtype."""
    return entropy if entropy.dtype == torch.float64 else entropy.float()


def count_ties(entropy: torch.Tensor, valid_mask: torch.Tensor, tau: float) -> int:
    """Number of valid tokens whose entropy equals tau (to advance `tie_offset`)."""
    return int(((selection_values(entropy) == tau) & valid_mask.bool()).sum())


def high_entropy_mask(
    entropy: torch.Tensor,
    valid_mask: torch.Tensor,
    top_entropy_quantile: float | None = None,
    *,
    threshold: EntropyThreshold | None = None,
    tie_offset: int = 0,
) -> torch.Tensor:
    """Bool mask of kept tokens.

    entropy: [B, T] (any shape), valid_mask: same shape, True on valid response tokens.
    Give either `top_entropy_quantile` (the threshold is then taken over this tensor alone) or a
    global `threshold` with `tie_offset` = number of tied tokens that come earlier in the step's
    canonical order (earlier ranks and micro-batches).
    """
    valid = valid_mask.bool()  # [B, T]
    if (threshold is None) == (top_entropy_quantile is None):
        raise ValueError("give exactly one of top_entropy_quantile and threshold")
    if threshold is None:
        assert top_entropy_quantile is not None
        threshold = entropy_threshold(entropy[valid], top_entropy_quantile)
    if threshold.k >= threshold.num_valid:
        return valid.clone()  # rho = 1 (or everything selected): every valid token
    h = selection_values(entropy)  # [B, T]
    above = (h > threshold.tau) & valid  # [B, T]
    tied = (h == threshold.tau) & valid  # [B, T]
    # canonical order = row-major over [B, T]; rank of each tie among all ties of the step
    tie_rank = tie_offset + torch.cumsum(tied.reshape(-1).long(), 0).reshape(tied.shape) - 1
    return above | (tied & (tie_rank < threshold.ties_to_keep))


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    estimator: Literal["grpo", "drgrpo"] = "grpo",
    drop_zero_variance: bool = False,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages.

    rewards: [P*G], laid out group-major (the G samples of prompt p are contiguous).
    grpo: (r - mean_g) / (std_g + eps), std unbiased as in DeepSeekMath/verl.
    drgrpo: r - mean_g (Dr.GRPO drops the std division, which favours easy/hard prompts).
    Returns (advantages [P*G] fp32, keep [P*G] bool). keep is False for every member of a group
    whose rewards are all equal when drop_zero_variance (DAPO dynamic sampling): such groups
    carry no signal. Their advantage is exactly 0 either way.
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the number of rewards ({rewards.numel()})")
    r = rewards.float().reshape(-1, group_size)  # [P, G]
    mean = r.mean(-1, keepdim=True)  # [P, 1]
    centred = r - mean  # [P, G]
    # exact zero for constant groups, even where float rounding of the mean is not exact
    constant = (r == r[:, :1]).all(-1, keepdim=True)  # [P, 1]
    centred = torch.where(constant, torch.zeros_like(centred), centred)
    if estimator == "grpo":
        std = r.std(-1, keepdim=True, unbiased=True) if group_size > 1 else torch.zeros_like(mean)
        adv = torch.where(constant, torch.zeros_like(centred), centred / (std + eps))  # [P, G]
    elif estimator == "drgrpo":
        adv = centred
    else:
        raise ValueError(f"estimator={estimator!r} is not one of: 'grpo', 'drgrpo'")
    keep = torch.ones_like(adv, dtype=torch.bool)
    if drop_zero_variance:
        keep = ~constant.expand_as(adv)
    return adv.reshape(-1), keep.reshape(-1)


def groups_with_signal(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling: [P] bool, True for groups whose verifier scores are not all equal.

    scores: [P*G] verifier scores (not the shaped reward), group-major. A group whose completions
    all score the same has zero advantage everywhere and teaches nothing.
    """
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the number of scores ({scores.numel()})")
    s = scores.reshape(-1, group_size)  # [P, G]
    return ~(s == s[:, :1]).all(-1)


def mini_batches(groups: list[list[T]], prompts_per_step: int | None) -> list[list[T]]:
    """Split a rollout batch (a list of groups) into PPO mini-batches of whole groups, in order;
    each is one optimizer step. None = one mini-batch holding everything."""
    if not groups:
        return []
    size = len(groups) if prompts_per_step is None else prompts_per_step
    return [[x for g in groups[i : i + size] for x in g] for i in range(0, len(groups), size)]


# counts that add up over the optimizer steps of a rollout; every other number is averaged
_SUMMED = ("entropy/num_valid", "entropy/kept_tokens")


def merge_step_metrics(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """One record for several optimizer steps of a rollout: means of the values, sums of the token
    counts, the forking-token counts merged, and `actor/optimizer_steps`."""
    out: dict[str, Any] = {}
    keys = list(dict.fromkeys(k for m in steps for k in m))
    for key in keys:
        vals = [m[key] for m in steps if key in m]
        if key == "entropy/top_forking_tokens":
            counts: Counter[int] = Counter()
            for pairs in vals:
                for tok, c in pairs:
                    counts[int(tok)] += int(c)
            out[key] = [[t, c] for t, c in counts.most_common(max(len(v) for v in vals))]
        elif key == "entropy/forking_tokens_dropped":
            continue  # follows the merged top tokens, below
        elif key in _SUMMED:
            out[key] = float(sum(vals))
        else:
            out[key] = float(sum(vals)) / len(vals)
    if any("entropy/forking_tokens_dropped" in m for m in steps):
        # a token's drops are known in the steps where it was among the top kept tokens: summed there
        drops: Counter[int] = Counter()
        for m in steps:
            for tok, c in m.get("entropy/forking_tokens_dropped", []):
                drops[int(tok)] += int(c)
        out["entropy/forking_tokens_dropped"] = [[t, drops[t]] for t, _ in out.get("entropy/top_forking_tokens", [])]
    out["actor/optimizer_steps"] = float(len(steps))
    return out


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


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


def policy_loss(
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
) -> tuple[torch.Tensor, dict[str, float]]:
    """Entropy-masked PPO-clip surrogate with clip-higher (DAPO).

    logprobs: [B, T] learner log-probs with gradient; old_logprobs, ref_logprobs,
    rollout_logprobs: [B, T] without gradient; advantages: [B] (or [B, T]);
    valid_mask: [B, T] valid response tokens; entropy_mask: [B, T] kept tokens (None = all valid).

    algo: the algorithm settings (clip_eps_low/high, dual_clip_c, tis_cap, kl_coef,
    mask_kl_by_entropy, loss_agg); None = the defaults of AlgorithmConfig.

    Per token: r = exp(logp - old), pg = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)); for
    A < 0 and dual_clip_c, pg = min(pg, -A c). With rollout_logprobs and tis_cap, pg is scaled by
    the truncated importance weight min(exp(old - rollout), cap) that corrects the rollout engine /
    learner mismatch. KL (k3 estimator, kl_coef > 0) is a separate term, kl_coef x the mean k3 over
    the step's valid tokens (`num_valid_step`; this micro-batch's when None), or over its kept tokens
    (`num_kept_step`) when mask_kl_by_entropy: it does not grow when the filter keeps fewer tokens,
    whatever `loss_agg` is.

    Aggregation (`loss_agg`): the loss of a micro-batch is sum(per-token terms) / normalizer,
    where the normalizer is step-global (see `loss_normalizer`), so micro-batch losses add up to
    the step's loss exactly. With normalizer=None it is computed from this micro-batch alone.
      token_mean_selected (default): mean over kept tokens, the paper's own code. Each kept token
        gets the gradient it would get in plain GRPO, so learning rates tuned for GRPO carry over;
        with rho = 1 it equals token_mean.
      token_mean: mean over all valid tokens (TRL/ms-swift). The gradient shrinks by about rho,
        i.e. an implicitly lower learning rate.
      seq_mean_token_mean: per-sequence mean over its kept tokens, then mean over sequences.
      token_sum_norm: sum over kept tokens / (num sequences x max_response_len) (Dr.GRPO).

    Returns (loss, metrics). Metrics are contributions: with the step-global `normalizer` and
    `num_kept_step` (kept tokens of the whole step), summing each metric over micro-batches and
    ranks gives the step's value; clipfrac, ratio_mean and approx_kl_old are per kept token,
    kl_ref per token the KL term applies to.
    """
    algo = algo or AlgorithmConfig()
    loss_agg, clip_eps_low, clip_eps_high = algo.loss_agg, algo.clip_eps_low, algo.clip_eps_high
    dual_clip_c, tis_cap, kl_coef = algo.dual_clip_c, algo.tis_cap, algo.kl_coef
    valid = valid_mask.bool()  # [B, T]
    keep = valid if entropy_mask is None else (entropy_mask.bool() & valid)  # [B, T]
    keep_f = keep.to(logprobs.dtype)  # [B, T]
    adv = advantages.to(logprobs.dtype)
    if adv.dim() == 1:
        adv = adv[:, None]  # [B, 1]

    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    pg1 = -adv * ratio  # [B, T]
    pg2 = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)  # [B, T]
    pg = torch.maximum(pg1, pg2)  # [B, T]
    clipped = (pg2 > pg1) & keep  # [B, T]
    dual_clipped = torch.zeros_like(keep)
    if dual_clip_c is not None:
        pg3 = -adv * dual_clip_c  # [B, 1]
        dual = torch.minimum(pg, pg3)
        neg = (adv < 0).expand_as(pg)
        dual_clipped = neg & (pg > pg3) & keep
        pg = torch.where(neg, dual, pg)  # [B, T]
    if rollout_logprobs is not None and tis_cap is not None:
        tis = torch.exp((old_logprobs - rollout_logprobs).clamp(-20.0, 20.0)).clamp(max=tis_cap)
        pg = pg * tis.detach()  # [B, T]

    per_token = pg * keep_f  # [B, T]
    kl_loss = torch.zeros((), device=logprobs.device, dtype=logprobs.dtype)
    if ref_logprobs is not None and kl_coef > 0:
        kl_weight = keep_f if algo.mask_kl_by_entropy else valid.to(logprobs.dtype)  # [B, T]
        if algo.mask_kl_by_entropy:
            kl_count = float(keep.sum()) if num_kept_step is None else float(num_kept_step)
        else:
            kl_count = float(valid.sum()) if num_valid_step is None else float(num_valid_step)
        d = (ref_logprobs - logprobs).clamp(-20.0, 20.0)  # [B, T]
        k3 = torch.exp(d) - d - 1.0  # [B, T]
        kl_loss = (k3 * kl_weight).sum() / max(kl_count, 1.0)  # this micro-batch's share of the step mean

    if normalizer is None:
        normalizer = loss_normalizer(
            loss_agg,
            num_valid_tokens=int(valid.sum()),
            num_selected_tokens=int(keep.sum()),
            num_sequences=int(valid.any(-1).sum()),
            max_response_len=max_response_len or valid.shape[-1],
        )
    if loss_agg == "seq_mean_token_mean":
        per_seq = per_token.sum(-1) / keep_f.sum(-1).clamp(min=1)  # [B]
        loss = per_seq.sum() / normalizer
    else:
        loss = per_token.sum() / normalizer
    loss = loss + kl_coef * kl_loss

    with torch.no_grad():
        # fractions over kept tokens; with a step-global num_kept_step they add up over the step
        per_kept = 1.0 / max(float(keep.sum()) if num_kept_step is None else float(num_kept_step), 1.0)
        metrics = {
            "actor/loss": float(loss),
            "actor/clipfrac": float(clipped.sum()) * per_kept,
            "actor/dual_clipfrac": float(dual_clipped.sum()) * per_kept,
            "actor/ratio_mean": float((ratio * keep_f).sum()) * per_kept,
            "actor/approx_kl_old": float(((-log_ratio) * keep_f).sum()) * per_kept,
            "actor/kl_ref": float(kl_loss),
        }
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# log_entropy
# ---------------------------------------------------------------------------------------------


def _quantile(sorted_values: torch.Tensor, q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of an ascending-sorted 1-D tensor."""
    n = sorted_values.numel()
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(sorted_values[lo]) * (1 - frac) + float(sorted_values[hi]) * frac


def entropy_stats(
    entropy: torch.Tensor,
    valid_mask: torch.Tensor,
    kept_mask: torch.Tensor,
    threshold: EntropyThreshold | None = None,
    token_ids: torch.Tensor | None = None,
    top_tokens: int = 20,
) -> dict[str, float | list[list[int]]]:
    """The `log_entropy` metrics of one optimizer step.

    entropy, valid_mask, kept_mask, token_ids: [B, T] (or the step's tokens concatenated).
    Returns entropy/{mean,p50,p80,p90,p95,p99,threshold,kept_frac,kept_mean,dropped_mean,
    frac_below_0.01,frac_below_threshold} and, with token_ids, entropy/top_forking_tokens: the
    most frequent kept token ids as [[token_id, count], ...] and entropy/forking_tokens_dropped: how
    often each of those ids was dropped, [[token_id, count], ...] in the same order.
    """
    valid = valid_mask.bool()
    kept = kept_mask.bool() & valid
    h = entropy.detach().float()
    hv = h[valid]  # [N]
    n = hv.numel()
    out: dict[str, float | list[list[int]]] = {"entropy/num_valid": float(n)}
    if n == 0:
        return out
    hs = torch.sort(hv).values  # [N]
    tau = threshold.tau if threshold is not None else (float(h[kept].min()) if kept.any() else math.inf)
    hk = h[kept]
    hd = h[valid & ~kept]
    out.update(
        {
            "entropy/mean": float(hv.double().mean()),
            "entropy/p50": _quantile(hs, 0.50),
            "entropy/p80": _quantile(hs, 0.80),
            "entropy/p90": _quantile(hs, 0.90),
            "entropy/p95": _quantile(hs, 0.95),
            "entropy/p99": _quantile(hs, 0.99),
            "entropy/threshold": tau,
            "entropy/kept_frac": float(kept.sum()) / n,
            "entropy/kept_mean": float(hk.double().mean()) if hk.numel() else 0.0,
            "entropy/dropped_mean": float(hd.double().mean()) if hd.numel() else 0.0,
            "entropy/frac_below_0.01": float((hv < 0.01).sum()) / n,
            "entropy/frac_below_threshold": float((hv < tau).sum()) / n,
        }
    )
    if token_ids is not None:
        counts = Counter(token_ids[kept].tolist())
        top = counts.most_common(top_tokens)
        dropped = Counter(token_ids[valid & ~kept].tolist())
        out["entropy/top_forking_tokens"] = [[int(t), int(c)] for t, c in top]
        out["entropy/forking_tokens_dropped"] = [[int(t), int(dropped[t])] for t, _ in top]
    return out


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment: 0 up to max_len - buffer, then linear down to -penalty.

    lengths: [B] response lengths. Example: max_len 64, buffer 16, length 56 -> -(56 - 48) / 16 = -0.5.
    """
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_len - buffer)).clamp(min=0, max=buffer)  # [B]
    return -penalty * over / buffer
