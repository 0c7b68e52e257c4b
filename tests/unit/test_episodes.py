"""Multi-turn episodes: the environment section, the built-in tools (the python tool in the real
bubblewrap sandbox), the environment step of a reward worker, and the turn loop's bookkeeping.

The turn loop's engine is scripted here (`Scripted`: the completions it returns are written by hand,
so the bookkeeping can be checked token by token); tests/ray/test_episodes.py runs the same loop with
vLLM and checks the learner's log-probs against the engine's."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from actors.common.batch import Completion
from actors.common.config import RewardConfig
from actors.common.config_load import ConfigError, load_config
from actors.common.env_config import EnvironmentConfig
from actors.common.episode import EpisodeState, Observation
from actors.driver.data import Example
from actors.driver.episodes import episode_rates, generate_groups
from actors.reward.environments import calculator, python_tool
from actors.reward.pool import RewardWorker


def _state(action: str) -> EpisodeState:
    return EpisodeState("What is 2+3?", "5", [action], [])


def _config(*overrides: str):
    return load_config("examples/tiny.yaml", ["environment={tool: {type: calculator}, max_tokens: 128}", *overrides])


def test_the_environment_section_defaults_and_refusals():
    cfg = _config()
    assert cfg.environment is not None and cfg.environment.stop_strings() == ["</calc>"]
    assert cfg.environment.template() == "<result>{output}</result>\n"
    assert EnvironmentConfig().stop_strings() == ["```\n"]  # the python tool's closing fence
    with pytest.raises(ValidationError, match=r"observation_template='no slot' must hold \{output\}"):
        EnvironmentConfig(observation_template="no slot")
    with pytest.raises(ValidationError, match=r"not a valid template"):
        EnvironmentConfig(observation_template="{output} {other}")
    with pytest.raises(ConfigError, match=r"environment.max_tokens=300 must be < rollout.max_model_len=256"):
        _config("environment.max_tokens=300")
    assert _config("trainer.max_staleness=1", "algorithm.tis_cap=2.0").environment is not None  # episodes stream too
    with pytest.raises(ConfigError, match=r"environment.tool.function"):
        _config("environment.tool={type: plugin, function: 'not a path'}")


def test_the_calculator_answers_arithmetic_and_refuses_everything_else():
    calc = calculator(EnvironmentConfig(tool={"type": "calculator"}).tool)  # type: ignore[arg-type]
    assert calc(_state("Let me add. <calc>3*(4+5)</calc>")) == Observation("27")
    assert calc(_state("<calc>1</calc> then <calc>7/2</calc>")).text == "3.5"  # the turn's last call
    assert calc(_state("The answer is 5.")).done  # no call: the episode ends
    for bad in ("9**9**9", "__import__('os')", "x + 1", "'a' * 10**8", "(" * 300):
        obs = calc(_state(f"<calc>{bad}</calc>"))
        assert not obs.ok and obs.text.startswith("error:"), (bad, obs)


def test_the_python_tool_answers_with_the_programs_output_and_contains_attacks():
    tool = python_tool(EnvironmentConfig().tool, wall_s=3)  # type: ignore[arg-type]
    assert tool(_state("```python\nprint(2 + 3)\n```\n")) == Observation("5")
    assert tool(_state("No code here: 5")).done
    error = tool(_state("```python\n1 / 0\n```\n"))
    assert not error.ok and "ZeroDivisionError" in error.text
    t0 = time.monotonic()
    attacks = {
        "loop": "while True:\n    pass",
        "flood": "print('x' * 10**7)",
        "fork": "import os\nwhile True:\n    os.fork()",
        "network": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)",
    }
    for name, program in attacks.items():
        obs = tool(_state(f"```python\n{program}\n```\n"))
        assert not obs.ok, (name, obs)
        assert len(obs.text) < 4096 + 100, name  # capped at max_output_bytes
    assert time.monotonic() - t0 < 40
    assert tool(_state("```python\nprint('still here')\n```\n")).text == "still here"  # the worker is as it was


def test_a_reward_worker_contains_a_plugin_environment_that_raises_or_hangs():
    env = {"tool": {"type": "plugin", "function": "tests.toy_rewards:moody_environment"}, "timeout_s": 1}
    worker = RewardWorker(RewardConfig(), EnvironmentConfig.model_validate(env))
    t0 = time.monotonic()
    out = worker.env_step([_state("raise"), _state("hang"), _state("hello"), _state("wrong type")])
    assert [o.ok for o in out] == [False, False, True, False]
    assert out[1].timed_out and out[2] == Observation("HELLO", reward=0.5)
    assert time.monotonic() - t0 < 10


class Scripted:
    """A stand-in for the rollout pool whose turns are written by hand: each call pops the next turn
    for every context, keyed by the number of turns that context holds already."""

    def __init__(self, turns: dict[int, list[Completion]]) -> None:
        self.turns = turns
        self.calls: list[tuple[list[list[int]], int, object]] = []

    def generate(self, prompts, n, max_tokens=None, stop=None, temperature=None):
        self.calls.append((prompts, n, max_tokens))
        turn = len(self.calls) - 1
        return [[self.turns[turn][i * n + j] for j in range(n)] for i in range(len(prompts))]


class Calc:
    def __init__(self) -> None:
        self.env = calculator(EnvironmentConfig(tool={"type": "calculator"}).tool)  # type: ignore[arg-type]

    def env_step(self, states):
        return [self.env(s) for s in states]


class Chars:
    """A tokenizer of one id per character (ord), so the observation's ids can be read."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def _turn(text: str, finish: str = "stop") -> Completion:
    ids = [ord(c) for c in text]
    return Completion(ids, [-0.5] * len(ids), text, finish)


def test_the_turn_loop_keeps_the_exact_ids_masks_the_observations_and_counts():
    cfg = _config("rollout.group_size=2", "environment.max_turns=3", "environment.max_tokens=200",
                  "environment.call_reward=0.25", "rollout.max_new_tokens=100")  # fmt: skip
    engine = Scripted({
        0: [_turn("A<calc>2+3</calc>"), _turn("5", "stop")],  # episode 0 calls; episode 1 answers at once
        1: [_turn("B<calc>1/0</calc>")],  # episode 0 calls again: an error
        2: [_turn("C<calc>1</calc>")],  # a third call at max_turns: unanswered, truncated
    })  # fmt: skip
    groups, counts = generate_groups(cfg, [Example("q", "5")], [[1, 2]], 2, engine, Calc(), Chars())
    a, b = groups[0]
    obs1, obs2 = "<result>5</result>\n", "<result>error: ZeroDivisionError: division by zero</result>\n"
    assert a.token_ids == [ord(c) for c in "A<calc>2+3</calc>" + obs1 + "B<calc>1/0</calc>" + obs2 + "C<calc>1</calc>"]
    assert a.model_mask == [True] * 17 + [False] * len(obs1) + [True] * 17 + [False] * len(obs2) + [True] * 15
    assert [lp for lp, m in zip(a.logprobs, a.model_mask, strict=True) if not m] == [0.0] * (len(obs1) + len(obs2))
    assert a.text == "A<calc>2+3</calc>B<calc>1/0</calc>C<calc>1</calc>"  # the model's turns: what is verified
    assert a.finish_reason == "turns" and a.episode is not None
    assert (a.episode.turns, a.episode.tool_calls, a.episode.tool_errors, a.episode.truncated) == (3, 2, 1, True)
    assert a.episode.reward == 0.25  # one call ran without error
    assert b.token_ids == [ord("5")] and b.model_mask == [True] and b.episode.reward == 0.0
    # every later turn continues from the exact ids, with what is left of the budget (and the turn cap)
    _, _, budgets = engine.calls[1]
    assert engine.calls[0][2] == 100 and budgets == [100]
    assert engine.calls[1][0] == [[1, 2] + a.token_ids[: 17 + len(obs1)]]
    assert engine.calls[2][2] == [200 - (34 + len(obs1) + len(obs2))]
    assert counts["env/episodes"] == 2 and counts["env/tool_calls"] == 2 and counts["env/truncated"] == 1
    rates = episode_rates(counts)
    assert rates["env/turns_mean"] == 2.0 and rates["env/tool_error_rate"] == 0.5
    assert rates["env/observation_share"] == pytest.approx((len(obs1) + len(obs2)) / (2 + len(a.token_ids) + 2 + 1))


def test_an_observation_that_leaves_no_room_ends_the_episode_as_length():
    cfg = _config("rollout.group_size=2", "environment.max_tokens=24", "rollout.max_new_tokens=20")
    engine = Scripted({0: [_turn("A<calc>2+3</calc>"), _turn("x" * 20, "length")]})
    groups, counts = generate_groups(cfg, [Example("q", "5")], [[1]], 2, engine, Calc(), Chars())
    a, b = groups[0]
    assert a.finish_reason == "length" and a.token_ids == [ord(c) for c in "A<calc>2+3</calc>"]  # not appended
    assert b.finish_reason == "length" and b.episode.truncated  # the per-turn cap ended it
    assert len(engine.calls) == 1 and counts["env/truncated"] == 2


def test_observation_tokens_get_no_gradient_and_change_neither_k_nor_the_threshold():
    """Trajectories whose observations carry the step's highest entropies, against a reference that strips
    the observations out: the same N, k, threshold, kept tokens, loss and gradient; zero gradient on them."""
    import torch

    from actors.algo.entropy_filter import plan_step
    from actors.algo.loss import loss_normalizer, policy_loss
    from actors.common.batch import TrainSequence, collate
    from actors.common.config import AlgorithmConfig

    g = torch.Generator().manual_seed(3)
    lengths, masks = [9, 6, 11, 4], [[True] * 9, [True] * 6, [True] * 11, [True] * 4]
    masks[0][3:6] = [False] * 3  # two trajectories with observations in the middle
    masks[2][2:4], masks[2][7:10] = [False] * 2, [False] * 3
    ents = [torch.rand(n, generator=g) for n in lengths]
    for e, m in zip(ents, masks, strict=True):  # observations: the highest entropies of the step
        e[~torch.tensor(m)] = 9.0
    lp = [torch.randn(n, generator=g) - 1 for n in lengths]
    adv = [1.0, -0.5, 0.7, -1.2]

    def step(seqs, entropies, logps):
        (mb,) = collate(seqs, 8, "cpu")
        h = torch.zeros(mb.valid.shape)
        logp = torch.zeros(mb.valid.shape)
        for i, (e, x) in enumerate(zip(entropies, logps, strict=True)):
            h[i, : len(e)], logp[i, : len(x)] = e, x
        logp.requires_grad_(True)
        plan = plan_step([h], [mb.valid], 0.2)
        counts = {"num_valid_tokens": plan.num_valid, "num_selected_tokens": plan.num_kept}
        norm = loss_normalizer("token_mean_selected", **counts, num_sequences=plan.num_sequences, max_response_len=16)
        loss, _ = policy_loss(logp, logp.detach() + 0.1, mb.adv, mb.valid, plan.masks[0], AlgorithmConfig(),
                              normalizer=norm)  # fmt: skip
        loss.backward()
        return plan, loss, logp.grad, mb.valid

    full = [
        TrainSequence([1], list(range(n)), [0.0] * n, a, loss_mask=m)
        for n, m, a in zip(lengths, masks, adv, strict=True)
    ]
    plan, loss, grad, valid = step(full, ents, lp)
    keep = [torch.tensor(m) for m in masks]
    stripped = [
        TrainSequence([1], list(range(int(k.sum()))), [0.0] * int(k.sum()), a) for k, a in zip(keep, adv, strict=True)
    ]
    ref_plan, ref_loss, ref_grad, ref_valid = step(
        stripped, [e[k] for e, k in zip(ents, keep, strict=True)], [x[k] for x, k in zip(lp, keep, strict=True)]
    )
    assert plan.num_valid == ref_plan.num_valid == sum(sum(m) for m in masks) == 22
    assert plan.num_kept == ref_plan.num_kept == 5  # ceil(0.2 * 22): the observations are not counted
    assert float(plan.threshold.tau) == float(ref_plan.threshold.tau) < 1.0  # none of the 9.0s
    assert torch.equal(loss, ref_loss)
    for i, k in enumerate(keep):
        n = len(k)
        assert torch.equal(plan.masks[0][i, :n][k], ref_plan.masks[0][i, : int(k.sum())])  # the same tokens kept
        assert not plan.masks[0][i, :n][~k].any() and not valid[i, :n][~k].any()
        assert torch.equal(grad[i, :n][~k], torch.zeros(int((~k).sum())))  # no gradient on an observation
        assert torch.equal(grad[i, :n][k], ref_grad[i, : int(k.sum())])
