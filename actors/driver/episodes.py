"""Multi-turn episodes (`environment`): the turn loop between the rollout engines and the environment.

Turn 1 samples each prompt's G trajectories in one request (n = G); every later turn continues each
unfinished trajectory from its exact token ids - the prompt, the model's sampled tokens, the
observations' tokens - all in one batch, so the turns of different trajectories interleave in the
engines and their shared prefixes come from vLLM's prefix cache. Nothing is ever re-tokenised: the
model's tokens are the engine's ids, an observation is tokenised once when it is appended. The loop
lives in the driver, beside the synchronous rounds, because it alternates between two pools (the
rollout engines and the reward workers that host the environment).

A turn that is a tool call (it ends on one of `environment.stop`, or with the chat template's format
holds a <tool_call>: actors.driver.tool_format) is answered by the environment (or it says `done`). A
turn that ends otherwise - end of sequence, the per-turn cap `rollout.max_new_tokens` -
ends the episode, as do `max_turns` model turns (`finish_reason` "turns": the last call goes
unanswered) and a response that would pass `environment.max_tokens` ("length": truncated, as a
single-turn completion at its cap, and masked the same way by `algorithm.overlong_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors.common.batch import Completion
from actors.common.config import JobConfig
from actors.common.env_config import EnvironmentConfig
from actors.common.episode import Episode, EpisodeState, Observation
from actors.driver.data import Example
from actors.driver.tool_format import TurnFormat, turn_format

__all__ = [
    "EPISODE_COUNTS",
    "Trajectory",
    "answer_call",
    "episode_counts",
    "episode_rates",
    "generate_groups",
    "take_turns",
]

# counted per round and added up over the step (actors.algo.metrics); episode_rates divides them
EPISODE_COUNTS = (
    "env/episodes", "env/turns", "env/tool_calls", "env/tool_errors", "env/tool_timeouts", "env/truncated",
    "env/observation_tokens", "env/context_tokens",
)  # fmt: skip


@dataclass
class Trajectory:
    prompt_ids: list[int]
    example: Example
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    finish: str | None = None
    versions: tuple[int, int] | None = None  # asynchronous mode: the first turn's first policy, the last's last
    last_turn: list[int] = field(default_factory=list)  # the model's last turn's ids

    def add_turn(self, c: Completion) -> None:
        self.last_turn = c.token_ids
        self.ids += c.token_ids
        self.logprobs += c.logprobs
        self.mask += [True] * len(c.token_ids)
        self.actions.append(c.text)
        if c.versions is not None:
            self.versions = c.versions if self.versions is None else (self.versions[0], c.versions[1])

    def context(self) -> list[int]:
        """The ids the next turn continues from: the prompt, the model's turns and the observations."""
        return self.prompt_ids + self.ids

    def budget(self, env: EnvironmentConfig, per_turn: int) -> int:
        """The next turn's token cap: the per-turn cap, or what is left of the episode's budget."""
        return min(per_turn, env.max_tokens - len(self.ids))

    def add_observation(self, ids: list[int]) -> None:
        self.ids += ids
        self.logprobs += [0.0] * len(ids)
        self.mask += [False] * len(ids)

    def state(self) -> EpisodeState:
        return EpisodeState(self.example.prompt, str(self.example.answer), list(self.actions), list(self.observations))

    def completion(self, call_reward: float) -> Completion:
        calls = [o for o in self.observations if not (o.done and not o.text)]
        reward = sum(o.reward for o in self.observations) + (call_reward if any(o.ok for o in calls) else 0.0)
        episode = Episode(
            turns=len(self.actions), tool_calls=len(calls), tool_errors=sum(not o.ok for o in calls),
            tool_timeouts=sum(o.timed_out for o in calls), observation_tokens=self.mask.count(False),
            reward=reward, truncated=self.finish in ("length", "turns"),
        )  # fmt: skip
        return Completion(
            self.ids, self.logprobs, "".join(self.actions), self.finish, self.versions, self.mask, episode
        )


def generate_groups(
    cfg: JobConfig, examples: list[Example], prompts: list[list[int]], n: int, rollout: Any, rewards: Any,
    tokenizer: Any, temperature: float | None = None,
) -> tuple[list[list[Completion]], dict[str, float]]:  # fmt: skip
    """For each prompt, n completions: single-turn samples, or with `environment` n finished episodes
    (and their counts, EPISODE_COUNTS)."""
    env = cfg.environment
    if env is None:
        return rollout.generate(prompts, n, **({} if temperature is None else {"temperature": temperature})), {}
    fmt, per_turn = turn_format(env, tokenizer, cfg.data.use_chat_template), cfg.rollout.max_new_tokens
    stop = fmt.stop
    trajs = [Trajectory(p, ex) for p, ex in zip(prompts, examples, strict=True) for _ in range(n)]
    first = rollout.generate(prompts, n, max_tokens=min(per_turn, env.max_tokens), stop=stop, temperature=temperature)
    outs = [c for group in first for c in group]
    active = list(range(len(trajs)))
    while active:
        calls = take_turns([trajs[i] for i in active], outs, active, fmt)
        answers = rewards.env_step([trajs[i].state() for i in calls]) if calls else []
        active = [i for i, obs in zip(calls, answers, strict=True) if answer_call(trajs[i], obs, fmt)]
        if active:
            budgets = [trajs[i].budget(env, per_turn) for i in active]
            contexts = [trajs[i].context() for i in active]
            nxt = rollout.generate(contexts, 1, max_tokens=budgets, stop=stop, temperature=temperature)
            outs = [group[0] for group in nxt]
    done = [t.completion(env.call_reward) for t in trajs]
    return [done[i * n : (i + 1) * n] for i in range(len(prompts))], episode_counts(trajs, done)


def take_turns(trajs: list[Trajectory], outs: list[Completion], ids: list[int], fmt: TurnFormat) -> list[int]:
    """Append each trajectory's new turn; the ids of those whose turn is a call the environment answers."""
    calls = []
    for i, t, c in zip(ids, trajs, outs, strict=True):
        t.add_turn(c)
        if not fmt.is_call(c):
            t.finish = c.finish_reason or "stop"
        elif len(t.actions) >= fmt.env.max_turns:
            t.finish = "turns"  # no model turn is left to read the answer
        else:
            calls.append(i)
    return calls


def answer_call(t: Trajectory, obs: Observation, fmt: TurnFormat) -> bool:
    """Record the environment's answer; True when the episode goes on with the observation appended."""
    t.observations.append(obs)
    if obs.done:
        t.finish = "stop"
        return False
    ids = fmt.observation_ids(obs.text, t.last_turn)
    if len(t.ids) + len(ids) >= fmt.env.max_tokens:  # no room left for the model to read it and answer
        t.finish = "length"
        return False
    t.add_observation(ids)
    return True


def episode_counts(trajs: list[Trajectory], done: list[Completion]) -> dict[str, float]:
    eps = [c.episode for c in done if c.episode is not None]
    return {
        "env/episodes": float(len(eps)),
        "env/turns": float(sum(e.turns for e in eps)),
        "env/tool_calls": float(sum(e.tool_calls for e in eps)),
        "env/tool_errors": float(sum(e.tool_errors for e in eps)),
        "env/tool_timeouts": float(sum(e.tool_timeouts for e in eps)),
        "env/truncated": float(sum(e.truncated for e in eps)),
        "env/observation_tokens": float(sum(e.observation_tokens for e in eps)),
        "env/context_tokens": float(sum(len(t.prompt_ids) + len(t.ids) for t in trajs)),
    }


def episode_rates(m: dict[str, Any]) -> dict[str, float]:
    """Per-episode means and shares from a step's summed counts (empty without episodes)."""
    episodes = m.get("env/episodes", 0.0)
    if not episodes:
        return {}
    calls = m["env/tool_calls"]
    return {
        "env/turns_mean": m["env/turns"] / episodes,
        "env/tool_calls_mean": calls / episodes,
        "env/tool_error_rate": m["env/tool_errors"] / calls if calls else 0.0,
        "env/truncated_frac": m["env/truncated"] / episodes,
        "env/observation_share": m["env/observation_tokens"] / max(m["env/context_tokens"], 1.0),
    }
