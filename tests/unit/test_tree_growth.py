"""Growing a tree rollout: which positions a round branches (actors/algo/tree.py: candidates, plan_branches,
apply_branch), truncated leaves under overlong masking (flatten's `excluded`), the per-token advantages
reaching the learner's micro-batch, and the driver's round loop (actors/driver/tree_rollout.py) on a
scripted stand-in for the engine's sampling: the real engine's draws are random, and these tests need
to say which continuation comes back (tests/ray/test_tree.py runs the real engine)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import pytest
import torch

from actors.algo.tree import Branch, Node, Tree, apply_branch, candidates, context_of, contexts, flatten, plan_branches
from actors.common.batch import Completion, TrainSequence, collate
from actors.common.config import JobConfig
from actors.driver.tree_rollout import grow_groups, leaf_completions, tree_sequences

NEG = -math.inf


def two_roots() -> Tree:
    """Two root samples with the engine's entropy: [1 2 3] (entropy 0.1 0.9 0.4) and [4 5] (0.1 0.7)."""
    return Tree((Node(-1, (1, 2, 3), (-0.1, -0.2, -0.3), (0.1, 0.9, 0.4), "stop"),
                 Node(-1, (4, 5), (-0.4, -0.5), (0.1, 0.7), "stop")))  # fmt: skip


def test_a_round_branches_the_highest_entropy_positions_and_never_a_fork_twice():
    t = two_roots()
    # the roots' first tokens are two draws from the prompt's context, a fork already: never chosen
    assert candidates(t) == [[NEG, 0.9, 0.4], [NEG, 0.7]]
    plan = plan_branches(t, points=2, per_point=2, need=3)
    # 0.9 at [1 2 3]'s position 1 (prefix [1]), 0.7 at [4 5]'s (prefix [4]): 2, then the 1 still needed
    assert plan == [Branch((1,), 2, 0.9), Branch((4,), 1, 0.7)]
    t2 = apply_branch(t, (1,), Node(-1, (8, 9), (-0.8, -0.9), (0.3, 0.2), "length"))
    # the root [1 2 3] splits after its first token: [1] then [2 3] and the new [8 9] under it
    assert [t2.tokens(leaf) for leaf in t2.leaves()] == [[4, 5], [1, 2, 3], [1, 8, 9]]
    assert t2.leaf_field(t2.leaves()[2], "logprobs") == [-0.1, -0.8, -0.9]
    assert t2.nodes[t2.leaves()[2]].finish == "length" and t2.nodes[t2.leaves()[1]].finish == "stop"
    # the fork after [1] is spent (2 and 8 were both drawn there); [4 5]'s 0.7 is next, then 3 (0.4), then 9
    assert candidates(t2) == [[NEG], [NEG, 0.7], [NEG, 0.4], [NEG, 0.2]]
    assert plan_branches(t2, points=2, per_point=1, need=2) == [Branch((4,), 1, 0.7), Branch((1, 2), 1, 0.4)]
    # nothing left to branch: a one-token root pair
    flat = Tree((Node(-1, (1,), (), (0.5,)), Node(-1, (2,), (), (0.5,))))
    assert plan_branches(flat, 2, 2, need=4) == []
    with pytest.raises(ValueError, match="no leaf continues the prefix"):
        apply_branch(t, (7,), Node(-1, (1,)))


def test_two_samples_that_start_alike_share_a_context_which_is_a_fork_once_they_diverge():
    """[1 2 3] and [1 5]: separate nodes, but both drew after [1] (2 and 5): that position is a fork
    already, on both paths. Their first tokens are one context too (the prompt's), where they agree:
    one place to branch, on the first copy."""
    t = Tree((Node(-1, (1, 2, 3), (), (0.1, 0.9, 0.4)), Node(-1, (1, 5), (), (0.2, 0.7))))
    ctx = contexts(t)
    assert ctx[0][0] == ctx[1][0] and ctx[0][1] == ctx[1][1] and ctx[0][2] != ctx[1][1]
    assert candidates(t) == [[0.1, NEG, 0.4], [NEG, NEG]]
    # (a branch's prefix is the path before the token it re-draws: () re-draws the first token)
    assert plan_branches(t, points=3, per_point=2, need=4) == [Branch((1, 2), 2, 0.4), Branch((), 2, 0.1)]
    # a fork branched before whose draws were all pruned: spent, though the tree does not show it
    spent = {context_of((1, 2))}
    assert plan_branches(t, points=3, per_point=2, need=4, spent=spent) == [Branch((), 2, 0.1)]


def test_two_samples_that_agree_throughout_still_branch_where_the_policy_is_uncertain():
    """A peaked policy's roots are often the same answer: every position was drawn twice, but no sample
    diverged anywhere, so the group branches at the highest-entropy positions (each context once) and
    reaches its leaf count instead of stopping at two identical leaves."""
    same = Node(-1, (1, 2, 3), (), (0.3, 0.9, 0.4))
    t = Tree((same, same))
    assert candidates(t) == [[0.3, 0.9, 0.4], [NEG, NEG, NEG]]
    plan = plan_branches(t, points=2, per_point=2, need=6)
    assert plan == [Branch((1,), 2, 0.9), Branch((1, 2), 2, 0.4)]
    # a branch after [1] that re-drew the same path: still no fork there, but growth has spent that context
    t2 = apply_branch(t, (1,), Node(-1, (2, 3), (), (0.9, 0.4)))
    assert len(t2.leaves()) == 3 and candidates(t2)[0] == [0.3]
    assert plan_branches(t2, 1, 2, need=2, spent={context_of((1,))}) == [Branch((1, 2), 2, 0.4)]


def test_a_truncated_leaf_gives_no_loss_but_its_shared_tokens_keep_theirs_on_another_copy():
    t = apply_branch(two_roots(), (1,), Node(-1, (8, 9), (), (), "length"))  # leaves: [4 5], [1 2 3], [1 8 9]
    leaves = t.leaves()
    got = flatten(t, [1.0, 0.0, 0.0], "tree", excluded=[leaves[0]])
    # [4 5] (excluded) shares nothing: no loss term; [1] is a term once, on [1 2 3]'s copy
    assert [f.loss_mask for f in got] == [[False, False], [True, True, True], [False, True, True]]
    t3 = Tree().sample([1, 2]).branch(0, 1, [7])[0]  # [1 2] and [1 7]: node [1] shared by both
    excl = flatten(t3, [1.0, 0.0], "tree", excluded=[t3.leaves()[0]])
    # the shared [1] moves its loss term to the leaf that is not excluded; the excluded leaf's own token has none
    assert [f.tokens for f in excl] == [[1, 2], [1, 7]]
    assert [f.loss_mask for f in excl] == [[False, False], [True, True]]
    assert [f.loss_mask for f in flatten(t3, [1.0, 0.0], "flat", excluded=[t3.leaves()[0]])] == [
        [False, False], [True, True]]  # fmt: skip
    # the shared [1]'s advantage leaves the truncated leaf's outcome out: it is the other leaf's own
    own = flatten(t3, [1.0, 0.0], "tree")[1].advantages[-1]
    assert excl[1].advantages == pytest.approx([own, own])
    with pytest.raises(ValueError, match=r"excluded \[9\]: not leaves"):
        flatten(t3, [1.0, 0.0], excluded=[9])


def test_per_token_advantages_reach_the_micro_batch_beside_scalar_ones():
    a = TrainSequence([5, 6], [1, 2, 3], [0.0] * 3, 0.5, token_advantages=[0.1, 0.2, 0.3])
    b = TrainSequence([5, 6], [4], [0.0], -1.0)
    (mb,) = collate([a, b], 4, "cpu")
    assert mb.adv.shape == (2, 3)
    assert torch.equal(mb.adv, torch.tensor([[0.1, 0.2, 0.3], [-1.0, -1.0, -1.0]]))
    (plain,) = collate([b], 4, "cpu")
    assert plain.adv.shape == (1,)


@dataclass
class Scripted:
    """A stand-in for the rollout pool's generate: each call's requests are answered from a script, in order;
    every token's entropy is given by `entropy` (token id -> value). Records the calls."""

    script: list[list[list[list[int]]]]  # per call, per request, the n samples' tokens
    entropy: dict[int, float]
    calls: list[tuple[list[list[int]], object, object]] = field(default_factory=list)

    def generate(self, prompts, n, max_tokens=None, engines=None, top_logprobs=0):
        self.calls.append((prompts, n, max_tokens))
        caps = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
        out = []
        for p, samples, m in zip(prompts, self.script[len(self.calls) - 1], caps, strict=True):
            group = []
            for toks in samples:
                finish = "length" if m is not None and len(toks) >= m else "stop"
                ent = [self.entropy.get(t, 0.0) for t in toks]
                group.append(Completion(toks, [-0.5] * len(toks), "", finish, entropy=ent, cached_tokens=len(p) - 1))
            out.append(group)
        return out


def config(**tree) -> JobConfig:
    return JobConfig.model_validate(
        {"rollout": {"group_size": 4, "max_new_tokens": 8, "tree": tree}, "algorithm": {"overlong_buffer": 0}}
    )


def test_the_round_loop_grows_each_group_to_its_leaf_count_in_one_call_per_round():
    cfg = config(roots=2, branch_points=1, branches=2)
    engine = Scripted(
        script=[
            [[[1, 2, 3], [4, 5]]],  # roots of the one prompt
            [[[7, 7], [8]]],  # 2 continuations after [1] (position 1 of [1 2 3], entropy 0.9)
        ],
        entropy={2: 0.9, 5: 0.7, 3: 0.4},
    )
    (tree,), stats = grow_groups(cfg, [[100, 101]], engine)
    assert [tree.tokens(leaf) for leaf in tree.leaves()] == [[4, 5], [1, 2, 3], [1, 7, 7], [1, 8]]
    # the branch request: prompt + the shared prefix, 2 samples, the rest of the token cap
    assert engine.calls[1] == ([[100, 101, 1]], [2], [7])
    assert (stats.generated, stats.unique, stats.flat, stats.leaves, stats.rounds) == (8, 8, 10, 4, 1)
    assert stats.metrics()["tree/prefix_cache_hit"] == pytest.approx(2 / 3)  # the stand-in's cache: all but one
    completions = leaf_completions(tree, type("Tok", (), {"decode": lambda self, ids, **_: " ".join(map(str, ids))})())
    assert [c.text for c in completions] == ["4 5", "1 2 3", "1 7 7", "1 8"]
    seqs, masked = tree_sequences(cfg, tree, [100, 101], [1.0, 0.0, 0.0, 1.0], None)
    assert masked == 0 and len(seqs) == 4
    # tree credit: [1] is one loss term (its first copy), with the mean advantage of the three leaves below it
    assert [s.loss_mask for s in seqs] == [[True, True], [True, True, True], [False, True, True], [False, True]]
    a = 0.5 / math.sqrt(1 / 3)  # GRPO on rewards 1 0 0 1: (r - 0.5) / sd, sd = sqrt(1/3)
    assert seqs[1].token_advantages == pytest.approx([-a / 3, -a, -a], rel=1e-5)
    assert seqs[3].token_advantages == pytest.approx([-a / 3, a], rel=1e-5)


def test_lookahead_pruning_drops_a_continuation_that_repeats_a_path_from_its_fork():
    cfg = config(roots=2, branch_points=1, branches=2, prune_lookahead=1)
    engine = Scripted(
        script=[
            [[[1, 2, 3], [4, 5]]],
            [[[2], [6]]],  # lookahead of 1 token after [1]: [2] repeats [1 2 3]'s path -> pruned; [6] goes on
            [[[9]]],  # the survivor's rest, from [1 6]
            [[[3]]],  # round 2, one leaf short: the next fork (after [4], 0.7); [3] is new
            [[[7]]],  # its rest
        ],
        entropy={2: 0.9, 5: 0.7, 3: 0.4},
    )
    (tree,), stats = grow_groups(cfg, [[100]], engine)
    assert stats.pruned == 1
    assert engine.calls[2] == ([[100, 1, 6]], [1], [6])  # the rest of the cap: 8 - the prefix - the lookahead
    assert sorted(tree.tokens(leaf) for leaf in tree.leaves()) == [[1, 2, 3], [1, 6, 9], [4, 3, 7], [4, 5]]
    assert (stats.generated, stats.rounds) == (5 + 2 + 1 + 1 + 1, 2)


def test_the_dashboard_record_of_a_tree_names_each_segment_its_parent_and_each_leaf_its_reward():
    from actors.driver.tree_rollout import tree_record

    t = apply_branch(two_roots(), (1,), Node(-1, (8, 9), (), (0.3, 0.2)))  # nodes: [1] [4 5] [2 3] [8 9]
    tok = type("Tok", (), {"decode": lambda self, ids, **_: f"<{ids[0]}>"})()
    rec = tree_record(t, [1.0, 0.0, 0.5], tok, shown=2)
    assert [n["parent"] for n in rec["nodes"]] == [-1, -1, 0, 0]
    assert [n["tokens"] for n in rec["nodes"]] == [["<1>"], ["<4>", "<5>"], ["<2>", "<3>"], ["<8>", "<9>"]]
    assert rec["nodes"][3]["entropy"] == [0.3, 0.2] and rec["shown"] == 2 and not rec["truncated"]
    assert rec["leaves"] == [{"node": 1, "reward": 1.0}, {"node": 2, "reward": 0.0}, {"node": 3, "reward": 0.5}]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rollout": {"group_size": 4, "tree": {"roots": 5}}}, "rollout.tree.roots=5 must be <= rollout.group_size=4"),
        ({"rollout": {"tree": {"entropy": "learner"}}, "trainer": {"max_staleness": 1}, "algorithm": {"tis_cap": 2.0}},
         "rollout.tree.entropy=learner with trainer.max_staleness=1"),
        ({"rollout": {"tree": {}}, "algorithm": {"policy_loss": "gspo"}},
         "credit=tree with algorithm.policy_loss=gspo"),
        ({"rollout": {"tree": {"credit": "leaf"}}}, "rollout.tree.credit"),
    ],
)  # fmt: skip
def test_a_tree_config_that_cannot_work_is_refused_naming_the_setting(settings, message):
    from actors.common.config_load import ConfigError, load_config

    with pytest.raises((ValueError, ConfigError), match=re.escape(message)):
        load_config(None, [f"{k}={json.dumps(v)}" for k, v in settings.items()])
    JobConfig.model_validate({"rollout": {"tree": {"credit": "flat"}}, "algorithm": {"policy_loss": "gspo"}})
