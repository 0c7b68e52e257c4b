"""How every metric is reduced, in one table: pure Python.

A step's metrics are produced in parts and combined at two levels:
  parts  the parts of one optimizer step or one generation step: micro-batches and learner ranks
         (the learner), reward workers and dynamic-sampling rounds (the rollout side);
  steps  the optimizer steps of one rollout batch (PPO mini-batches x epochs).
`None` at a level means the metric is produced whole there and combining it is a bug: it raises,
as does a metric with no rule. Every producer combines through `combine_parts` / `merge_step_metrics`,
and a test checks that every metric the driver writes has a rule (`rule`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = ["RULES", "PREFIX_RULES", "Reduce", "Rule", "combine_parts", "merge_step_metrics", "rule"]


class Reduce(str, Enum):
    SUM = "sum"  # counts, and contributions already normalised by step-global counts
    MEAN = "mean"
    SAME = "same"  # identical in every part (computed from gathered data): the first is taken
    COUNTS = "counts"  # [[token_id, count], ...]: counts added per token, the most frequent kept


@dataclass(frozen=True)
class Rule:
    parts: Reduce | None  # over micro-batches and ranks / reward workers and sampling rounds
    steps: Reduce | None  # over the optimizer steps of one rollout batch


_LEARNER_SUM = Rule(Reduce.SUM, Reduce.MEAN)  # contributions: they add up within a step, steps average
_GLOBAL = Rule(Reduce.SAME, Reduce.MEAN)  # the same on every rank (step-global), steps average
_ROUNDS_SUM = Rule(Reduce.SUM, None)  # the rollout side: adds up over workers and rounds
_WHOLE = Rule(None, None)  # computed once per step over everything it saw

RULES: dict[str, Rule] = {
    # the learner (actors.algo.loss.policy_loss and the learner's step)
    "actor/loss": _LEARNER_SUM,
    "actor/clipfrac": _LEARNER_SUM,
    "actor/clipfrac_high": _LEARNER_SUM,
    "actor/clipfrac_low": _LEARNER_SUM,
    "actor/dual_clipfrac": _LEARNER_SUM,
    "actor/ratio_mean": _LEARNER_SUM,
    "actor/approx_kl_old": _LEARNER_SUM,
    "actor/kl_ref": _LEARNER_SUM,
    "actor/entropy_bonus": _LEARNER_SUM,
    "mismatch/weight_mean": _LEARNER_SUM,  # the engine/learner importance weight, per kept token
    "mismatch/limited_frac": _LEARNER_SUM,  # kept tokens whose weight was truncated or masked at tis_cap
    "actor/grad_norm": _GLOBAL,
    "actor/lr": _GLOBAL,
    "actor/optimizer_steps": _WHOLE,  # written by merge_steps
    "rollout/logprob_abs_diff_sum": Rule(Reduce.SUM, None),  # divided by entropy/num_valid at the step
    "rollout/logprob_abs_diff": Rule(None, Reduce.MEAN),
    # the entropy statistics (actors.algo.stats, identical on every rank)
    "entropy/kept_tokens": Rule(Reduce.SUM, Reduce.SUM),  # counted on each rank
    "entropy/num_valid": Rule(Reduce.SAME, Reduce.SUM),
    **{
        f"entropy/{name}": _GLOBAL
        for name in (
            "mean",
            "p50",
            "p80",
            "p90",
            "p95",
            "p99",
            "threshold",
            "kept_frac",
            "kept_mean",
            "dropped_mean",
            "frac_below_0.01",
            "frac_below_threshold",
        )  # fmt: skip
    },
    # the log-prob/advantage covariance over the step's kept tokens (actors.algo.covariance, the same on every rank)
    **{f"cov/{name}": _GLOBAL for name in ("mean", "p01", "p50", "p99", "max", "selected_frac")},
    "entropy/top_forking_tokens": Rule(Reduce.SAME, Reduce.COUNTS),
    "entropy/forking_tokens_dropped": Rule(Reduce.SAME, Reduce.COUNTS),  # follows the merged top tokens
    # the rollout side (actors.reward, actors.driver.sampling)
    "reward/errors": _ROUNDS_SUM,
    "reward/timeouts": _ROUNDS_SUM,
    "reward/mean": _WHOLE,
    "reward/trained_mean": _WHOLE,
    "reward/shaped_mean": _WHOLE,
    "response/length_mean": _WHOLE,
    "data/batch_crc": _WHOLE,
    "batch/rounds": _WHOLE,
    "batch/groups_kept": _WHOLE,
    "batch/groups_discarded": _WHOLE,
    "batch/sampling_bound_hit": _WHOLE,
    "batch/groups_generated": _WHOLE,  # every group the step generated (kept, discarded, and beyond the need)
    "batch/signal_share": _WHOLE,  # the step's generated groups that had signal (dynamic sampling or not)
    "rollout/generated_tokens": _WHOLE,  # tokens of the step's completions (a tree: every token generated, once)
    "batch/sequences": _WHOLE,
    "batch/truncated_masked": _WHOLE,
    "batch/empty_step": _WHOLE,
    "rollout/engine_replacements": _WHOLE,
    "weight_sync/remote_engines": _WHOLE,  # engines on another node than the learner (they fetch the bytes)
    "weight_sync/engine_load_s": _WHOLE,  # asynchronous mode: the slowest engine's load of the previous weights
    # tree rollouts (actors.driver.tree_rollout.TreeStats, over the step's rounds)
    **{
        f"tree/{name}": _WHOLE
        for name in (
            "generated_tokens",
            "unique_tokens",
            "flat_tokens",
            "leaves_mean",
            "rounds_mean",
            "pruned",
            "prefix_cache_hit",
            "branch_agreement",
        )  # fmt: skip
    },
    # the model being trained (with LoRA, the adapters are the trainable parameters)
    "model/trainable_params": _WHOLE,
    "model/params": _WHOLE,
    # asynchronous mode (actors.driver.stream): the step's groups and the stream's state when it took them
    "async/staleness_min": _WHOLE,
    "async/staleness_mean": _WHOLE,
    "async/staleness_max": _WHOLE,
    "async/version_span_max": _WHOLE,
    "async/dropped_stale": _WHOLE,
    "async/buffer_depth": _WHOLE,
    "async/in_flight": _WHOLE,
    # multi-turn episodes (actors.driver.episodes): counts add up over workers and rounds, rates per step
    **{
        f"env/{name}": _ROUNDS_SUM
        for name in (
            "episodes",
            "turns",
            "tool_calls",
            "tool_errors",
            "tool_timeouts",
            "truncated",
            "observation_tokens",
            "context_tokens",
        )  # fmt: skip
    },
    **{
        f"env/{name}": _WHOLE
        for name in ("turns_mean", "tool_calls_mean", "tool_error_rate", "truncated_frac", "observation_share")
    },
    "eval/reward_mean": _WHOLE,
    "eval/reward_stderr": _WHOLE,
    "eval/prompts": _WHOLE,
    "forking_tokens": _WHOLE,  # entropy/top_forking_tokens decoded
    "tracking/errors": _WHOLE,
    "tracking/dropped": _WHOLE,
}
# timing/<phase>: seconds; a phase timed in several rounds adds up
PREFIX_RULES: dict[str, Rule] = {"timing/": _ROUNDS_SUM}


def rule(key: str) -> Rule:
    """The reduction rule of a metric; KeyError naming it when the table has none."""
    found = RULES.get(key)
    if found is None:
        found = next((r for prefix, r in PREFIX_RULES.items() if key.startswith(prefix)), None)
    if found is None:
        raise KeyError(f"metric {key!r} has no reduction rule: add it to actors.algo.metrics.RULES")
    return found


def _merge_counts(lists: list[list[list[int]]], top: int) -> list[list[int]]:
    counts: Counter[int] = Counter()
    for pairs in lists:
        for tok, c in pairs:
            counts[int(tok)] += int(c)
    return [[t, c] for t, c in counts.most_common(top)]


def _reduce(key: str, how: Reduce | None, level: str, vals: list[Any]) -> Any:
    if how is None:
        raise ValueError(f"metric {key!r} is produced whole, not in {level} (actors.algo.metrics.RULES)")
    if how is Reduce.SUM:
        return float(sum(vals))
    if how is Reduce.MEAN:
        return float(sum(vals)) / len(vals)
    if how is Reduce.SAME:
        return vals[0]
    return _merge_counts(vals, max(len(v) for v in vals))


def combine_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from the parts of a step (micro-batches, ranks, reward workers, rounds), by each
    metric's `parts` rule; a metric missing from some parts is combined over those that have it."""
    keys = list(dict.fromkeys(k for p in parts for k in p))
    return {k: _reduce(k, rule(k).parts, "parts", [p[k] for p in parts if k in p]) for k in keys}


def merge_step_metrics(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """One record for the optimizer steps of a rollout batch, by each metric's `steps` rule, with
    `actor/optimizer_steps`. entropy/forking_tokens_dropped follows the merged top kept tokens: a
    token's drops are known in the steps where it was among the top kept tokens, and summed there."""
    keys = [k for k in dict.fromkeys(k for m in steps for k in m) if k != "entropy/forking_tokens_dropped"]
    out = {k: _reduce(k, rule(k).steps, "steps", [m[k] for m in steps if k in m]) for k in keys}
    if any("entropy/forking_tokens_dropped" in m for m in steps):
        merged = _merge_counts([m.get("entropy/forking_tokens_dropped", []) for m in steps], 10**9)
        drops = {t: c for t, c in merged}
        out["entropy/forking_tokens_dropped"] = [
            [t, drops.get(t, 0)] for t, _ in out.get("entropy/top_forking_tokens", [])
        ]
    out["actor/optimizer_steps"] = float(len(steps))
    return out
