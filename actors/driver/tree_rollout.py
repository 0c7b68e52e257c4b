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

from dataclasses import dataclass, field, replace
from typing import Any

from actors.algo.tree import Node, Tree, agreement, apply_branch, branch_points, candidates, context_of, plan_branches
from actors.common.batch import Completion, TrainSequence
from actors.common.config import JobConfig
from actors.common.tree_config import TreeConfig

__all__ = [
    "Growth",
    "Request",
    "TreeStats",
    "grow_groups",
    "leaf_completions",
    "tree_record",
    "tree_sequences",
    "tree_training_groups",
]

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

    def reset(self) -> None:
        """Back to zero, in place (the growing groups keep counting into this object)."""
        self.__init__()  # type: ignore[misc]

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


def _node(c: Completion) -> Node:
    return Node(-1, tuple(c.token_ids), tuple(c.logprobs), tuple(c.entropy or ()), c.finish_reason, (), c.versions)


def _joined(first: Completion, rest: Completion) -> Completion:
    """A lookahead's first tokens and their continuation, as one completion."""
    versions = None
    if first.versions is not None and rest.versions is not None:
        versions = (first.versions[0], rest.versions[1])
    return Completion(
        first.token_ids + rest.token_ids, first.logprobs + rest.logprobs, first.text + rest.text, rest.finish_reason,
        versions, entropy=(first.entropy or []) + (rest.entropy or []),
    )  # fmt: skip


@dataclass(frozen=True)
class Request:
    """One generate request of a growing group: `n` samples after prompt + `context`, at most `max_tokens`.
    kind: "roots" (the first samples), "branch" (continuations after `prefix`), "rest" (a lookahead
    survivor `head` continued)."""

    kind: str
    context: tuple[int, ...]
    n: int
    max_tokens: int
    prefix: tuple[int, ...] = ()
    head: Completion | None = None


class Growth:
    """One group's tree as it grows, request by request: `first` and `next_round` say what to ask the
    engine, `add` takes each answer in (and may ask for a lookahead survivor's rest). The synchronous
    rounds batch every group's requests in one call (`grow_groups`); asynchronous mode sends each as its
    own request (`actors.driver.stream`)."""

    def __init__(
        self, tc: TreeConfig, prompt: list[int], group_size: int, max_new_tokens: int, stats: TreeStats
    ) -> None:
        self.tc, self.prompt, self.g, self.cap, self.stats = tc, prompt, group_size, max_new_tokens, stats
        self.tree = Tree()
        self.rounds = 0
        self.engine: int | None = None  # asynchronous mode: the engine its requests go to
        self.spent: set[int] = set()  # contexts branched already (a fork whose draws were all pruned stays one)
        self.pending = 0  # requests out (and lookahead survivors' rests to come) in this round

    def ids(self, req: Request) -> list[int]:
        """What the engine continues: the group's prompt and the request's context."""
        return self.prompt + list(req.context)

    def first(self) -> list[Request]:
        self.pending = 1
        return [Request("roots", (), self.tc.roots, self.cap)]

    def next_round(self) -> list[Request]:
        """The next round's branch requests; none when the group is complete (its leaf count, its token
        budget, max_rounds, or no position left to branch)."""
        tc, t = self.tc, self.tree
        short = self.g - len(t.leaves())
        if short <= 0 or self.rounds >= tc.max_rounds or (tc.token_budget and t.unique_tokens >= tc.token_budget):
            return []
        plan = plan_branches(t, tc.branch_points, tc.branches, short, tc.per, tc.entropy, self.spent)
        self.spent.update(context_of(b.prefix) for b in plan)
        if plan:
            self.rounds += 1
            self.stats.rounds += 1
        look = tc.prune_lookahead
        reqs = [Request("branch", b.prefix, b.n, self.cap - len(b.prefix), b.prefix) for b in plan]
        reqs = [replace(r, max_tokens=min(look, r.max_tokens)) if look else r for r in reqs]
        self.pending = len(reqs)
        return reqs

    def add(self, req: Request, outs: list[Completion]) -> list[Request]:
        """Take in one request's samples; the follow-up requests (a lookahead survivor's rest), if any."""
        self.stats.generated += sum(len(c.token_ids) for c in outs)
        self.pending -= 1
        if req.kind == "roots":
            self.tree = Tree(tuple(_node(c) for c in outs))
            return []
        if req.kind == "rest":
            assert req.head is not None
            self.tree = apply_branch(self.tree, req.prefix, _node(_joined(req.head, outs[0])))
            return []
        self.stats.branch_prompt_tokens += len(self.prompt) + len(req.context)
        self.stats.branch_cached_tokens += outs[0].cached_tokens if outs else 0
        full = self.cap - len(req.prefix)  # the branch's whole budget (the request's is the lookahead's)
        seen = {tuple(path[len(req.prefix) :]) for path in map(self.tree.tokens, self.tree.leaves())
                if tuple(path[: len(req.prefix)]) == req.prefix}  # fmt: skip
        follow = []
        for c in outs:
            head = tuple(c.token_ids)
            if self.tc.prune_lookahead and any(s[: len(head)] == head for s in seen):  # a near-copy from this fork
                self.stats.pruned += 1
                continue
            seen.add(head)
            if req.max_tokens == full or len(head) < req.max_tokens:  # no lookahead, or it ended within it
                self.tree = apply_branch(self.tree, req.prefix, _node(c))
            else:
                follow.append(Request("rest", req.prefix + head, 1, full - len(head), req.prefix, c))
        self.pending += len(follow)
        return follow

    def done(self) -> bool:
        """No request out, and nothing more to ask (call after the last answer of a round)."""
        return self.pending == 0

    def finish(self) -> Tree:
        """The grown tree (its numbers added to the stats)."""
        self.stats.groups += 1
        self.stats.unique += self.tree.unique_tokens
        self.stats.flat += self.tree.flat_tokens
        self.stats.leaves += len(self.tree.leaves())
        return self.tree


def grow_groups(
    cfg: JobConfig, prompts: list[list[int]], rollout: Any, learners: Any = None
) -> tuple[list[Tree], TreeStats]:
    """Each prompt's group grown as a tree (module docstring), every group's requests of a round in one
    generate call; the trees and what it took. With entropy: learner, the learner's exact entropy of each
    round's new segments (one forward pass) before the next round is planned."""
    tc = cfg.rollout.tree
    assert tc is not None
    stats = TreeStats()
    growths = [Growth(tc, p, cfg.rollout.group_size, cfg.rollout.max_new_tokens, stats) for p in prompts]
    reqs = [(i, r) for i, gr in enumerate(growths) for r in gr.first()]
    while reqs:
        outs = rollout.generate([growths[i].ids(r) for i, r in reqs], [r.n for _, r in reqs],
                                max_tokens=[r.max_tokens for _, r in reqs], engines=[i for i, _ in reqs],
                                top_logprobs=tc.top_logprobs)  # fmt: skip
        follow = [(i, f) for (i, r), out in zip(reqs, outs, strict=True) for f in growths[i].add(r, out)]
        if follow:  # lookahead survivors: the round goes on
            reqs = follow
            continue
        if tc.entropy == "learner":
            _learner_entropy(growths, prompts, learners, stats, tc)
        reqs = [(i, r) for i, gr in enumerate(growths) for r in gr.next_round()]
    return [gr.finish() for gr in growths], stats


def _learner_entropy(
    growths: list[Growth], prompts: list[list[int]], learners: Any, stats: TreeStats, tc: TreeConfig
) -> None:
    """The learner's exact entropy on every segment that lacks it (one forward pass over the leaves that hold
    them, all groups together); the share of each group's next branch points that the engine's estimate
    would choose too goes to stats."""
    asks: list[tuple[int, int]] = []  # (group, leaf)
    for gi, gr in enumerate(growths):
        t = gr.tree
        missing = [i for i, n in enumerate(t.nodes) if len(n.exact) != len(n.tokens)]
        asks += [(gi, leaf) for leaf in sorted({t.leaf_holding(i) for i in missing})]
    if not asks:
        return
    seqs = [TrainSequence(prompts[gi], path, [0.0] * len(path), 0.0)
            for gi, leaf in asks for path in [growths[gi].tree.tokens(leaf)]]  # fmt: skip
    for (gi, leaf), ent in zip(asks, learners.score(seqs, entropy=True), strict=True):
        t, start = growths[gi].tree, 0
        nodes = list(t.nodes)
        for i in t.path(leaf):
            n = len(nodes[i].tokens)
            if len(nodes[i].exact) != n:
                nodes[i] = replace(nodes[i], exact=tuple(ent[start : start + n]))
            start += n
        growths[gi].tree = Tree(tuple(nodes))
    for gr in {gi: growths[gi] for gi, _ in asks}.values():
        engine = branch_points(gr.tree, candidates(gr.tree, "engine"), tc.branch_points, tc.per)
        exact = branch_points(gr.tree, candidates(gr.tree, "learner"), tc.branch_points, tc.per)
        stats.agreements.append(agreement(exact, engine))


def leaf_completions(tree: Tree, tokenizer: Any) -> list[Completion]:
    """The group's members: one completion per leaf, in leaf order."""
    out = []
    for leaf in tree.leaves():
        ids = tree.tokens(leaf)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        out.append(Completion(ids, tree.leaf_field(leaf, "logprobs"), text, tree.nodes[leaf].finish,
                              tree.leaf_versions(leaf)))  # fmt: skip
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
