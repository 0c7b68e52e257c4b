"""The `log_entropy` statistics of one optimizer step: pure torch."""

from __future__ import annotations

import math
from collections import Counter

import torch

from actors.algo.selection import EntropyThreshold

__all__ = ["entropy_stats"]


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
