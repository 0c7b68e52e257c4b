"""Asynchronous mode's rollout side (trainer.max_staleness >= 1): the engines generate continuously,
one request per group, and the learner trains on what is ready.

`GroupStream.pump` keeps the streaming engines fed within the admission bound (`actors.driver.buffer`),
verifies each group as it finishes, and puts the groups with signal in the buffer (DAPO dynamic
sampling: "keep generating until the step is full"). `take` waits until a step's P groups are ready,
or until `algorithm.dynamic_sampling_max_rounds` x P groups finished since the previous step without
filling it (the step then trains on what it has, `batch/sampling_bound_hit`). `while_running` runs
the learner's step and the weight sync in a thread and pumps meanwhile: generation overlaps learning.

Multi-turn episodes (`environment`) stream too: a group's first request samples its G trajectories,
each call is answered as soon as its turn finishes and the trajectory's next turn is its own request,
so short and long episodes never wait for each other; the group is verified when its last episode ends.

An engine that dies mid-stream is replaced (with the current weights) and its groups are generated
again there; an engine that finishes nothing for rollout.generate_timeout_s while it has groups fails
the step, naming it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from actors.algo.advantages import groups_with_signal
from actors.algo.tree import Tree
from actors.common.batch import Completion
from actors.common.config import JobConfig
from actors.driver.buffer import GroupBuffer, StreamOrder, Waiting
from actors.driver.data import Example, render_prompt
from actors.driver.episodes import Trajectory, answer_call, episode_counts, episode_rates, take_turns
from actors.driver.sampling import Group, StepRollout, batch_fingerprint, score_groups
from actors.driver.tool_format import job_format
from actors.driver.tree_rollout import Growth, Request, TreeStats, leaf_completions

log = logging.getLogger("forkrl.stream")

__all__ = ["GroupStream"]

T = TypeVar("T")
POLL_S = 0.05  # how long one pump waits for a group to finish


@dataclass
class _InFlight:
    serial: int
    example: Example
    prompt_ids: list[int]
    engine: int
    episodes: list[Trajectory] | None = None  # multi-turn (environment): the group's trajectories
    turn_of: int | None = None  # a request for trajectory `turn_of`'s next turn, not the group's first
    growth: Growth | None = None  # rollout.tree: the group's tree as it grows
    request: Request | None = None  # rollout.tree: this request of it


class GroupStream:
    def __init__(self, cfg: JobConfig, order: StreamOrder, tokenizer: Any, rollout: Any, rewards: Any) -> None:
        self.cfg, self.order, self.tokenizer, self.rollout, self.rewards = cfg, order, tokenizer, rollout, rewards
        self.fmt = job_format(cfg, tokenizer)
        self.tools = None if self.fmt is None else self.fmt.tools
        self.need, self.g = cfg.data.prompts_per_step, cfg.rollout.group_size
        self.buffer = GroupBuffer(self.need, cfg.trainer.max_staleness)
        engines = cfg.rollout.num_engines
        self.max_inflight = cfg.rollout.max_inflight_groups or self.need * engines
        self.inflight: dict[Any, _InFlight] = {}  # ObjectRef -> the group it generates
        self.per_engine = [0] * engines
        self.learning = False
        self.last_progress = time.monotonic()
        self.tree_stats = TreeStats()  # rollout.tree: what growing the trees took since the previous step
        self._reset_step()

    def _reset_step(self) -> None:
        self.finished = self.discarded = self.with_signal = 0
        self.tree_stats.reset()  # in place: the growing trees count into it
        self.scores: list[float] = []
        self.lengths: list[int] = []
        self.verify_s = 0.0
        self.reward_parts: list[dict[str, float]] = []
        self.episode_parts: list[dict[str, float]] = []

    # -- generation ----------------------------------------------------------------------------

    def _groups_inflight(self) -> int:
        return len({f.serial for f in self.inflight.values()})

    def _start(self, f: _InFlight) -> None:
        """Submit f's request (a group, or a trajectory's next turn) to the least busy engine."""
        if not self.inflight:  # the generate timeout counts from here when nothing was running
            self.last_progress = time.monotonic()
        f.engine = min(range(len(self.per_engine)), key=lambda j: self.per_engine[j])
        if f.growth is not None:  # a tree's requests stay on one engine: its prefix cache holds their prefixes
            f.engine = f.growth.engine = f.engine if f.growth.engine is None else f.growth.engine
        fmt, kw = self.fmt, dict[str, Any]()
        context, n = f.prompt_ids, self.g
        if f.growth is not None and f.request is not None:  # a tree's request: roots, a branch, a survivor's rest
            context, n = f.growth.ids(f.request), f.request.n
            kw = {"max_tokens": f.request.max_tokens, "top_logprobs": f.growth.tc.top_logprobs}
        if fmt is not None:  # multi-turn: the turn's stop strings and token cap
            per_turn = self.cfg.rollout.max_new_tokens
            kw = {"stop": fmt.stop, "max_tokens": min(per_turn, fmt.env.max_tokens)}
            if f.turn_of is not None and f.episodes is not None:
                t = f.episodes[f.turn_of]
                context, n, kw["max_tokens"] = t.context(), 1, t.budget(fmt.env, per_turn)
        self.inflight[self.rollout.submit(f.engine, context, n, **kw)] = f
        self.per_engine[f.engine] += 1

    def _fill(self) -> None:
        groups = self._groups_inflight()
        room = min(self.buffer.room(groups, self.learning), self.max_inflight - groups)
        for _ in range(room):
            serial, ex = self.order.draw()
            prompt = render_prompt(self.tokenizer, ex, self.cfg.data, self.tools)
            episodes = None if self.cfg.environment is None else [Trajectory(prompt, ex) for _ in range(self.g)]
            tree = self.cfg.rollout.tree
            if tree is None:
                self._start(_InFlight(serial, ex, prompt, 0, episodes))
                continue
            growth = Growth(tree, prompt, self.g, self.cfg.rollout.max_new_tokens, self.tree_stats)
            for r in growth.first():
                self._start(_InFlight(serial, ex, prompt, 0, growth=growth, request=r))

    def pump(self, wait_s: float = POLL_S) -> None:
        """Start what the bound allows, then take in the groups that finished (waiting up to wait_s)."""
        import ray

        self._fill()
        if not self.inflight:
            time.sleep(wait_s)
            return
        done, _ = ray.wait(list(self.inflight), num_returns=1, timeout=wait_s)
        if done:  # and whatever else is ready by now
            done, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
        for ref in done:
            self._finished(ref)
        if not done and time.monotonic() - self.last_progress > self.cfg.rollout.generate_timeout_s:
            busy = ", ".join(f"rollout engine {i}" for i in sorted({f.engine for f in self.inflight.values()}))
            raise TimeoutError(
                f"{busy} did not finish a group within {self.cfg.rollout.generate_timeout_s:.0f} s "
                "(rollout.generate_timeout_s)"
            )

    def _finished(self, ref: Any) -> None:
        import ray
        from ray.exceptions import RayActorError

        f = self.inflight.pop(ref)
        self.per_engine[f.engine] -= 1
        try:
            completions = ray.get(ref)
        except RayActorError as e:  # the engine died: its groups (and turns) run again on its replacement
            self.rollout.replace(f.engine, e)  # waits for it once; then it returns at once for its other groups
            self._start(f)
            return
        self.last_progress = time.monotonic()
        tree = None
        if f.episodes is not None:
            ended = self._turn(f, completions)
            if ended is None:
                return  # the group's episodes go on
            completions = ended
        if f.growth is not None:
            tree = self._grown(f, completions)
            if tree is None:
                return  # the group's tree grows on
            completions = leaf_completions(tree, self.tokenizer)
        t0 = time.perf_counter()
        scores, reward_metrics = score_groups(self.rewards, [f.example], [completions])
        self.verify_s += time.perf_counter() - t0
        self.reward_parts.append(reward_metrics)
        self.finished += 1
        self.scores += scores
        self.lengths += [len(c.token_ids) for c in completions]
        signal = bool(groups_with_signal(torch.tensor(scores), len(scores))[0])
        self.with_signal += signal
        if signal or not self.cfg.algorithm.dynamic_sampling:
            first = min(c.versions[0] for c in completions if c.versions is not None)
            self.buffer.add(Waiting(f.serial, first, Group(f.example, f.prompt_ids, completions, scores, tree)))
        else:
            self.discarded += 1
            self.order.finish(f.serial)

    def _grown(self, f: _InFlight, outs: list[Completion]) -> Tree | None:
        """A tree request's samples taken in; its follow-ups (a lookahead survivor's rest, the next round's
        branches) started; the group's tree once it is complete, else None."""
        assert f.growth is not None and f.request is not None
        growth = f.growth
        follow = growth.add(f.request, outs)
        if growth.done():
            follow = growth.next_round()
            if not follow:
                return growth.finish()
        for r in follow:
            self._start(_InFlight(f.serial, f.example, f.prompt_ids, 0, growth=growth, request=r))
        return None

    def _turn(self, f: _InFlight, turns: list[Completion]) -> list[Completion] | None:
        """A multi-turn group's finished request: answer its calls, start the next turns; the group's
        finished trajectories once every episode has ended, else None."""
        fmt, trajs = self.fmt, f.episodes
        assert fmt is not None and trajs is not None
        idx = list(range(self.g)) if f.turn_of is None else [f.turn_of]
        calls = take_turns([trajs[i] for i in idx], turns, idx, fmt)
        answers = self.rewards.env_step([trajs[i].state() for i in calls]) if calls else []
        for i, obs in zip(calls, answers, strict=True):
            if answer_call(trajs[i], obs, fmt):
                self._start(_InFlight(f.serial, f.example, f.prompt_ids, 0, trajs, i))
        if any(t.finish is None for t in trajs):
            return None
        done = [t.completion(fmt.env.call_reward) for t in trajs]
        self.episode_parts.append(episode_counts(trajs, done))
        return done

    # -- steps ---------------------------------------------------------------------------------

    def take(self, version: int) -> StepRollout:
        """The groups of the step at policy `version`, waiting for them; with the step's metrics."""
        algo = self.cfg.algorithm
        budget = algo.dynamic_sampling_max_rounds * self.need if algo.dynamic_sampling else None
        t0 = time.perf_counter()
        stale = self.buffer.drop_stale(version)  # first: too old for this step, they would hold the room it needs
        while self.buffer.fresh(version) < self.need:
            if budget is not None and self.finished >= budget:
                break  # the bound: train on what there is (perhaps nothing: the step is empty)
            self.pump()
        waited = time.perf_counter() - t0
        taken, late = self.buffer.take(version)
        stale += late
        for w in taken + stale:
            self.order.finish(w.serial)
        if stale:
            log.warning("%d group(s) dropped: generated more than %d version(s) ago", len(stale), self.buffer.k)
        lags = [version - w.version for w in taken]
        spans = [c.versions[1] - c.versions[0] for w in taken for c in w.group.completions if c.versions]
        kept = [w.group for w in taken]
        m = self._metrics(kept, lags, spans, len(stale), waited)
        self._reset_step()
        return StepRollout(kept, m)

    def _metrics(
        self, kept: list[Group], lags: list[int], spans: list[int], stale: int, waited: float
    ) -> dict[str, Any]:
        from actors.algo.metrics import combine_parts

        m = combine_parts([{"reward/errors": 0.0, "reward/timeouts": 0.0}, *self.reward_parts, *self.episode_parts])
        m.update(episode_rates(m))
        m.update(
            {
                "data/batch_crc": batch_fingerprint([g.example for g in kept]),
                "reward/mean": float(torch.tensor(self.scores).mean()) if self.scores else 0.0,
                "reward/trained_mean": float(torch.tensor([s for g in kept for s in g.scores]).mean()) if kept else 0.0,
                "response/length_mean": float(torch.tensor(self.lengths, dtype=torch.float32).mean())
                if self.lengths
                else 0.0,
                "batch/rounds": self.finished / self.need,
                "batch/groups_kept": float(len(kept)),
                "batch/groups_discarded": float(self.discarded),
                "batch/groups_generated": float(self.finished),
                "batch/sampling_bound_hit": float(len(kept) < self.need),
                "batch/signal_share": self.with_signal / self.finished if self.finished else 0.0,
                "rollout/generated_tokens": float(
                    self.tree_stats.generated if self.cfg.rollout.tree is not None else sum(self.lengths)
                ),
                **(self.tree_stats.metrics() if self.cfg.rollout.tree is not None else {}),
                "timing/generate": waited,  # the learner waited this long for the step's groups
                "timing/verify": self.verify_s,
                "async/staleness_min": float(min(lags, default=0)),
                "async/staleness_mean": sum(lags) / len(lags) if lags else 0.0,
                "async/staleness_max": float(max(lags, default=0)),
                "async/version_span_max": float(max(spans, default=0)),
                "async/dropped_stale": float(stale),
                "async/buffer_depth": float(len(self.buffer.waiting)),
                "async/in_flight": float(self._groups_inflight()),
            }
        )
        return m

    def while_running(self, fn: Callable[[], T]) -> T:
        """fn() in a thread (the learner's step, the weight sync) while this stream keeps generating."""
        self.learning = True
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="forkrl-learn") as pool:
                future = pool.submit(fn)
                while not future.done():
                    self.pump()
                return future.result()
        finally:
            self.learning = False
