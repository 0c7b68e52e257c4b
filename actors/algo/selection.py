"""The exact, global top-rho selection of one optimizer step: pure torch.

Method (Wang et al., "Beyond the 80/20 Rule", arXiv 2506.01939, on the DAPO recipe): the policy
gradient flows only through the `top_entropy_quantile` (rho) highest-entropy valid response tokens
of an optimizer step. The threshold is taken by the caller over the whole step (all micro-batches,
all learner ranks: `actors.algo.entropy_filter`) and passed in, so the selection never depends on
how the step is split.

Shapes: B = sequences in a micro-batch (prompts x group size), T = response positions,
N = valid response tokens of the whole optimizer step.

Tie rule (exact selection): exactly k = ceil(rho * N) tokens are kept. Every token with entropy
strictly above the threshold tau is kept; tokens whose entropy equals tau are kept in the step's
canonical order - sequence order of the step's batch, then position - until k are kept. The
learner shards the batch contiguously over ranks and micro-batches, so a token's canonical rank
among the ties is a prefix count that the caller passes in as `tie_offset`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

import torch

__all__ = [
    "EntropyThreshold",
    "count_ties",
    "entropy_threshold",
    "high_entropy_mask",
    "kth_largest",
    "num_kept",
    "selection_values",
]


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
