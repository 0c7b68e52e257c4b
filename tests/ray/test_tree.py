"""Tree rollouts through the real pools (Ray, vLLM on CPU, DeepSpeed on gloo, the tiny random Llama): a
group grows to its leaf count with its branches served from vLLM's prefix cache, the learner scores every
leaf as the engine sampled it, the engine's top-k entropy is a lower bound of the learner's exact one,
and a job trains on trees with the entropy filter counting each unique token once (asynchronous mode:
tests/ray/test_async.py::test_async_steps_keep_the_filter_exact_and_bound_the_staleness). Marked slow."""

import json

import pytest

from actors.common.batch import TrainSequence
from actors.driver.data import load_examples, render_prompt
from actors.driver.loop import train
from actors.driver.tree_rollout import grow_groups

from .conftest import tiny_config

pytestmark = pytest.mark.slow

TREE = "rollout.tree={roots: 2, branch_points: 2, branches: 2}"
BLOCKS = "rollout.kv_block_size=32"  # vLLM's CPU default (128) holds none of these short prompts' prefixes


def test_a_tree_grows_from_the_prefix_cache_and_the_learner_scores_its_leaves_as_the_engine(
    ray_local, tiny_path, tmp_path
):
    from actors.driver.runtime import load_tokenizer
    from actors.learner.group import LearnerGroup
    from actors.rollout.pool import RolloutPool

    # a system prompt long enough (~80 tokens) that every branch's prompt fills two 32-token blocks
    system = "data.system_prompt=" + " ".join(["Answer the question with a single number and nothing else."] * 6)
    common = [BLOCKS, system, "learner.num_learners=1", "rollout.group_size=6", "rollout.max_new_tokens=24"]
    cfg = tiny_config(tmp_path, TREE, *common)
    tokenizer = load_tokenizer(tiny_path)
    rollout = RolloutPool(tiny_path, cfg.rollout, "float32", 0)
    learners = LearnerGroup(tiny_path, cfg.learner, cfg.algorithm, cfg.rollout, 0, "float32")
    try:
        prompts = [render_prompt(tokenizer, ex, cfg.data) for ex in load_examples(cfg.data)[:3]]
        trees, stats = grow_groups(cfg, prompts, rollout)
        assert [len(t.leaves()) for t in trees] == [6, 6, 6]
        assert stats.unique < stats.flat  # the shared prefixes were generated once
        assert stats.generated == stats.unique  # nothing pruned: every generated token is in a tree
        m = stats.metrics()
        assert m["tree/prefix_cache_hit"] > 0.5, m  # the branches' prompts came from the cache (0 at 128 tokens)
        leaves = [(p, t, leaf) for p, t in zip(prompts, trees, strict=True) for leaf in t.leaves()]
        seqs = [TrainSequence(p, t.tokens(leaf), [0.0] * len(t.tokens(leaf)), 0.0) for p, t, leaf in leaves]
        scored = learners.score(seqs)
        gaps = [abs(a - b) for (_, t, leaf), lp in zip(leaves, scored, strict=True)
                for a, b in zip(lp, t.leaf_field(leaf, "logprobs"), strict=True)]  # fmt: skip
        assert len(gaps) == stats.flat and max(gaps) < 2e-2, max(gaps)
        # the engine's entropy from its top 20 tokens never exceeds the learner's exact entropy
        exact = learners.score(seqs, entropy=True)
        pairs = [(a, b) for (_, t, leaf), h in zip(leaves, exact, strict=True)
                 for a, b in zip(t.leaf_field(leaf, "entropy"), h, strict=True)]  # fmt: skip
        assert all(a <= b + 1e-3 for a, b in pairs), max(a - b for a, b in pairs)
        assert sum(b for _, b in pairs) > sum(a for a, _ in pairs)  # a random model spreads past its top 20
        # the learner's entropy as the branch points' source: the agreement with the engine's choice is reported
        learner_cfg = tiny_config(tmp_path, TREE.replace("}", ", entropy: learner}"), *common)
        trees, stats = grow_groups(learner_cfg, prompts[:2], rollout, learners)
        assert [len(t.leaves()) for t in trees] == [6, 6] and 0.0 <= stats.metrics()["tree/branch_agreement"] <= 1.0
        assert all(len(n.exact) == len(n.tokens) for t in trees for n in t.nodes)  # the learner's entropy throughout
    finally:
        rollout.shutdown()
        learners.shutdown()


def test_a_job_trains_on_trees_with_each_unique_token_counted_once(ray_local, tmp_path):
    # two PPO mini-batches: the old log-probs are taken once, at every position of each leaf
    settings = [TREE, BLOCKS, "rollout.group_size=6", "algorithm.dynamic_sampling=false",
                "algorithm.overlong_mask=false", "algorithm.ppo_mini_batch=2", "trainer.steps=2",
                "trainer.save_every=0", "trainer.export_hf=false"]  # fmt: skip
    summary = train(tiny_config(tmp_path, *settings))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and summary["steps_run"] == 2
    for r in rows:
        assert r["tree/leaves_mean"] == 6.0 and r["tree/unique_tokens"] < r["tree/flat_tokens"], r
        # tree credit: the filter's N is the unique tokens (every group is trained: no dynamic sampling),
        # over the step's two optimizer steps
        assert r["entropy/num_valid"] == r["tree/unique_tokens"] and r["actor/optimizer_steps"] == 2, r
        assert r["batch/sequences"] == 4 * 6
