"""One step's rollout: sample prompts, generate, verify - in rounds until the step holds enough groups
with signal (DAPO dynamic sampling) - then the advantages and the training sequences.

A group is kept when its verifier scores are not all equal (`actors.algo.advantages.groups_with_signal`); the
shaped reward (overlong penalty) only enters the advantages. Each round draws the next
`data.prompts_per_step` prompts from the sampler, so the data order stays a function of the
sampler's position (checkpointed) and of the scores; the step keeps the first
`data.prompts_per_step` groups with signal, in order. When `dynamic_sampling_max_rounds` rounds do
not fill the step, it trains on what it has and says so (`batch/sampling_bound_hit`).
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

from actors.algo.advantages import group_advantages, groups_with_signal, overlong_penalty
from actors.algo.metrics import combine_parts
from actors.common.batch import Completion, TokenTrace, TrainSequence
from actors.common.config import JobConfig
from actors.driver.data import Example, PromptSampler, render_prompt
from actors.driver.episodes import episode_rates, generate_groups
from actors.driver.tool_format import prompt_tools

log = logging.getLogger("forkrl.sampling")

__all__ = [
    "Group",
    "StepRollout",
    "batch_fingerprint",
    "collect",
    "training_groups",
    "sample_records",
    "score_groups",
    "forking_tokens",
]

SAMPLE_TOKENS = 512  # most tokens of one sampled completion in a step record (the record stays small)
SAMPLE_PROMPT_CHARS = 2000  # most characters of its prompt (the end, where the question is)


@dataclass(frozen=True)
class Group:
    """One prompt's G completions and their verifier scores."""

    example: Example
    prompt_ids: list[int]
    completions: list[Completion]
    scores: list[float]
    tree: Any = None  # rollout.tree: the group's tree (actors.algo.tree.Tree); its leaves are the completions


@dataclass
class StepRollout:
    groups: list[Group]  # the groups the step trains on, in order
    metrics: dict[str, Any] = field(default_factory=dict)


def batch_fingerprint(examples: list[Any]) -> int:
    """CRC32 of a batch's prompts and answers: equal fingerprints = the same data, same order."""
    return zlib.crc32(json.dumps([[ex.prompt, ex.answer] for ex in examples]).encode())


def collect(
    cfg: JobConfig, sampler: PromptSampler, tokenizer: Any, rollout: Any, rewards: Any, learners: Any = None
) -> StepRollout:
    """Rounds of sample -> generate -> verify until the step has data.prompts_per_step groups to train on
    (with rollout.tree, each group grown as a tree: actors.driver.tree_rollout; learners: for its
    entropy: learner)."""
    from actors.driver.tree_rollout import TreeStats, grow_groups, leaf_completions

    algo, need, g = cfg.algorithm, cfg.data.prompts_per_step, cfg.rollout.group_size
    rounds_max = algo.dynamic_sampling_max_rounds if algo.dynamic_sampling else 1
    kept: list[Group] = []
    seen: list[Example] = []
    scores_all: list[float] = []
    lengths_all: list[int] = []
    # each round's timings and verifier counts, added up by actors.algo.metrics
    zero = ("timing/sample", "timing/generate", "timing/verify", "reward/errors", "reward/timeouts")
    parts: list[dict[str, Any]] = [dict.fromkeys(zero, 0.0)]
    rounds = discarded = with_signal = 0
    tools = prompt_tools(cfg, tokenizer)
    trees: list[Any] = []
    tree_stats = TreeStats()
    while rounds < rounds_max and len(kept) < need:
        rounds += 1
        t0 = time.perf_counter()
        examples = sampler.next()
        prompts = [render_prompt(tokenizer, ex, cfg.data, tools) for ex in examples]
        t1 = time.perf_counter()
        if cfg.rollout.tree is not None:
            trees, stats = grow_groups(cfg, prompts, rollout, learners)
            tree_stats.add(stats)
            outs, episode_counts = [leaf_completions(t, tokenizer) for t in trees], dict[str, float]()
        else:
            outs, episode_counts = generate_groups(cfg, examples, prompts, g, rollout, rewards, tokenizer)
        t2 = time.perf_counter()
        scores, reward_metrics = score_groups(rewards, examples, outs)
        t3 = time.perf_counter()
        parts.append({
            "timing/sample": t1 - t0, "timing/generate": t2 - t1, "timing/verify": t3 - t2, **reward_metrics,
            **episode_counts,
        })  # fmt: skip
        seen += examples
        scores_all += scores
        lengths_all += [len(c.token_ids) for group in outs for c in group]
        ends = [sum(len(o) for o in outs[: i + 1]) for i in range(len(outs))]  # tree groups may be smaller
        per_group = [scores[end - len(o) : end] for o, end in zip(outs, ends, strict=True)]
        for i, (ex, p, group, sc) in enumerate(zip(examples, prompts, outs, per_group, strict=True)):
            signal = bool(groups_with_signal(torch.tensor(sc), len(sc))[0])
            with_signal += signal
            if signal or not algo.dynamic_sampling:
                kept.append(Group(ex, p, group, sc, trees[i] if trees else None))
            else:
                discarded += 1
    bound_hit = len(kept) < need
    if bound_hit and algo.dynamic_sampling:
        log.warning(
            "dynamic sampling: %d of %d groups with signal after %d rounds (algorithm.dynamic_sampling_max_rounds)",
            len(kept), need, rounds,
        )  # fmt: skip
    kept = kept[:need]
    len_sum = sum(lengths_all)
    lengths = torch.tensor(lengths_all, dtype=torch.float32)
    m = combine_parts(parts)
    m.update(episode_rates(m))
    m.update(
        {
            "data/batch_crc": batch_fingerprint(seen),
            "reward/mean": float(torch.tensor(scores_all).mean()),  # every completion generated this step
            "reward/trained_mean": float(torch.tensor([s for gr in kept for s in gr.scores]).mean()) if kept else 0.0,
            "response/length_mean": float(lengths.mean()),
            "batch/rounds": float(rounds),
            "batch/groups_kept": float(len(kept)),
            "batch/groups_discarded": float(discarded),
            "batch/groups_generated": float(len(seen)),
            "batch/sampling_bound_hit": float(bound_hit and algo.dynamic_sampling),
            "batch/signal_share": (with_signal / len(seen)) if seen else 0.0,  # groups with signal, of all
            # every token the engines generated for the step (a tree's pruned ones too)
            "rollout/generated_tokens": float(tree_stats.generated if cfg.rollout.tree is not None else len_sum),
            **(tree_stats.metrics() if cfg.rollout.tree is not None else {}),
        }
    )
    return StepRollout(kept, m)


def score_groups(
    rewards: Any, examples: list[Example], outs: list[list[Completion]]
) -> tuple[list[float], dict[str, float]]:
    """The verifiers' score of each completion (of a trajectory: its model turns), plus an episode's own
    reward terms (the observations' and environment.call_reward)."""
    items = [(c.text, ex.answer, ex.prompt) for ex, group in zip(examples, outs, strict=True) for c in group]
    scores, metrics = rewards.score(items)
    extra = [c.episode.reward if c.episode is not None else 0.0 for group in outs for c in group]
    return [s + e for s, e in zip(scores, extra, strict=True)], metrics


def training_groups(cfg: JobConfig, groups: list[Group]) -> tuple[list[list[TrainSequence]], dict[str, float]]:
    """Advantages (from the shaped reward) and the sequences of each group that enter the loss."""
    from actors.driver.tree_rollout import tree_training_groups

    if cfg.rollout.tree is not None:
        return tree_training_groups(cfg, groups)
    algo, g = cfg.algorithm, cfg.rollout.group_size
    max_new = cfg.environment.max_tokens if cfg.environment is not None else cfg.rollout.max_new_tokens
    if not groups:
        return [], {"reward/shaped_mean": 0.0, "batch/sequences": 0.0, "batch/truncated_masked": 0.0}
    raw = torch.tensor([s for gr in groups for s in gr.scores])  # [P*G]
    lengths = torch.tensor([len(c.token_ids) for gr in groups for c in gr.completions])  # [P*G]
    shaped = raw + overlong_penalty(lengths, max_new, algo.overlong_buffer, algo.overlong_penalty)  # [P*G]
    adv, _ = group_advantages(shaped, g, algo.estimator)  # [P*G]
    out: list[list[TrainSequence]] = []
    masked = 0
    for i, gr in enumerate(groups):
        seqs: list[TrainSequence] = []
        for j, c in enumerate(gr.completions):
            if not c.token_ids:
                continue
            if algo.overlong_mask and c.finish_reason == "length":
                masked += 1  # truncated: its reward still shapes the group's baseline, its tokens get no loss
                continue
            # the first trained completion of each of the first groups is shown (tracking.samples_per_step)
            shown = i * g + j if not seqs and i < cfg.tracking.samples_per_step else None
            seqs.append(TrainSequence(gr.prompt_ids, c.token_ids, c.logprobs, float(adv[i * g + j]), sample_id=shown,
                                      loss_mask=c.model_mask))  # fmt: skip
        if seqs:
            out.append(seqs)
    n = sum(len(s) for s in out)
    return out, {
        "reward/shaped_mean": float(shaped.mean()),
        "batch/sequences": float(n),
        "batch/truncated_masked": float(masked),
    }


def sample_records(
    groups: list[Group], traces: list[TokenTrace], tokenizer: Any, group_size: int
) -> list[dict[str, Any]]:
    """The step's sampled completions as the dashboard and the trackers show them: the prompt, the
    verifier's reward, and per response token its text, entropy and whether the filter kept it
    (at most SAMPLE_TOKENS tokens; `truncated` says when there were more); a tree group's tree."""
    from actors.driver.tree_rollout import tree_record

    out = []
    for t in traces:
        gr = groups[t.sample_id // group_size]
        c = gr.completions[t.sample_id % group_size]
        n = min(len(c.token_ids), SAMPLE_TOKENS)
        prompt = gr.example.prompt if isinstance(gr.example.prompt, str) else json.dumps(gr.example.prompt)
        out.append({
            "prompt": prompt[-SAMPLE_PROMPT_CHARS:],
            "answer": str(gr.example.answer)[:SAMPLE_PROMPT_CHARS],
            "reward": float(gr.scores[t.sample_id % group_size]),
            "tokens": [tokenizer.decode([tid]) for tid in c.token_ids[:n]],
            "entropy": [round(float(h), 4) for h in t.entropy[:n]],
            "kept": [int(k) for k in t.kept[:n]],
            "truncated": len(c.token_ids) > n,
            # a trajectory's observation tokens (context, never trained): 1 where the environment wrote
            **({"observation": [int(not k) for k in c.model_mask[:n]]} if c.model_mask is not None else {}),
            # a tree rollout's group: its tree, this sample one of its leaves
            **({"tree": tree_record(gr.tree, gr.scores, tokenizer, gr.tree.leaves()[t.sample_id % group_size])}
               if gr.tree is not None else {}),
        })  # fmt: skip
    return out


def forking_tokens(metrics: dict[str, Any], tokenizer: Any) -> list[dict[str, Any]]:
    """The step's most frequent kept tokens, decoded: [{"id", "text", "kept", "dropped"}, ...] from
    entropy/top_forking_tokens and entropy/forking_tokens_dropped (empty without log_entropy)."""
    dropped = {int(t): int(c) for t, c in metrics.get("entropy/forking_tokens_dropped", [])}
    return [
        {"id": int(t), "text": tokenizer.decode([int(t)]), "kept": int(c), "dropped": dropped.get(int(t), 0)}
        for t, c in metrics.get("entropy/top_forking_tokens", [])
    ]
