"""Group-relative advantages, DAPO's dynamic-sampling test and its overlong shaping: pure torch.

Shapes: P = prompts, G = completions per prompt (group size); rewards and scores are [P*G],
group-major (the G samples of prompt p are contiguous).
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["group_advantages", "groups_with_signal", "overlong_penalty"]


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


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment: 0 up to max_len - buffer, then linear down to -penalty.

    lengths: [B] response lengths. Example: max_len 64, buffer 16, length 56 -> -(56 - 48) / 16 = -0.5.
    """
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_len - buffer)).clamp(min=0, max=buffer)  # [B]
    return -penalty * over / buffer
