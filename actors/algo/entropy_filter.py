"""One global entropy selection per optimizer step, over all micro-batches and learner ranks.

The learner computes the entropy of every micro-batch first (no gradient), then calls
`plan_step`: valid entropies are gathered from every rank, every rank computes the same exact
threshold from them (`actors.algo.selection.entropy_threshold`), tie counts are exchanged so each rank knows
how many tied tokens precede it, and the step-global token counts that normalise the loss are
summed. The masks it returns are exactly those of the unsplit batch.

Ranks must hold contiguous shards of the step's batch, in rank order, and micro-batches must be
contiguous within a rank; that is what makes (rank, micro-batch, row, position) the step's
canonical order for the tie rule. `LearnerGroup` shards that way. Collectives run over the
default process group: the learners form exactly one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from actors.algo.selection import EntropyThreshold, count_ties, entropy_threshold, high_entropy_mask, selection_values
from actors.algo.stats import entropy_stats

__all__ = ["StepPlan", "all_gather_1d", "plan_step", "selection_keys", "world_rank_size"]


@dataclass
class StepPlan:
    threshold: EntropyThreshold
    masks: list[torch.Tensor]  # one bool [B_i, T_i] mask of kept tokens per local micro-batch
    num_valid: int  # step-global valid response tokens
    num_kept: int  # step-global kept tokens (= threshold.k)
    num_sequences: int  # step-global sequences
    stats: dict[str, Any] = field(default_factory=dict)  # log_entropy metrics (identical on every rank)


def world_rank_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_1d(x: torch.Tensor) -> list[torch.Tensor]:
    """All-gather 1-D tensors of different lengths, in rank order."""
    _, world = world_rank_size()
    if world == 1:
        return [x]
    n = torch.tensor([x.numel()], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return [o[: int(s)] for o, s in zip(out, sizes, strict=True)]


def selection_keys(
    entropies: list[torch.Tensor], valid_masks: list[torch.Tensor], gathered: list[torch.Tensor], how: str, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """What the top-rho selection ranks, per local micro-batch [B_i, T_i] and per rank [n_r]:
    highest = the entropy; lowest = minus the entropy; random = a uniform draw per valid token of the
    step, made in canonical order from `seed` (so every rank draws the same N numbers and the split of
    the batch does not change which tokens are kept)."""
    if how == "highest":
        return entropies, gathered
    if how == "lowest":
        return [-h for h in entropies], [-g for g in gathered]
    if how != "random":
        raise ValueError(f"token selection {how!r} is not one of highest, random, lowest")
    rank, _ = world_rank_size()
    n = sum(g.numel() for g in gathered)
    draws = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, device="cpu")
    draws = draws.to(device=gathered[0].device, dtype=gathered[0].dtype)
    per_rank = list(torch.split(draws, [g.numel() for g in gathered]))
    mine = iter(torch.split(per_rank[rank], [int(m.bool().sum()) for m in valid_masks]))
    keys = [
        torch.zeros_like(selection_values(h)).masked_scatter(m.bool(), next(mine))
        for h, m in zip(entropies, valid_masks, strict=True)
    ]
    return keys, per_rank


def plan_step(
    entropies: list[torch.Tensor],
    valid_masks: list[torch.Tensor],
    top_entropy_quantile: float,
    token_ids: list[torch.Tensor] | None = None,
    log_entropy: bool = False,
    selection: str = "highest",
    seed: int = 0,
) -> StepPlan:
    """Global threshold, per-micro-batch masks and global counts for one optimizer step.

    entropies, valid_masks (and token_ids): this rank's micro-batches in order, each [B_i, T_i].
    selection: which rho share is kept (`selection_keys`); seed: the random selection's draw.
    """
    rank, world = world_rank_size()
    device = entropies[0].device  # every tensor of a collective lives here (NCCL takes no CPU tensor)
    local = torch.cat(
        [selection_values(h[m.bool()]).reshape(-1) for h, m in zip(entropies, valid_masks, strict=True)]
    )  # [n_r]
    entropy_by_rank = all_gather_1d(local)
    everything = torch.cat(entropy_by_rank)  # [N] in canonical order
    # the same exact top-k and tie rule whatever is ranked: entropy, minus entropy or a random draw
    keys, gathered = selection_keys(entropies, valid_masks, entropy_by_rank, selection, seed)
    keys_all = everything if selection == "highest" else torch.cat(gathered)  # no second copy of the step
    threshold = entropy_threshold(keys_all, top_entropy_quantile)

    # ties in earlier ranks come first in the canonical order
    tie_counts = [int((g == threshold.tau).sum()) for g in gathered]
    offset = sum(tie_counts[:rank])
    masks = []
    for h, m in zip(keys, valid_masks, strict=True):
        masks.append(high_entropy_mask(h, m, threshold=threshold, tie_offset=offset))
        offset += count_ties(h, m, threshold.tau)

    # sequences with at least one valid token (padding rows of an uneven shard do not count)
    num_seqs = torch.tensor([sum(int(m.bool().any(-1).sum()) for m in valid_masks)], dtype=torch.long, device=device)
    if world > 1:
        dist.all_reduce(num_seqs)

    stats: dict[str, Any] = {}
    if log_entropy:
        # statistics over the whole step; kept flags rebuilt in canonical order from the threshold
        kept_all = high_entropy_mask(keys_all, torch.ones_like(keys_all, dtype=torch.bool), threshold=threshold)
        ids_all = None
        if token_ids is not None:
            ids_local = torch.cat([t[m.bool()].reshape(-1) for t, m in zip(token_ids, valid_masks, strict=True)])
            ids_all = torch.cat(all_gather_1d(ids_local.long()))
        # the entropy threshold where entropy ranks; else the lowest kept entropy (entropy_stats' default)
        stats = entropy_stats(
            everything, torch.ones_like(kept_all), kept_all, threshold if selection == "highest" else None, ids_all
        )
    return StepPlan(
        threshold=threshold,
        masks=masks,
        num_valid=threshold.num_valid,
        num_kept=threshold.k,
        num_sequences=int(num_seqs),
        stats=stats,
    )
