"""The batches that cross roles, and the collation that builds the learner's micro-batches.

    RolloutEngine.generate -> Completion          one sampled response of one prompt
    driver/episodes        -> Completion          multi-turn: a trajectory, model turns and observations
    driver                 -> TrainSequence       a completion with its prompt and advantage
    Learner                -> MicroBatch          padded tensors of up to micro_batch_size sequences

Shapes: B = sequences in a micro-batch, L = longest prompt + response, T = longest response,
P = prompt length of one run of identical prompts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from actors.common.episode import Episode

__all__ = ["Completion", "TrainSequence", "TokenTrace", "MicroBatch", "collate", "prompt_runs"]


@dataclass(frozen=True)
class Completion:
    """One sample from the rollout engine.

    token_ids: [R] response token ids; logprobs: [R] the engine's log-probs of those tokens under
    the sampling distribution (after temperature/top-p); finish_reason: "stop" or "length";
    versions: (first, last) policy version of the weights that generated it (asynchronous mode; the
    two differ when new weights arrived mid-generation), None in synchronous mode.
    A multi-turn trajectory (`environment`): token_ids interleave the model's turns and the observations,
    exactly the ids the engine saw; model_mask [R] is True on the model's tokens (logprobs holds 0.0 on
    the others); text is the model's turns alone (what the verifiers score); episode its counts.
    entropy: [R] each position's entropy estimated from the engine's top-k log-probs (asked for by tree
    rollouts), else None; cached_tokens: the request's prompt tokens vLLM took from its prefix cache.
    """

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str | None = None
    versions: tuple[int, int] | None = None
    model_mask: list[bool] | None = None
    episode: Episode | None = None
    entropy: list[float] | None = None
    cached_tokens: int = 0


@dataclass(frozen=True)
class TrainSequence:
    """One sequence of an optimizer step, as the learner receives it.

    prompt_ids: [P]; response_ids: [R] (R >= 1); rollout_logprobs: [R] from the engine; advantage:
    the sequence's scalar advantage; weight: 0.0 marks a padding copy (an uneven shard over ranks)
    whose tokens count nowhere; old_logprobs: [R] the learner's log-probs before the rollout's first
    update (PPO mini-batches), None = this update's own (detached) log-probs are the old policy.
    sample_id: set on the few sequences the driver shows per step; their per-token entropy and kept
    flags come back as TokenTrace. loss_mask: [R] False on tokens that are context only (a multi-turn
    trajectory's observations): no loss, and the entropy filter never counts them; None = all tokens.
    token_advantages: [R] one advantage per token (a tree rollout's leaf under tree credit: a shared
    token's is the mean of the leaves below it); None = `advantage` on every token.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    advantage: float
    weight: float = 1.0
    old_logprobs: list[float] | None = None
    sample_id: int | None = None
    loss_mask: list[bool] | None = None
    token_advantages: list[float] | None = None

    def padding_copy(self) -> TrainSequence:
        return replace(self, weight=0.0)


@dataclass(frozen=True)
class TokenTrace:
    """What the learner saw of one sampled sequence in an optimizer step: entropy [R] of each response
    token (at the sampling temperature) and kept [R], whether the step's filter gave it gradient."""

    sample_id: int
    entropy: list[float]
    kept: list[bool]


@dataclass
class MicroBatch:
    """Tensors of one forward/backward, on the learner's device.

    runs:           [(start, stop, prompt_ids [P])] runs of identical consecutive prompts (shared forward)
    resp_len:       [B] response lengths
    input_ids:      [B, L] prompt + response, right-padded (whole-sequence forward)
    attention_mask: [B, L]
    gather_pos:     [B, T] position in input_ids whose hidden state predicts response token j
    resp_ids:       [B, T] response tokens, right-padded
    valid:          [B, T] True on real response tokens of non-padding sequences that get a loss
                    (not a trajectory's observations)
    rollout_lp:     [B, T] the engine's log-probs
    adv:            [B] advantages (fp32); [B, T] when a sequence has per-token advantages
    old_lp:         [B, T] old-policy log-probs, or None (the update's own log-probs, detached)
    """

    runs: list[tuple[int, int, torch.Tensor]]
    resp_len: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    gather_pos: torch.Tensor
    resp_ids: torch.Tensor
    valid: torch.Tensor
    rollout_lp: torch.Tensor
    adv: torch.Tensor
    old_lp: torch.Tensor | None = None


def prompt_runs(prompts: list[list[int]]) -> list[tuple[int, int]]:
    """[start, stop) of each run of identical consecutive prompts (a group, or part of one)."""
    runs: list[tuple[int, int]] = []
    for i, p in enumerate(prompts):
        if runs and prompts[runs[-1][0]] == p:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def collate(seqs: list[TrainSequence], micro_batch_size: int, device: torch.device | str) -> Iterator[MicroBatch]:
    """Contiguous micro-batches of at most micro_batch_size sequences, in order."""
    for start in range(0, len(seqs), micro_batch_size):
        chunk = seqs[start : start + micro_batch_size]
        width = max(len(s.prompt_ids) + len(s.response_ids) for s in chunk)
        t_resp = max(len(s.response_ids) for s in chunk)
        b = len(chunk)
        input_ids = torch.zeros(b, width, dtype=torch.long)
        attn = torch.zeros(b, width, dtype=torch.long)
        resp_ids = torch.zeros(b, t_resp, dtype=torch.long)
        valid = torch.zeros(b, t_resp, dtype=torch.bool)
        rollout_lp = torch.zeros(b, t_resp)
        has_old = all(s.old_logprobs is not None for s in chunk)
        old_lp = torch.zeros(b, t_resp)
        gather_pos = torch.zeros(b, t_resp, dtype=torch.long)
        per_token = any(s.token_advantages is not None for s in chunk)
        adv = torch.tensor([s.advantage for s in chunk], dtype=torch.float32)
        if per_token:
            adv = adv[:, None].repeat(1, t_resp)  # [B, T]
        for i, s in enumerate(chunk):
            p, r = s.prompt_ids, s.response_ids
            input_ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            attn[i, : len(p) + len(r)] = 1
            resp_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            valid[i, : len(r)] = s.weight > 0
            if s.loss_mask is not None:
                valid[i, : len(r)] &= torch.tensor(s.loss_mask[: len(r)], dtype=torch.bool)
            rollout_lp[i, : len(r)] = torch.tensor(s.rollout_logprobs[: len(r)])
            if s.old_logprobs is not None:
                old_lp[i, : len(r)] = torch.tensor(s.old_logprobs[: len(r)])
            gather_pos[i, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
            if s.token_advantages is not None:
                adv[i, : len(r)] = torch.tensor(s.token_advantages[: len(r)], dtype=torch.float32)
        runs = prompt_runs([s.prompt_ids for s in chunk])
        yield MicroBatch(
            runs=[(a, z, torch.tensor(chunk[a].prompt_ids, dtype=torch.long, device=device)) for a, z in runs],
            resp_len=torch.tensor([len(s.response_ids) for s in chunk], device=device),
            input_ids=input_ids.to(device),
            attention_mask=attn.to(device),
            gather_pos=gather_pos.to(device),
            resp_ids=resp_ids.to(device),
            valid=valid.to(device),
            rollout_lp=rollout_lp.to(device),
            adv=adv.to(device),
            old_lp=old_lp.to(device) if has_old else None,
        )
