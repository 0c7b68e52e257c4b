"""forkrl's training driver: entropy-filtered GRPO on Ray (`python -m actors.train` runs it).

    python -m actors.train --config examples/demo.yaml [--set trainer.steps=3] [--resume]
    ray job submit --working-dir . --runtime-env deploy/runtime_env.yaml -- \
        python -m actors.train --config examples/tiny.yaml --set trainer.output_dir=$PWD/runs/tiny

Departures from plain GRPO, on purpose: the policy gradient flows only through the
top `algorithm.top_entropy_quantile` highest-entropy response tokens of each optimizer step
(arXiv 2506.01939), chosen globally over all micro-batches and learner ranks; the DAPO recipe
(clip-higher 0.2/0.28, token-level loss, dynamic sampling that generates more prompts until the
step has groups with signal, soft overlong penalty or masking, no KL); a rollout batch may take
several optimizer steps (algorithm.ppo_mini_batch / ppo_epochs) against old log-probs taken once
before the first; the learner's log-probs, not the engine's, are the old policy, with a truncated
importance weight for the rollout engine / learner mismatch. Without a Ray address it starts a
local Ray itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actors.common.config import JobConfig
from actors.common.contract import RunDir

if TYPE_CHECKING:  # the pools import Ray and vLLM: loaded when a run starts
    from actors.driver.stream import GroupStream
    from actors.learner.group import LearnerGroup
    from actors.reward.pool import RewardPool
    from actors.rollout.pool import RolloutPool

log = logging.getLogger("forkrl.train")


@contextmanager
def timed(metrics: dict[str, float], phase: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    metrics[f"timing/{phase}"] = time.perf_counter() - t0


@dataclass
class Pools:
    """The job's three actor pools, and the rollout dtype the weights travel in."""

    rollout: RolloutPool
    rewards: RewardPool
    learners: LearnerGroup
    dtype: str
    sync_timeout_s: float
    remote_loads: float = 0.0  # engines that fetched the last weights from another node
    load_s: float = 0.0  # the slowest engine's seconds to load the last weights it finished loading
    _loading: tuple[list[Any], float] | None = None  # the engines' load calls still running, and their start
    start_seconds: dict[str, float] | None = None  # how long the pools took to start: engines, learners, both

    @classmethod
    def start(cls, cfg: JobConfig, model_path: str, dtype: str) -> Pools:
        """The three pools, started side by side: the learners load the model and join their process group
        while vLLM starts (where vLLM runs processes of its own - GPU engines, the streaming engine - three
        processes importing vLLM one after another). If one pool fails to start, those that started are
        stopped before the error goes on."""
        from concurrent.futures import ThreadPoolExecutor

        from actors.learner.group import LearnerGroup
        from actors.reward.pool import RewardPool
        from actors.rollout.pool import RolloutPool

        t0 = time.perf_counter()

        def start_learners() -> tuple[LearnerGroup, float]:
            group = LearnerGroup(
                model_path, cfg.learner, cfg.algorithm, cfg.rollout, cfg.trainer.seed, dtype, cfg.model.lora
            )
            return group, time.perf_counter() - t0

        # a fraction of a GPU each (engine and learner may share one): vLLM profiles the device's free memory
        # while it starts and must not see the learner allocate meanwhile, so the learners start after it
        shared = any(0 < g < 1 for g in (cfg.rollout.num_gpus_per_engine, cfg.learner.num_gpus_per_learner))
        with ThreadPoolExecutor(1, thread_name_prefix="learner-start") as ex:
            learning = None if shared else ex.submit(start_learners)
            rollout = None
            try:
                streaming = cfg.trainer.max_staleness > 0  # asynchronous mode
                rollout = RolloutPool(model_path, cfg.rollout, dtype, cfg.trainer.seed, streaming, cfg.model.lora)
                t_rollout = time.perf_counter() - t0
                rewards = RewardPool(cfg.reward, cfg.environment)
                learners, t_learners = learning.result() if learning else start_learners()
            except BaseException:
                if rollout is not None:
                    rollout.shutdown()
                if learning is not None and learning.exception() is None:  # (waits for the learners' start)
                    with contextlib.suppress(Exception):  # the error that stopped the start is the one to see
                        learning.result()[0].shutdown()
                raise
        log.info(
            "pools started in %.1f s (%s): rollout engines %.1f s, learners %.1f s",
            time.perf_counter() - t0, "in turn: they share GPUs" if shared else "side by side", t_rollout, t_learners,
        )  # fmt: skip
        took = {"engines": t_rollout, "learners": t_learners, "pools": time.perf_counter() - t0}
        return cls(rollout, rewards, learners, dtype, cfg.learner.weight_sync_timeout_s, start_seconds=took)

    def shutdown(self) -> None:
        """The engines' vLLM processes and the learners end with the run, whatever ends it."""
        try:
            self.rollout.shutdown()
        finally:
            self.learners.shutdown()

    def sync_weights(self, version: int, wait: bool = True) -> None:
        """Learner -> every rollout engine, through a file in shared memory (an engine on another node gets
        the file's bytes from the learner); version: the trained steps.

        wait=False (asynchronous mode): return once the learner has written the file; the engines load it
        while the learner goes on to its next step, and `finish_sync` (called by the next sync and before
        an evaluation) waits for them. The staleness bound holds regardless: each completion carries the
        version its engine had when the request started (`actors.rollout.stream_engine`)."""
        self.finish_sync()  # one load at a time in each engine, in version order
        weights = self.learners.export_weights(self.dtype, version)
        self._loading = (self.rollout.start_loads(weights), time.monotonic())
        if wait:
            self.finish_sync()

    def finish_sync(self) -> None:
        """Wait for the engines' load of the newest weights, if one is running (within
        learner.weight_sync_timeout_s of its start); `load_s`: the slowest engine's seconds."""
        if self._loading is None:
            return
        refs, t0 = self._loading
        self._loading = None
        loads = self.rollout.wait_loads(refs, max(1.0, self.sync_timeout_s - (time.monotonic() - t0)))
        self.remote_loads = sum(1.0 - r.get("local", 1.0) for r in loads)
        self.load_s = max((r.get("seconds", 0.0) for r in loads), default=0.0)


def one_step(
    cfg: JobConfig, step: int, pools: Pools, sampler: Any, tokenizer: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One training step, phase by phase: its metrics and its sampled completions."""
    from actors.driver.sampling import collect, forking_tokens, sample_records, training_groups

    algo = cfg.algorithm
    m: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    t_step = time.perf_counter()
    # sample, generate, verify: in rounds until the step holds groups with signal (DAPO)
    got = collect(cfg, sampler, tokenizer, pools.rollout, pools.rewards, pools.learners)
    m.update(got.metrics)
    m["rollout/engine_replacements"] = float(pools.rollout.replacements)  # so far in this attempt
    with timed(m, "advantages"):  # advantages from the shaped reward; overlong masking
        groups, batch_metrics = training_groups(cfg, got.groups)
        m.update(batch_metrics)
    with timed(m, "learn"):  # learn: entropy-filtered PPO steps on the learner group
        if groups:
            step_metrics, traces = pools.learners.train_rollout(groups, algo.ppo_mini_batch, algo.ppo_epochs)
            m.update(step_metrics)
            samples = sample_records(got.groups, traces, tokenizer, cfg.rollout.group_size)
            m["forking_tokens"] = forking_tokens(step_metrics, tokenizer)
        else:
            log.warning("step %d trains on nothing: no group with signal (batch/sequences = 0)", step)
    m["batch/empty_step"] = float(not groups)
    with timed(m, "weight_sync"):  # sync weights learner -> every rollout engine
        if groups:
            pools.sync_weights(step)
            m["weight_sync/remote_engines"] = pools.remote_loads
    m["timing/step"] = time.perf_counter() - t_step  # log
    return m, samples


def async_step(
    cfg: JobConfig, step: int, pools: Pools, stream: GroupStream, tokenizer: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One step of asynchronous mode: the step's groups from the stream (generated from policy versions
    step - 1 - max_staleness .. step - 1), then learning and the weight sync while the engines keep
    generating the next steps' groups."""
    from actors.driver.sampling import forking_tokens, sample_records, training_groups

    algo = cfg.algorithm
    t_step = time.perf_counter()
    busy0 = pools.rollout.busy_seconds()
    got = stream.take(step - 1)
    m: dict[str, Any] = dict(got.metrics)
    m["rollout/engine_replacements"] = float(pools.rollout.replacements)
    with timed(m, "advantages"):
        groups, batch_metrics = training_groups(cfg, got.groups)
        m.update(batch_metrics)
    samples: list[dict[str, Any]] = []

    def learn_and_sync() -> None:
        nonlocal samples
        with timed(m, "learn"):
            if groups:
                step_metrics, traces = pools.learners.train_rollout(groups, algo.ppo_mini_batch, algo.ppo_epochs)
                m.update(step_metrics)
                samples = sample_records(got.groups, traces, tokenizer, cfg.rollout.group_size)
                m["forking_tokens"] = forking_tokens(step_metrics, tokenizer)
            else:
                log.warning("step %d trains on nothing: no group with signal (batch/sequences = 0)", step)
        with timed(m, "weight_sync"):  # the learner writes the weights; the engines load them while it learns on
            if groups:
                load = cfg.rollout.weight_load
                pools.sync_weights(step, wait=load == "wait" or (load == "auto" and cfg.trainer.max_staleness < 2))
                m["weight_sync/remote_engines"] = pools.remote_loads  # of the previous load (finished now)
                m["weight_sync/engine_load_s"] = pools.load_s

    stream.while_running(learn_and_sync)
    m["batch/empty_step"] = float(not groups)
    wall = time.perf_counter() - t_step
    busy = [max(0.0, b - a) for a, b in zip(busy0, pools.rollout.busy_seconds(), strict=True)]
    m["timing/learner_idle"] = m["timing/generate"]  # the learner waited for groups (weight sync: timed apart)
    m["timing/engine_idle"] = sum(max(0.0, wall - b) for b in busy)  # summed over engines
    m["timing/engine_busy"] = sum(min(wall, b) for b in busy)  # the dashboard's step-time chart shows the overlap
    m["timing/step"] = wall
    return m, samples


def evaluate(
    cfg: JobConfig, pools: Pools, prompts: list[list[int]], examples: list[Any], tokenizer: Any
) -> dict[str, float]:
    """Greedy answers on the held-out set (with `environment`: greedy episodes): the mean verifier score and
    its standard error over the prompts (sample standard deviation / sqrt(n))."""
    from actors.driver.episodes import generate_groups

    pools.finish_sync()  # the newest weights, in every engine
    outs, _ = generate_groups(cfg, examples, prompts, 1, pools.rollout, pools.rewards, tokenizer, temperature=0.0)
    right, _ = pools.rewards.score([(o[0].text, ex.answer, ex.prompt) for o, ex in zip(outs, examples, strict=True)])
    return eval_metrics(right)


def eval_metrics(scores: list[float]) -> dict[str, float]:
    """The mean of the held-out scores and its standard error (0 with fewer than two prompts)."""
    import statistics

    n = len(scores)
    stderr = statistics.stdev(scores) / n**0.5 if n > 1 else 0.0
    return {"eval/reward_mean": statistics.fmean(scores), "eval/reward_stderr": stderr, "eval/prompts": float(n)}


def train(cfg: JobConfig) -> dict[str, Any]:  # over 60 lines: the run reads as one story (setup, resume, steps, end)
    import psutil
    from tqdm import tqdm

    from actors.common.models import resolve_dtype, resolve_model_path
    from actors.driver.buffer import StreamOrder
    from actors.driver.checkpoint import commit_checkpoint, latest_checkpoint, save_checkpoint
    from actors.driver.data import PromptSampler, load_eval_examples, load_examples, render_prompt
    from actors.driver.runtime import init_ray, load_tokenizer
    from actors.driver.stream import GroupStream
    from actors.driver.summary import dashboard_page, read_evals, startup_line, summarize
    from actors.driver.tool_format import prompt_tools
    from actors.driver.tracking import Tracker

    run = RunDir(Path(cfg.trainer.output_dir).resolve())
    run.path.mkdir(parents=True, exist_ok=True)
    run.config.write_text(cfg.model_dump_json(indent=1))
    keep = cfg.trainer.keep_checkpoints
    born = psutil.Process().create_time()  # start-up counts from the driver process's start
    startup = {"process": time.time() - born}  # interpreter, imports, config
    t_ray = time.perf_counter()
    init_ray(cfg)
    startup["ray"] = time.perf_counter() - t_ray
    model_path, dtype = resolve_model_path(cfg.model.path), resolve_dtype(cfg.model.dtype)
    tokenizer = load_tokenizer(model_path)
    tools = prompt_tools(cfg, tokenizer)  # before the pools start: a wrong environment.format fails here
    sampler = PromptSampler(load_examples(cfg.data), cfg.data.prompts_per_step, cfg.trainer.seed, cfg.data.shuffle)
    streaming = cfg.trainer.max_staleness > 0  # asynchronous mode
    pools = Pools.start(cfg, model_path, dtype)
    startup.update(pools.start_seconds or {})
    rollout, rewards, learners = pools.rollout, pools.rewards, pools.learners
    try:
        trainable, params = learners.parameter_counts()
        tracker = Tracker(run, cfg)
        eval_set = load_eval_examples(cfg.data, cfg.trainer.eval_prompts) if cfg.trainer.eval_every else []
        eval_prompts = [render_prompt(tokenizer, ex, cfg.data, tools) for ex in eval_set]

        order = StreamOrder(sampler)  # asynchronous mode: serials and finished prompts of the order
        start = 0
        ckpt = latest_checkpoint(run, cfg.trainer.resume)
        if ckpt is not None:  # resume: weights, optimizer, scheduler, RNG, data position
            state = learners.load_checkpoint(str(ckpt.parent), ckpt.name)
            start = int(state["step"])
            order.load_state(state["sampler"])
            pools.sync_weights(start)
            log.info("resumed from %s at step %d", ckpt, start)
            tracker.backfill(start)  # what W&B / MLflow lost with the previous attempt's queues
        if eval_set and start == 0:  # the policy before any update: what every later evaluation is read against
            m0: dict[str, Any] = {"model/trainable_params": trainable, "model/params": params}
            with timed(m0, "eval"):
                m0.update(evaluate(cfg, pools, eval_prompts, eval_set, tokenizer))
            startup["eval"] = m0["timing/eval"]
            tracker.log(0, m0)
            log.info("step 0 | eval %.3f +- %.3f before any update", m0["eval/reward_mean"], m0["eval/reward_stderr"])

        history: list[dict[str, Any]] = []
        bar = tqdm(
            range(start + 1, cfg.trainer.steps + 1), desc="GRPO", unit="step", initial=start, total=cfg.trainer.steps
        )
        stream = GroupStream(cfg, order, tokenizer, rollout, rewards) if streaming else None
        startup["first_step_unix"] = time.time()  # when the first step began (make demo reads it)
        startup["total"] = startup["first_step_unix"] - born
        log.info("%s", startup_line(startup))
        for step in bar:
            if stream is not None:
                m, samples = async_step(cfg, step, pools, stream, tokenizer)
            else:
                m, samples = one_step(cfg, step, pools, sampler, tokenizer)
            m.update({"model/trainable_params": trainable, "model/params": params})
            if eval_set and (step % cfg.trainer.eval_every == 0 or step == cfg.trainer.steps):
                with timed(m, "eval"):
                    m.update(evaluate(cfg, pools, eval_prompts, eval_set, tokenizer))
            saved = None
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0 or step == cfg.trainer.steps:
                with timed(m, "checkpoint"):
                    data_state = order.state() if streaming else sampler.state()
                    saved = save_checkpoint(learners, run, step, data_state, keep, commit=False)
            tracker.log(step, m, samples)
            preempted = tracker.stop_requested and step < cfg.trainer.steps
            if preempted and saved is None:  # the control plane's answer to this step: stop here, resumable
                data_state = order.state() if streaming else sampler.state()
                saved = save_checkpoint(learners, run, step, data_state, keep, commit=False)
            if saved is not None:  # it counts once the step's metrics are stored: a kill never skips them
                commit_checkpoint(run, step, data_state, keep)
                tracker.checkpoint(step, saved)
            history.append(m)
            entropy = f"{m['entropy/mean']:.3f}" if "entropy/mean" in m else "- (no update)"
            bar.set_postfix(reward=f"{m['reward/mean']:.3f}", H=entropy)
            timings = " ".join(f"{k[7:]}={v:.1f}s" for k, v in m.items() if k.startswith("timing/"))
            log.info("step %d | reward %.3f | %s", step, m["reward/mean"], timings)
            if preempted:
                log.warning("stopped after step %d for a higher-priority job (preempted); the step-%d checkpoint is "
                            "saved and the control plane queues this job to resume from it", step, step)  # fmt: skip
                tracker.close(finish=False)  # the W&B / MLflow runs go on in the next attempt
                return {"preempted_at": step, "run_dir": str(run.path)}
        pools.finish_sync()  # the last step's background load: its errors are the run's
        export = learners.export_hf(str(run.hf_export)) if cfg.trainer.export_hf else None
        evals, page = read_evals(run.metrics, cfg.trainer.steps), dashboard_page(cfg.tracking.report_url)
        summary = summarize(history, run.path, export, evals, cfg.trainer.steps, page) | {"startup_s": startup}
        summary.update(tracker.close(summary, export))  # W&B / MLflow runs end with the summary and the export
        run.summary.write_text(json.dumps(summary, indent=1))
        shutil.rmtree(run.scratch, ignore_errors=True)
        return summary
    finally:
        pools.shutdown()
