"""A rollout group grown as a tree (forking-token tree rollouts): its shape, how it grows, and the two ways
to train on it. Pure Python and torch; no engine.

A group is a tree of token segments under the prompt. The first samples are the prompt's children; a
branch continues an existing path from one of its positions (a high-entropy "forking" token) with new
tokens, splitting the segment it starts in. Every leaf is one complete response with its outcome reward;
the group's members are its leaves.

Training lays the group out as one flat sequence per leaf (the prompt's tokens, then the path's): a
token shared by several leaves has the same context in each, so the learner's and the engine's
log-probs and entropies of it are the same in every copy. Two credit rules:

- `tree` (TreeAdv's redistribution): each unique token is one loss term, on its first copy (the first
  leaf in order that holds it); its advantage is the mean of the advantages of the leaves below it. The
  other copies are out of the loss and out of the entropy filter, so N, k and the threshold count each
  unique token once.
- `flat`: every leaf is its own sequence, as if sampled on its own: each copy of a shared token is a loss
  term with its leaf's advantage (the documented alternative; what a flat sampler of the same leaves
  would train).

The two agree on tokens that one leaf holds (their advantage is that leaf's in both) and differ by design on
shared ones: flat puts k terms with k leaf advantages where tree puts one with their mean.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from actors.algo.advantages import group_advantages

__all__ = [
    "Branch", "FlatLeaf", "Node", "Token", "Tree", "agreement", "apply_branch", "branch_points", "candidates",
    "context_of", "contexts", "flatten", "node_advantages", "plan_branches", "position", "topk_entropy",
]  # fmt: skip

Credit = Literal["tree", "flat"]


@dataclass(frozen=True)
class Node:
    """A segment of generated tokens after its parent's (-1: right after the prompt); with what the engine
    said of each token where it sampled it (empty where not known): its log-prob and the entropy of the
    distribution it was drawn from (from its top-k log-probs); `exact`: the learner's exact entropy of
    each token, where it was computed; `finish`: how the sample ended ("stop", "length"), on a leaf's
    last segment; `versions`: the (first, last) policy version that generated it (asynchronous mode)."""

    parent: int
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...] = ()
    entropy: tuple[float, ...] = ()
    finish: str | None = None
    exact: tuple[float, ...] = ()
    versions: tuple[int, int] | None = None

    def split(self, cut: int, tail_parent: int) -> tuple[Node, Node]:
        """(its first `cut` tokens, the rest under tail_parent): what a branch inside it leaves."""
        head = replace(self, tokens=self.tokens[:cut], logprobs=self.logprobs[:cut], entropy=self.entropy[:cut],
                       exact=self.exact[:cut], finish=None)  # fmt: skip
        tail = replace(self, parent=tail_parent, tokens=self.tokens[cut:], logprobs=self.logprobs[cut:],
                       entropy=self.entropy[cut:], exact=self.exact[cut:])  # fmt: skip
        return head, tail


@dataclass(frozen=True)
class Tree:
    """A group's tree: each node's parent is another node or -1 (the prompt), with no cycle."""

    nodes: tuple[Node, ...] = ()

    def __post_init__(self) -> None:
        for i in range(len(self.nodes)):
            seen, j = set(), i
            while j != -1:
                if j in seen or not -1 <= self.nodes[j].parent < len(self.nodes):
                    raise ValueError(f"node {i}: its parents do not lead to the prompt")
                seen.add(j)
                j = self.nodes[j].parent

    def leaves(self) -> list[int]:
        """The nodes no branch continues, in node order: the group's members."""
        parents = {n.parent for n in self.nodes}
        return [i for i in range(len(self.nodes)) if i not in parents]

    def path(self, i: int) -> list[int]:
        """The nodes from the prompt down to node i."""
        out = []
        while i != -1:
            out.append(i)
            i = self.nodes[i].parent
        return out[::-1]

    def tokens(self, leaf: int) -> list[int]:
        return [t for i in self.path(leaf) for t in self.nodes[i].tokens]

    def sample(self, tokens: Sequence[int] | Node) -> Tree:
        """A new root sample (a child of the prompt): its tokens, or a Node (parent -1) with what the engine
        said of them."""
        node = tokens if isinstance(tokens, Node) else Node(-1, tuple(tokens))
        return Tree((*self.nodes, node))

    def branch(self, leaf: int, at: int, tokens: Sequence[int] | Node) -> tuple[Tree, int]:
        """Continue leaf's path after its first `at` tokens with `tokens` (a new leaf; or a Node, whose
        parent is set here): the segment holding position `at` is split there, so both continuations share
        what comes before. Returns the new tree and the new leaf's index (the last node). at = 0 branches
        right after the prompt."""
        new = tokens if isinstance(tokens, Node) else Node(-1, tuple(tokens))
        length = len(self.tokens(leaf))
        if not 0 <= at < length:
            raise ValueError(f"at = {at}: a branch starts inside the path (0..{length - 1})")
        start = 0
        for i in self.path(leaf):  # the node whose segment holds position `at`
            if at < start + len(self.nodes[i].tokens):
                break
            start += len(self.nodes[i].tokens)
        cut, node = at - start, self.nodes[i]
        if cut == 0:  # at the segment's start: a sibling of it
            return Tree((*self.nodes, replace(new, parent=node.parent))), len(self.nodes)
        # node i keeps its head; its tail becomes a new node that takes over i's children
        tail = len(self.nodes)
        nodes = [replace(n, parent=tail) if n.parent == i else n for n in self.nodes]
        nodes[i], rest = node.split(cut, i)
        nodes += [rest, replace(new, parent=i)]
        return Tree(tuple(nodes)), tail + 1

    def children(self, i: int) -> list[int]:
        """The nodes right under node i (-1: the root samples)."""
        return [j for j, n in enumerate(self.nodes) if n.parent == i]

    def leaf_holding(self, node: int) -> int:
        """The first leaf (in leaf order) whose path goes through node."""
        return next(leaf for leaf in self.leaves() if node in self.path(leaf))

    def leaf_field(self, leaf: int, name: Literal["logprobs", "entropy", "exact"]) -> list[float]:
        """The per-token values along a leaf's path (each segment's, in order)."""
        return [x for i in self.path(leaf) for x in getattr(self.nodes[i], name)]

    def leaf_versions(self, leaf: int) -> tuple[int, int] | None:
        """The (first, last) policy version that generated a leaf's path (None: not recorded)."""
        spans = [self.nodes[i].versions for i in self.path(leaf)]
        if any(v is None for v in spans):
            return None
        return min(v[0] for v in spans if v), max(v[1] for v in spans if v)

    @property
    def unique_tokens(self) -> int:
        """Tokens generated for the group when no shared prefix is generated twice."""
        return sum(len(n.tokens) for n in self.nodes)

    @property
    def flat_tokens(self) -> int:
        """Tokens its leaves hold as separate sequences (what a flat sampler of them would generate)."""
        return sum(len(self.tokens(leaf)) for leaf in self.leaves())


def node_advantages(tree: Tree, leaf_advantages: Sequence[float], excluded: Collection[int] = ()) -> list[float]:
    """Each node's advantage: the mean of the advantages of the leaves below it (a leaf's own is its own),
    leaving out the `excluded` leaves where a node has others below it (a node only they hold: their mean)."""
    leaves = tree.leaves()
    if len(leaf_advantages) != len(leaves):
        raise ValueError(f"{len(leaf_advantages)} advantages for {len(leaves)} leaves")
    adv = dict(zip(leaves, leaf_advantages, strict=True))
    out = []
    for held in _leaves_below(tree):
        kept = [leaf for leaf in held if leaf not in excluded] or held
        out.append(sum(adv[leaf] for leaf in kept) / len(kept))
    return out


def _leaves_below(tree: Tree) -> list[list[int]]:
    """For each node, the leaves whose paths go through it, in leaf order."""
    below: list[list[int]] = [[] for _ in tree.nodes]
    for leaf in tree.leaves():
        for i in tree.path(leaf):
            below[i].append(leaf)
    return below


@dataclass(frozen=True)
class FlatLeaf:
    """One leaf as the learner's sequence: its path's tokens, which of them are loss terms (and count in the
    entropy filter), each token's advantage and how many leaves hold it."""

    leaf: int
    tokens: list[int]
    loss_mask: list[bool]
    advantages: list[float]
    shared_by: list[int]


def flatten(
    tree: Tree, rewards: Sequence[float], credit: Credit = "tree", estimator: Literal["grpo", "drgrpo"] = "grpo",
    excluded: Collection[int] = (),
) -> list[FlatLeaf]:  # fmt: skip
    """The group's leaves as flat sequences, in leaf order, under `credit` (module docstring). The leaves'
    advantages are the group's (group_advantages over the leaves' rewards).

    excluded: leaves whose own tokens get no loss (a truncated completion under algorithm.overlong_mask);
    their rewards still count in the group's baseline (group_advantages), not in the advantage of a token
    they share with other leaves, which keeps its loss term on such a leaf's copy."""
    leaves = tree.leaves()
    if len(rewards) != len(leaves):
        raise ValueError(f"{len(rewards)} rewards for {len(leaves)} leaves")
    if not set(excluded) <= set(leaves):
        raise ValueError(f"excluded {sorted(set(excluded) - set(leaves))}: not leaves of the tree")
    leaf_adv = group_advantages(torch.tensor(list(rewards), dtype=torch.float64), len(leaves), estimator)[0].tolist()
    node_adv = node_advantages(tree, leaf_adv, excluded)  # a truncated leaf's outcome steers no shared token
    below = [len(held) for held in _leaves_below(tree)]
    first: dict[int, int] = {}  # node -> the leaf whose copy of it is the loss term (tree credit)
    for leaf in [x for x in leaves if x not in excluded]:
        for i in tree.path(leaf):
            first.setdefault(i, leaf)
    out = []
    for leaf, own in zip(leaves, leaf_adv, strict=True):
        tokens: list[int] = []
        mask: list[bool] = []
        adv: list[float] = []
        shared: list[int] = []
        for i in tree.path(leaf):
            n = len(tree.nodes[i].tokens)
            tokens += tree.nodes[i].tokens
            shared += [below[i]] * n
            if credit == "flat":
                mask += [leaf not in excluded] * n
                adv += [own] * n
            else:
                mask += [first.get(i) == leaf] * n
                adv += [node_adv[i]] * n
        out.append(FlatLeaf(leaf, tokens, mask, adv, shared))
    return out


def topk_entropy(top_logprobs: Sequence[float]) -> float:
    """The entropy (nats) of a next-token distribution known only by its k most likely tokens' log-probs
    (what an engine returns with `logprobs=k`): their -p log p, plus the rest of the mass taken as one
    outcome, -(1 - sum p) log(1 - sum p). A lower bound of the true entropy (the rest is spread over many
    tokens), exact when the k tokens hold all the mass."""
    ps = [math.exp(lp) for lp in top_logprobs]
    rest = max(0.0, 1.0 - sum(ps))
    return -sum(p * math.log(p) for p in ps if p > 0) - (rest * math.log(rest) if rest > 0 else 0.0)


Token = tuple[int, int]  # (node, offset in its segment): a unique token of the tree


def branch_points(
    tree: Tree, entropy: Sequence[Sequence[float]], b: int, per: Literal["trajectory", "group"] = "group"
) -> list[Token]:
    """Where to branch next: the b highest-entropy unique tokens of the group (per="group"), or the b
    highest on each leaf's path (per="trajectory": their union, each at most once). `entropy[node]` holds
    one value per token of that node's segment. Ties go to the earlier node, then the earlier offset.
    Returned highest first."""
    if [len(e) for e in entropy] != [len(n.tokens) for n in tree.nodes]:
        raise ValueError("entropy needs one value per token of every node")

    def top(keys: list[Token]) -> list[Token]:
        return sorted(keys, key=lambda k: (-entropy[k[0]][k[1]], k))[:b]

    if per == "group":
        return top([(i, o) for i, n in enumerate(tree.nodes) for o in range(len(n.tokens))])
    chosen: dict[Token, None] = {}
    for leaf in tree.leaves():
        for k in top([(i, o) for i in tree.path(leaf) for o in range(len(tree.nodes[i].tokens))]):
            chosen[k] = None
    return sorted(chosen, key=lambda k: (-entropy[k[0]][k[1]], k))


def position(tree: Tree, leaf: int, token: Token) -> int:
    """Where a unique token sits on a leaf's path (what Tree.branch takes as `at`)."""
    node, offset = token
    start = 0
    for i in tree.path(leaf):
        if i == node:
            return start + offset
        start += len(tree.nodes[i].tokens)
    raise ValueError(f"node {node} is not on leaf {leaf}'s path")


def agreement(chosen: Sequence[Token], reference: Sequence[Token]) -> float:
    """The share of `chosen` branch points that `reference` chose too (1.0 when both chose none)."""
    return len(set(chosen) & set(reference)) / len(set(chosen)) if chosen else 1.0


def context_of(prefix: Sequence[int]) -> int:
    """The context hash (`contexts`) of the position right after `prefix`."""
    h = hash(())
    for tok in prefix:
        h = hash((h, tok))
    return h


def contexts(tree: Tree) -> list[list[int]]:
    """For each token (one list per node), a hash of the tokens before it on its path: the context it was
    drawn from. Two nodes that start alike (two samples whose first tokens agree) give equal contexts."""
    start: dict[int, int] = {-1: hash(())}
    out: list[list[int]] = [[] for _ in tree.nodes]
    order = sorted(range(len(tree.nodes)), key=lambda i: len(tree.path(i)))  # parents first
    for i in order:
        h = start[tree.nodes[i].parent]
        for tok in tree.nodes[i].tokens:
            out[i].append(h)
            h = hash((h, tok))
        start[i] = h
    return out


def candidates(tree: Tree, source: Literal["engine", "learner"] = "engine") -> list[list[float]]:
    """Each token's entropy as a branch point (one list per node): the engine's estimate, or the learner's
    exact entropy (`Node.exact`), and -inf where a branch cannot start: where that entropy is not known;
    at a fork, where the group drew different tokens from the token's context (two samples diverged
    there, or a branch was made there); and on every copy of a context but the first (samples that agree
    so far hold the same positions: each is one place to branch)."""
    ctx = contexts(tree)
    drawn: dict[int, set[int]] = {}
    for n, hs in zip(tree.nodes, ctx, strict=True):
        for tok, h in zip(n.tokens, hs, strict=True):
            drawn.setdefault(h, set()).add(tok)
    seen: set[int] = set()
    out = []
    for n, hs in zip(tree.nodes, ctx, strict=True):
        known = n.entropy if source == "engine" else n.exact
        ent = list(known) if len(known) == len(n.tokens) else [-math.inf] * len(n.tokens)
        row = []
        for e, h in zip(ent, hs, strict=True):
            row.append(-math.inf if len(drawn[h]) > 1 or h in seen else e)
            seen.add(h)
        out.append(row)
    return out


@dataclass(frozen=True)
class Branch:
    """n new continuations after `prefix` (the first tokens of a leaf's path; its last token is re-drawn).
    A branch names its prefix, not node indices, which the round's earlier branches may renumber."""

    prefix: tuple[int, ...]
    n: int
    entropy: float  # the entropy of the position branched


def plan_branches(
    tree: Tree, points: int, per_point: int, need: int, per: Literal["trajectory", "group"] = "group",
    source: Literal["engine", "learner"] = "engine", spent: Collection[int] = (),
) -> list[Branch]:  # fmt: skip
    """This round's branches of a group that needs `need` more leaves: the `points` highest-entropy
    positions where a branch can start (`candidates` by `source`; not at a context in `spent`, forks
    branched before whose continuations were pruned: `context_of`), highest first, `per_point`
    continuations each (the last one fewer, so the group reaches exactly its leaf count)."""
    ent, ctx = candidates(tree, source), contexts(tree)
    ent = [[-math.inf if h in spent else e for e, h in zip(es, hs, strict=True)]
           for es, hs in zip(ent, ctx, strict=True)]  # fmt: skip
    out, planned = [], set()
    for node, offset in branch_points(tree, ent, points, per):
        h = ent[node][offset]
        if need <= 0 or h == -math.inf:
            break
        if ctx[node][offset] in planned:  # the same context on another path (per=trajectory): once
            continue
        planned.add(ctx[node][offset])
        leaf = tree.leaf_holding(node)
        at = position(tree, leaf, (node, offset))
        k = min(per_point, need)
        out.append(Branch(tuple(tree.tokens(leaf)[:at]), k, h))
        need -= k
    return out


def apply_branch(tree: Tree, prefix: Sequence[int], node: Node) -> Tree:
    """The tree with one new continuation after `prefix`, on the first leaf whose path starts with it."""
    at = len(prefix)
    for leaf in tree.leaves():
        path = tree.tokens(leaf)
        if len(path) > at and path[:at] == list(prefix):
            return tree.branch(leaf, at, node)[0]
    raise ValueError(f"no leaf continues the prefix {list(prefix)[:8]}... ({at} tokens)")
