"""Multi-turn episodes through the real pools (Ray, vLLM on CPU, DeepSpeed on gloo, the tiny random
Llama, an environment in the reward workers): the trajectory's bookkeeping is exact - the learner
scores the model's tokens of a multi-turn trajectory as the engine sampled them - and a job with an
environment trains, evaluates with episodes, records their metrics and resumes in the same data order.
Marked slow."""

import json

import pytest

from actors.common.batch import TrainSequence
from actors.driver.data import PromptSampler, load_examples, render_prompt
from actors.driver.episodes import generate_groups
from actors.driver.loop import train
from actors.driver.sampling import batch_fingerprint

from .conftest import tiny_config

pytestmark = pytest.mark.slow

# the random model writes "e" within a few tokens almost every turn: a stop string that makes turns
ENV = "environment={tool: {type: plugin, function: 'tests.toy_rewards:counting_environment'}, stop: ['e'], " \
      "max_turns: 3, max_tokens: 48, max_observation_tokens: 8}"  # fmt: skip


def test_the_learner_scores_a_multi_turn_trajectory_as_the_engine_sampled_it(ray_local, tiny_path, tmp_path):
    from actors.driver.runtime import load_tokenizer
    from actors.learner.group import LearnerGroup
    from actors.reward.pool import RewardPool
    from actors.rollout.pool import RolloutPool

    cfg = tiny_config(tmp_path, ENV, "learner.num_learners=1", "rollout.max_new_tokens=12")
    tokenizer = load_tokenizer(tiny_path)
    rollout = RolloutPool(tiny_path, cfg.rollout, "float32", 0)
    rewards = RewardPool(cfg.reward, cfg.environment)
    learners = LearnerGroup(tiny_path, cfg.learner, cfg.algorithm, cfg.rollout, 0, "float32")
    try:
        examples = load_examples(cfg.data)[:3]
        prompts = [render_prompt(tokenizer, ex, cfg.data) for ex in examples]
        groups, counts = generate_groups(cfg, examples, prompts, 4, rollout, rewards, tokenizer)
        trajs = [(p, c) for p, g in zip(prompts, groups, strict=True) for c in g]
        multi = [(p, c) for p, c in trajs if c.model_mask is not None and not all(c.model_mask)]
        assert len(multi) >= 4 and counts["env/tool_calls"] >= 4, counts  # turns happened
        assert all(c.episode is not None and c.episode.turns >= 2 for _, c in multi)
        scored = learners.score(
            [TrainSequence(p, c.token_ids, c.logprobs, 0.0, loss_mask=c.model_mask) for p, c in multi]
        )
        gaps = []
        for (_, c), lp in zip(multi, scored, strict=True):
            engine = _model_lp(c)
            assert len(lp) == len(engine)  # the model's tokens, in order; observations are not scored
            gaps += [abs(a - b) for a, b in zip(lp, engine, strict=True)]
        assert max(gaps) < 2e-2, max(gaps)
        # the control: without the observations in their context the learner scores the same tokens otherwise
        kept = [[t for t, m in zip(c.token_ids, c.model_mask, strict=True) if m] for _, c in multi]
        plain = [TrainSequence(p, ids, [0.0] * len(ids), 0.0) for (p, _), ids in zip(multi, kept, strict=True)]
        stripped = learners.score(plain)
        pairs = [zip(lp, _model_lp(c), strict=True) for (_, c), lp in zip(multi, stripped, strict=True)]
        off = [abs(a - b) for pair in pairs for a, b in pair]
        assert max(off) > max(0.05, 10 * max(gaps)), (max(off), max(gaps))
    finally:
        rollout.shutdown()
        learners.shutdown()


def _model_lp(c) -> list[float]:
    """The engine's log-probs of a trajectory's model tokens."""
    return [x for x, m in zip(c.logprobs, c.model_mask, strict=True) if m]


def test_a_job_with_an_environment_trains_evaluates_and_resumes_in_the_same_order(ray_local, tmp_path):
    settings = [ENV, "algorithm.dynamic_sampling=false", "trainer.save_every=1", "trainer.eval_every=2",
                "trainer.eval_prompts=4", "trainer.export_hf=false"]  # fmt: skip
    train(tiny_config(tmp_path, *settings, "trainer.steps=1"))
    train(tiny_config(tmp_path, *settings, "trainer.steps=2"))  # resumes at step 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]  # 0: the evaluation before training, once
    assert set(rows[0]) >= {"eval/reward_mean", "eval/reward_stderr"} and "reward/mean" not in rows[0]
    rows = rows[1:]
    cfg = tiny_config(tmp_path, *settings)
    sampler = PromptSampler(load_examples(cfg.data), cfg.data.prompts_per_step, cfg.trainer.seed, cfg.data.shuffle)
    assert [r["data/batch_crc"] for r in rows] == [batch_fingerprint(sampler.next()) for _ in range(2)]
    for r in rows:
        assert r["env/episodes"] == 16 and r["env/tool_calls"] > 0 and 0 < r["env/observation_share"] < 1, r
        assert 1 <= r["env/turns_mean"] <= 3 and r["batch/sequences"] > 0
    assert "eval/reward_mean" in rows[1]
    shown = [s for r in rows for s in r.get("samples", [])]
    assert any(1 in s.get("observation", []) for s in shown)  # the dashboard can set observations apart


def test_episodes_stream_in_asynchronous_mode(ray_local, tmp_path):
    """max_staleness 1: each trajectory's turns are requests of their own; the group is trained once its
    last episode ended, within the staleness bound, with its turns' policy versions."""
    train(tiny_config(tmp_path, ENV, "trainer.max_staleness=1", "algorithm.tis_cap=2.0",
                                "trainer.steps=3", "trainer.save_every=0", "trainer.export_hf=false"))  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["async/staleness_max"] <= 1 and r["batch/sequences"] > 0, r
        assert r["env/tool_calls"] > 0 and r["env/turns_mean"] > 1, r
