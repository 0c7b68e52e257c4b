"""Forking-token tree rollouts (`rollout.tree`): each prompt's group grown as a tree on the engines, and
the training sequences of its leaves.

A round of growth, for every group still short of `rollout.group_size` leaves, at once:
  1. pick the branch points: the `branch_points` highest-entropy positions of the group where a branch
     can start (`actors.algo.tree.plan_branches`); the entropy is the engine's estimate from its top-k
     log-probs, or the learner's exact one (a forward pass over the round's new leaves);
  2. one batched generate call: per branch point, `branches` continuations of prompt + the path's tokens
     before the forking token (which is re-drawn). The shared prefix is the start of each request's
     prompt, so vLLM serves it from its prefix cache instead of computing it again;
  3. with `prune_lookahead` L, the call stops after L tokens; a continuation whose L tokens repeat a path
     already in the tree from the same fork is dropped (LATR), and the others are continued in a second
     call.
Growth stops at the leaf count, the token budget, or `max_rounds`.

The leaves are the group's completions (their outcome rewards give the advantages); training follows
`rollout.tree.credit` (`actors.algo.tree.flatten`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors.algo.tree import Branch, Node, Tree, agreement, apply_branch, branch_points, candidates, plan_branches
from actors.common.batch import Completion, TrainSequence
from actors.common.config import JobConfig
from actors.common.tree_config import TreeConfig

__all__ = ["TreeStats", "grow_groups", "leaf_completions", "tree_record", "tree_sequences", "tree_training_groups"]

TREE_TOKENS = 1024  # most tokens of a group's tree in a step record (the dashboard draws it)


@dataclass
class TreeStats:
    """What growing a round of groups cost and found (added up over a step's rounds)."""

    generated: int = 0  # tokens the engines generated, pruned ones included
    unique: int = 0  # tokens of the trees (each shared prefix once)
    flat: int = 0  # tokens of the leaves as separate sequences
    leaves: int = 0
    groups: int = 0
    rounds: int = 0
    pruned: int = 0
    branch_prompt_tokens: int = 0  # prompt tokens of the branch requests (prompt + shared prefix)
    branch_cached_tokens: int = 0  # of those, served from vLLM's prefix cache
    agreements: list[float] = field(default_factory=list)  # per group and round (entropy: learner)

    def add(self, other: TreeStats) -> None:
        """Add another round's counts to these."""
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)

    def metrics(self) -> dict[str, float]:
        m = {
            "tree/generated_tokens": float(self.generated),
            "tree/unique_tokens": float(self.unique),
            "tree/flat_tokens": float(self.flat),
            "tree/leaves_mean": self.leaves / max(self.groups, 1),
            "tree/rounds_mean": self.rounds / max(self.groups, 1),
            "tree/pruned": float(self.pruned),
            "tree/prefix_cache_hit": self.branch_cached_tokens / max(self.branch_prompt_tokens, 1),
        }
        if self.agreements:
            m["tree/branch_agreement"] = sum(self.agreements) / len(self.agreements)
        return m


def _node(c: Completion, entropy: list[float] | None = None) -> Node:
    ent = c.entropy if entropy is None else entropy
    return Node(-1, tuple(c.token_ids), tuple(c.logprobs), tuple(ent or ()), c.finish_reason)


def _joined(first: Completion, rest: Completion) -> Completion:
    """A lookahead's first tokens and their continuation, as one completion."""
    return Completion(
        first.token_ids + rest.token_ids, first.logprobs + rest.logprobs, first.text + rest.text, rest.finish_reason,
        entropy=(first.entropy or []) + (rest.entropy or []),
    )  # fmt: skip


def _learner_entropy(learners: Any, prompts: list[list[int]], paths: list[list[int]]) -> list[list[float]]:
    """The learner's entropy of every token of each path (after its prompt)."""
    seqs = [TrainSequence(p, path, [0.0] * len(path), 0.0) for p, path in zip(prompts, paths, strict=True)]
    return learners.score(seqs, entropy=True) if seqs else []


def grow_groups(
    cfg: JobConfig, prompts: list[list[int]], rollout: Any, learners: Any = None
) -> tuple[list[Tree], TreeStats]:
    """Each prompt's group grown as a tree (module docstring); the trees and what it took."""
    tc = cfg.rollout.tree
    assert tc is not None
    g, cap = cfg.rollout.group_size, cfg.rollout.max_new_tokens
    stats = TreeStats(groups=len(prompts))
    roots = rollout.generate(prompts, tc.roots, top_logprobs=tc.top_logprobs)
    stats.generated += sum(len(c.token_ids) for group in roots for c in group)
    trees = [Tree(tuple(_node(c) for c in group)) for group in roots]
    if tc.entropy == "learner":
        trees = [_with_learner_entropy(t, p, learners, stats, tc) for t, p in zip(trees, prompts, strict=True)]
    for _ in range(tc.max_rounds):
        plans: list[tuple[int, Branch]] = []
        for i, t in enumerate(trees):
            if len(t.leaves()) >= g or (tc.token_budget is not None and t.unique_tokens >= tc.token_budget):
                continue
            plans += [(i, b) for b in plan_branches(t, tc.branch_points, tc.branches, g - len(t.leaves()), tc.per)]
        if not plans:
            break
        stats.rounds += len({i for i, _ in plans})
        before = [len(t.nodes) for t in trees]
        for i, prefix, c in _continuations(plans, prompts, trees, rollout, tc, cap, stats):
            trees[i] = apply_branch(trees[i], prefix, _node(c))
        if tc.entropy == "learner":
            trees = [
                _with_learner_entropy(t, p, learners, stats, tc, since=n) if len(t.nodes) > n else t
                for t, p, n in zip(trees, prompts, before, strict=True)
            ]  # fmt: skip
    for t in trees:
        stats.unique += t.unique_tokens
        stats.flat += t.flat_tokens
        stats.leaves += len(t.leaves())
    return trees, stats


def _continuations(
    plans: list[tuple[int, Branch]], prompts: list[list[int]], trees: list[Tree], rollout: Any, tc: TreeConfig,
    cap: int, stats: TreeStats,
) -> list[tuple[int, tuple[int, ...], Completion]]:  # fmt: skip
    """The round's new continuations, (group, prefix, completion) each, in one generate call (two with
    pruning: the lookahead, then the survivors' rest)."""
    reqs = [prompts[i] + list(b.prefix) for i, b in plans]
    budgets = [cap - len(b.prefix) for _, b in plans]
    first = [min(tc.prune_lookahead, m) if tc.prune_lookahead else m for m in budgets]
    outs = rollout.generate(reqs, [b.n for _, b in plans], max_tokens=first, top_logprobs=tc.top_logprobs)
    stats.branch_prompt_tokens += sum(len(r) for r in reqs)
    stats.branch_cached_tokens += sum(group[0].cached_tokens for group in outs if group)
    stats.generated += sum(len(c.token_ids) for group in outs for c in group)
    found: list[tuple[int, tuple[int, ...], Completion]] = []
    later: list[tuple[int, tuple[int, ...], Completion, int]] = []  # lookahead survivors to continue
    for (i, b), group, m, left in zip(plans, outs, first, budgets, strict=True):
        seen = {tuple(path[len(b.prefix):]) for path in map(trees[i].tokens, trees[i].leaves())
                if tuple(path[: len(b.prefix)]) == b.prefix}  # fmt: skip
        for c in group:
            head = tuple(c.token_ids)
            if tc.prune_lookahead and any(s[: len(head)] == head for s in seen):  # a near-copy from the same fork
                stats.pruned += 1
                continue
            seen.add(head)
            if m == left or c.finish_reason != "length":  # no lookahead, or it ended within it
                found.append((i, b.prefix, c))
            else:
                later.append((i, b.prefix, c, left - len(head)))
    if later:
        rest = rollout.generate(
            [prompts[i] + list(p) + c.token_ids for i, p, c, _ in later], 1, max_tokens=[m for *_, m in later],
            top_logprobs=tc.top_logprobs,
        )  # fmt: skip
        stats.generated += sum(len(group[0].token_ids) for group in rest)
        found += [(i, p, _joined(c, group[0])) for (i, p, c, _), group in zip(later, rest, strict=True)]
    return found


def _with_learner_entropy(
    tree: Tree, prompt: list[int], learners: Any, stats: TreeStats, tc: TreeConfig, since: int = 0
) -> Tree:
    """The tree with the learner's entropy on nodes `since`.. (a forward pass over the leaves that hold
    them); the share of branch points both entropies would choose goes to stats."""
    engine_choice = branch_points(tree, candidates(tree), tc.branch_points, tc.per)
    new = list(range(since, len(tree.nodes)))
    holders = sorted({tree.leaf_holding(i) for i in new})
    ents = _learner_entropy(learners, [prompt] * len(holders), [tree.tokens(leaf) for leaf in holders])
    nodes = list(tree.nodes)
    for leaf, ent in zip(holders, ents, strict=True):
        start = 0
        for i in tree.path(leaf):
            n = len(tree.nodes[i].tokens)
            if i >= since:
                nodes[i] = Node(nodes[i].parent, nodes[i].tokens, nodes[i].logprobs, tuple(ent[start : start + n]),
                                nodes[i].finish)  # fmt: skip
            start += n
    out = Tree(tuple(nodes))
    stats.agreements.append(agreement(branch_points(out, candidates(out), tc.branch_points, tc.per), engine_choice))
    return out


def leaf_completions(tree: Tree, tokenizer: Any) -> list[Completion]:
    """The group's members: one completion per leaf, in leaf order."""
    out = []
    for leaf in tree.leaves():
        ids = tree.tokens(leaf)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        out.append(Completion(ids, tree.leaf_field(leaf, "logprobs"), text, tree.nodes[leaf].finish))
    return out


def tree_sequences(
    cfg: JobConfig, tree: Tree, prompt_ids: list[int], shaped: list[float], sample_base: int | None
) -> tuple[list[TrainSequence], int]:
    """The training sequences of one tree group (`rollout.tree.credit`), from its leaves' shaped rewards;
    and how many truncated leaves were masked. A leaf left with no loss term is not sent to the learner.
    sample_base: the group's first sample id when its first trained leaf is shown on the dashboard."""
    from actors.algo.tree import flatten

    tc, algo = cfg.rollout.tree, cfg.algorithm
    assert tc is not None
    truncated = [leaf for leaf in tree.leaves() if tree.nodes[leaf].finish == "length"] if algo.overlong_mask else []
    flat = flatten(tree, shaped, tc.credit, algo.estimator, excluded=truncated)
    seqs: list[TrainSequence] = []
    for j, f in enumerate(flat):
        if not any(f.loss_mask):
            continue
        shown = sample_base + j if sample_base is not None and not seqs else None
        own = f.advantages[-1]  # its last token is its own: the leaf's advantage
        seqs.append(TrainSequence(prompt_ids, f.tokens, tree.leaf_field(f.leaf, "logprobs"), own, sample_id=shown,
                                  loss_mask=f.loss_mask, token_advantages=f.advantages))  # fmt: skip
    return seqs, len(truncated)


def tree_training_groups(cfg: JobConfig, groups: list[Any]) -> tuple[list[list[TrainSequence]], dict[str, float]]:
    """`actors.driver.sampling.training_groups` for tree groups: each group's advantages over its own
    leaves (their number may differ between groups), laid out by `rollout.tree.credit`."""
    import torch

    from actors.algo.advantages import overlong_penalty

    algo, g = cfg.algorithm, cfg.rollout.group_size
    out: list[list[TrainSequence]] = []
    shaped_all: list[float] = []
    masked = 0
    for i, gr in enumerate(groups):
        lengths = torch.tensor([len(c.token_ids) for c in gr.completions])
        pen = overlong_penalty(lengths, cfg.rollout.max_new_tokens, algo.overlong_buffer, algo.overlong_penalty)
        shaped = [s + float(p) for s, p in zip(gr.scores, pen, strict=True)]
        shaped_all += shaped
        shown = i * g if i < cfg.tracking.samples_per_step else None
        seqs, cut = tree_sequences(cfg, gr.tree, gr.prompt_ids, shaped, shown)
        masked += cut
        if seqs:
            out.append(seqs)
    return out, {
        "reward/shaped_mean": sum(shaped_all) / len(shaped_all) if shaped_all else 0.0,
        "batch/sequences": float(sum(len(s) for s in out)),
        "batch/truncated_masked": float(masked),
    }


def tree_record(tree: Tree, scores: list[float], tokenizer: Any, shown: int) -> dict[str, Any]:
    """A group's tree as the dashboard draws it: each node's parent, decoded tokens and their entropy (the
    first TREE_TOKENS tokens in node order; `truncated` says when there were more), the leaves with their
    rewards, and `shown`: the leaf (node) of the sample the record shows."""
    nodes, left = [], TREE_TOKENS
    for n in tree.nodes:
        take = n.tokens[: max(left, 0)]
        left -= len(n.tokens)
        nodes.append({
            "parent": n.parent,
            "tokens": [tokenizer.decode([t]) for t in take],
            "entropy": [round(float(h), 4) for h in n.entropy[: len(take)]],
        })  # fmt: skip
    leaves = [{"node": leaf, "reward": float(r)} for leaf, r in zip(tree.leaves(), scores, strict=True)]
    return {"nodes": nodes, "leaves": leaves, "shown": shown, "truncated": left < 0}
