"""Tree rollouts' pure core (actors/algo/tree.py) on a worked tree: how branching splits segments, the
leaves' and the nodes' advantages, and the two credit rules against the flat expansion of the same
leaves - where they agree and where they differ by design."""

from __future__ import annotations

import math

import pytest

from actors.algo.tree import Node, Tree, agreement, branch_points, flatten, node_advantages, position, topk_entropy


def worked() -> Tree:
    """One sample [1 2 3 4]; a branch after 2 tokens ([7 8]); a branch after 3 tokens of the first ([9]).

    prompt - [1 2] - [3] - [4]    leaf 3, reward 1
                 \\       \\ [9]    leaf 4, reward 1
                  \\ [7 8]        leaf 2, reward 0
    """
    t = Tree().sample([1, 2, 3, 4])
    t, a = t.branch(0, 2, [7, 8])
    assert (a, t.nodes) == (2, (Node(-1, (1, 2)), Node(0, (3, 4)), Node(0, (7, 8))))
    t, b = t.branch(1, 3, [9])
    assert b == 4
    return t


def test_branching_splits_the_segment_it_starts_in_and_paths_keep_their_tokens():
    t = worked()
    assert t.nodes == (Node(-1, (1, 2)), Node(0, (3,)), Node(0, (7, 8)), Node(1, (4,)), Node(1, (9,)))
    assert t.leaves() == [2, 3, 4]
    assert [t.tokens(i) for i in t.leaves()] == [[1, 2, 7, 8], [1, 2, 3, 4], [1, 2, 3, 9]]
    assert (t.unique_tokens, t.flat_tokens) == (7, 12)  # 5 tokens never generated twice
    # at a segment's start: a sibling, no split; at 0: a new child of the prompt
    s, i = t.branch(3, 3, [5])
    assert s.nodes[i] == Node(1, (5,)) and s.nodes[:5] == t.nodes
    s, i = t.branch(2, 0, [6])
    assert s.nodes[i] == Node(-1, (6,)) and s.tokens(i) == [6]
    with pytest.raises(ValueError, match="at = 4: a branch starts inside the path"):
        t.branch(3, 4, [1])
    with pytest.raises(ValueError, match="do not lead to the prompt"):
        Tree((Node(1, (1,)), Node(0, (2,))))


def test_leaf_and_node_advantages_worked():
    t = worked()
    # rewards 0, 1, 1 on leaves 2, 3, 4: mean 2/3, unbiased std sqrt(1/3); GRPO's (r - mean) / std
    s = math.sqrt(1 / 3)
    leaf = [-2 / 3 / s, 1 / 3 / s, 1 / 3 / s]
    got = node_advantages(t, leaf)
    # node 0 is below every leaf (their mean: 0); node 1 below leaves 3 and 4; the leaves their own
    assert got == pytest.approx([0.0, 1 / 3 / s, -2 / 3 / s, 1 / 3 / s, 1 / 3 / s])  # exact: leaf given


def test_tree_credit_one_term_per_unique_token_with_the_mean_advantage_below_it():
    t = worked()
    s = math.sqrt(1 / 3)
    hi, lo = 1 / 3 / s, -2 / 3 / s
    flat_leaves = flatten(t, [0, 1, 1], "tree")
    assert [f.tokens for f in flat_leaves] == [[1, 2, 7, 8], [1, 2, 3, 4], [1, 2, 3, 9]]
    # each unique token is in the loss once, on its first copy: 4 + 2 + 1 = 7 = unique_tokens
    assert [f.loss_mask for f in flat_leaves] == [[True] * 4, [False, False, True, True], [False, False, False, True]]
    assert sum(sum(f.loss_mask) for f in flat_leaves) == t.unique_tokens
    assert [f.shared_by for f in flat_leaves] == [[3, 3, 1, 1], [3, 3, 2, 1], [3, 3, 2, 1]]
    for f, want in zip(flat_leaves, ([0, 0, lo, lo], [0, 0, hi, hi], [0, 0, hi, hi]), strict=True):
        assert f.advantages == pytest.approx(want, abs=1e-5)


def test_tree_and_flat_credit_agree_on_unshared_tokens_and_on_tokens_every_leaf_holds():
    """A surrogate sum(A * logp) over the loss terms, with each token's log-prob the same in every copy
    (same context): on tokens one leaf holds both rules give the same term; on tokens every leaf holds
    both give zero (GRPO's advantages sum to zero over the group); on token 3 (two leaves of three) flat
    gives two terms of the leaves' advantage where tree gives one of their mean - by design."""
    t = worked()
    logp = {(1,): -0.1, (1, 2): -0.2, (1, 2, 3): -0.3, (1, 2, 3, 4): -0.4, (1, 2, 3, 9): -0.9, (1, 2, 7): -0.7,
            (1, 2, 7, 8): -0.8}  # fmt: skip

    def terms(credit):
        out: dict[tuple[int, ...], float] = {}
        for f in flatten(t, [0, 1, 1], credit):
            for p, (m, a) in enumerate(zip(f.loss_mask, f.advantages, strict=True)):
                key = tuple(f.tokens[: p + 1])  # a token is its prefix: the same context in every copy
                if m:
                    out[key] = out.get(key, 0.0) + a * logp[key]
        return out

    tree, flat = terms("tree"), terms("flat")
    unshared = [(1, 2, 7), (1, 2, 7, 8), (1, 2, 3, 4), (1, 2, 3, 9)]
    for key in unshared:
        assert tree[key] == pytest.approx(flat[key])
    for key in [(1,), (1, 2)]:
        assert tree[key] == pytest.approx(0.0, abs=1e-6) and flat[key] == pytest.approx(0.0, abs=1e-6)
    s = math.sqrt(1 / 3)
    assert tree[(1, 2, 3)] == pytest.approx(1 / 3 / s * -0.3, rel=1e-5)  # GRPO's std has an eps of 1e-6
    assert flat[(1, 2, 3)] == pytest.approx(2 * (1 / 3 / s) * -0.3, rel=1e-5)
    # a token-mean loss divides by the loss terms: 7 unique tokens under tree, 12 copies under flat
    assert sum(sum(f.loss_mask) for f in flatten(t, [0, 1, 1], "flat")) == t.flat_tokens == 12


def test_a_tree_without_branches_is_flat_sampling():
    """Root samples only: every token is held by one leaf, so both rules equal GRPO on the samples."""
    t = Tree().sample([1, 2]).sample([3]).sample([4, 5, 6])
    tree, flat = flatten(t, [1.0, 0.0, 0.5], "tree"), flatten(t, [1.0, 0.0, 0.5], "flat")

    def rows(leaves):
        return [(f.tokens, f.loss_mask, f.advantages) for f in leaves]

    assert rows(tree) == rows(flat)
    assert t.unique_tokens == t.flat_tokens == 6
    with pytest.raises(ValueError, match="2 rewards for 3 leaves"):
        flatten(t, [1.0, 0.0])


def test_topk_entropy_is_exact_when_the_top_tokens_hold_the_mass_and_a_lower_bound_otherwise():
    assert topk_entropy([math.log(0.5), math.log(0.5)]) == pytest.approx(math.log(2))
    # (0.5, 0.25) and the rest (0.25) as one outcome: the entropy of (0.5, 0.25, 0.25) = 1.5 ln 2
    assert topk_entropy([math.log(0.5), math.log(0.25)]) == pytest.approx(1.5 * math.log(2))
    # the rest spread over two tokens (0.125 each) has more entropy than the bound says
    true = -(0.5 * math.log(0.5) + 0.25 * math.log(0.25) + 2 * 0.125 * math.log(0.125))
    assert topk_entropy([math.log(0.5), math.log(0.25)]) < true


def test_branch_points_per_group_and_per_trajectory_worked():
    t = worked()  # nodes: 0 (1 2), 1 (3), 2 (7 8), 3 (4), 4 (9)
    entropy = [[0.1, 2.0], [1.5], [0.3, 0.2], [2.0], [0.05]]
    # per group: the two highest unique tokens; the tie at 2.0 goes to the earlier node
    assert branch_points(t, entropy, 2, "group") == [(0, 1), (3, 0)]
    # per trajectory, one each: every path's highest is token (0, 1) (shared), chosen once
    assert branch_points(t, entropy, 1, "trajectory") == [(0, 1)]
    assert branch_points(t, entropy, 2, "trajectory") == [(0, 1), (3, 0), (1, 0), (2, 0)]
    # where a unique token sits on a leaf's path: Tree.branch's `at`
    assert position(t, 3, (3, 0)) == 3 and position(t, 4, (1, 0)) == 2 and position(t, 2, (0, 1)) == 1
    with pytest.raises(ValueError, match="node 1 is not on leaf 2's path"):
        position(t, 2, (1, 0))
    with pytest.raises(ValueError, match="one value per token"):
        branch_points(t, entropy[:-1], 1)
    # the engine's choice against the learner's: the share of the first that the second made too
    assert agreement([(0, 1), (3, 0)], [(0, 1), (1, 0)]) == 0.5 and agreement([], [(0, 1)]) == 1.0
