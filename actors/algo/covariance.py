"""Clip-Cov and KL-Cov ("The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617), exact and
global over the optimizer step: pure torch.

The paper ties entropy collapse to tokens whose log-prob and advantage covary strongly. Per token
t of the step, with means over the step's kept tokens (all micro-batches, all learner ranks):

    cov_t = (A_t - mean A) * (logp_t - mean logp)        (A_t: its sequence's advantage)

Clip-Cov draws `clip_cov_ratio` x N of the tokens with lb < cov_t < ub that PPO-clip does not
already clip, uniformly at random, and detaches them (no gradient). KL-Cov takes the top
`kl_cov_ratio` x N tokens by cov_t and adds kl_cov_coef x |log r_t| to their (unclipped) term;
N = the step's kept tokens (with rho = 1: every valid token, as in the paper). Both are taken over
the whole step, in its canonical order (rank, micro-batch, row, position), so the tokens chosen do
not depend on how the step is split; the paper's code takes them per micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from actors.algo.entropy_filter import all_gather_1d, world_rank_size
from actors.common.config import AlgorithmConfig

__all__ = ["CovPlan", "covariance_stats", "plan_covariance", "select_covariance"]


@dataclass
class CovPlan:
    masks: list[torch.Tensor]  # bool [B_i, T_i] per local micro-batch: the tokens the method acts on
    stats: dict[str, Any] = field(default_factory=dict)  # cov/* metrics, the same on every rank


def select_covariance(cov: torch.Tensor, ppo_clipped: torch.Tensor, algo: AlgorithmConfig, seed: int) -> torch.Tensor:
    """Which of the step's N kept tokens (canonical order, [N]) the method acts on: bool [N].

    kl_cov: the k = max(1, floor(kl_cov_ratio N)) largest cov, ties to the earliest; clip_cov:
    min(max(1, floor(clip_cov_ratio N)), candidates) drawn from the candidates (lb < cov < ub, not
    clipped by PPO) by a permutation seeded with `seed`; nothing for the other methods."""
    n = cov.numel()
    chosen = torch.zeros(n, dtype=torch.bool, device=cov.device)
    if n == 0 or algo.policy_loss not in ("clip_cov", "kl_cov"):
        return chosen
    if algo.policy_loss == "kl_cov":
        k = max(1, math.floor(algo.kl_cov_ratio * n))
        # stable sort on -cov: equal values keep their canonical order, so ties go to the earliest
        order = torch.sort(-cov.double().cpu(), stable=True).indices[:k]
        chosen[order.to(cov.device)] = True
        return chosen
    candidates = torch.nonzero((cov > algo.clip_cov_lb) & (cov < algo.clip_cov_ub) & ~ppo_clipped).reshape(-1)
    take = min(max(1, math.floor(algo.clip_cov_ratio * n)), candidates.numel())
    perm = torch.randperm(candidates.numel(), generator=torch.Generator().manual_seed(seed), device="cpu")[:take]
    chosen[candidates[perm.to(candidates.device)]] = True
    return chosen


def covariance_stats(cov: torch.Tensor, chosen: torch.Tensor) -> dict[str, float]:
    """The step's covariance distribution over its kept tokens, and the share the method acted on."""
    if cov.numel() == 0:
        return {}
    c = cov.double()

    def q(p: float) -> float:  # nearest-rank quantile by selection (torch.quantile stops at 2^24 values)
        return float(torch.kthvalue(c.cpu(), max(1, math.ceil(p * c.numel()))).values)

    return {
        "cov/mean": float(c.mean()),
        "cov/p01": q(0.01),
        "cov/p50": q(0.5),
        "cov/p99": q(0.99),
        "cov/max": float(c.max()),
        "cov/selected_frac": float(chosen.sum()) / c.numel(),
    }


def plan_covariance(
    logps: list[torch.Tensor], olds: list[torch.Tensor], advantages: list[torch.Tensor], keeps: list[torch.Tensor],
    algo: AlgorithmConfig, seed: int,
) -> CovPlan:  # fmt: skip
    """The tokens Clip-Cov / KL-Cov act on, per local micro-batch, and the covariance statistics.

    logps, olds: this rank's micro-batches [B_i, T_i] (current and old log-probs, no gradient used);
    advantages: [B_i] (or [B_i, T_i]); keeps: the entropy filter's kept masks [B_i, T_i]. Every rank gathers the
    step's kept (logp, A, PPO-clipped) in canonical order and makes the same choice."""
    rank, _ = world_rank_size()
    flat_lp, flat_adv, flat_clip = [], [], []
    for lp, old, adv, keep in zip(logps, olds, advantages, keeps, strict=True):
        k = keep.bool()
        a = adv.to(torch.float64)
        a = (a[:, None] if a.dim() == 1 else a).expand_as(lp)  # [B, T] (per-turn advantages come as [B, T])
        ratio = torch.exp((lp.detach() - old).double().clamp(-20.0, 20.0))
        clipped = (a > 0) & (ratio > 1 + algo.clip_eps_high) | (a < 0) & (ratio < 1 - algo.clip_eps_low)
        flat_lp.append(lp.detach().double()[k])
        flat_adv.append(a[k])
        flat_clip.append(clipped[k].double())
    lp_by_rank = all_gather_1d(torch.cat(flat_lp))
    sizes = [t.numel() for t in lp_by_rank]
    lp_all = torch.cat(lp_by_rank)
    adv_all = torch.cat(all_gather_1d(torch.cat(flat_adv)))
    clip_all = torch.cat(all_gather_1d(torch.cat(flat_clip))).bool()
    if lp_all.numel() == 0:
        return CovPlan([torch.zeros_like(k, dtype=torch.bool) for k in keeps])
    cov = (adv_all - adv_all.mean()) * (lp_all - lp_all.mean())  # [N]
    chosen = select_covariance(cov, clip_all, algo, seed)
    mine = iter(torch.split(torch.split(chosen, sizes)[rank], [int(k.bool().sum()) for k in keeps]))
    masks = [torch.zeros_like(k, dtype=torch.bool).masked_scatter(k.bool(), next(mine)) for k in keeps]
    return CovPlan(masks, covariance_stats(cov, chosen))
