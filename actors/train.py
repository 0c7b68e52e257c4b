"""forkrl's training driver: entropy-filtered GRPO on Ray (the Ray job entrypoint).

    python -m actors.train --config examples/demo.yaml [--set trainer.steps=3] [--resume]
    ray job submit --working-dir . --runtime-env deploy/runtime_env.yaml -- \
        python -m actors.train --config examples/tiny.yaml

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

import argparse
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from actors.config import ConfigError, JobConfig, load_config, validate_config
from actors.contract import RunDir

log = logging.getLogger("forkrl.train")


@contextmanager
def timed(metrics: dict[str, float], phase: str):
    t0 = time.perf_counter()
    yield
    metrics[f"timing/{phase}"] = time.perf_counter() - t0


def train(cfg: JobConfig) -> dict[str, Any]:
    from tqdm import tqdm

    from actors.checkpoint import commit_checkpoint, latest_checkpoint, save_checkpoint
    from actors.data import PromptSampler, load_eval_examples, load_examples, render_prompt
    from actors.learner import LearnerGroup
    from actors.models import resolve_dtype, resolve_model_path
    from actors.reward import RewardPool
    from actors.rollout import RolloutPool
    from actors.runtime import init_ray, load_tokenizer
    from actors.sampling import collect, forking_tokens, sample_records, training_groups
    from actors.tracking import Tracker

    run = RunDir(Path(cfg.trainer.output_dir).resolve())
    run.path.mkdir(parents=True, exist_ok=True)
    run.config.write_text(cfg.model_dump_json(indent=1))
    algo = cfg.algorithm
    keep = cfg.trainer.keep_checkpoints
    init_ray(cfg)
    model_path, dtype = resolve_model_path(cfg.model.path), resolve_dtype(cfg.model.dtype)
    tokenizer = load_tokenizer(model_path)
    sampler = PromptSampler(load_examples(cfg.data), cfg.data.prompts_per_step, cfg.trainer.seed, cfg.data.shuffle)
    rollout = RolloutPool(model_path, cfg.rollout, dtype, cfg.trainer.seed)
    learners = None
    try:  # the engines' vLLM processes end with the run, whatever ends it
        rewards = RewardPool(cfg.reward)
        learners = LearnerGroup(model_path, cfg.learner, algo, cfg.rollout, cfg.trainer.seed, dtype)

        def sync_weights() -> None:  # learner -> every rollout engine, through a file in shared memory
            rollout.load_weights(learners.export_weights(dtype, to_file=True), cfg.learner.weight_sync_timeout_s)

        tracker = Tracker(run, cfg)
        eval_set = load_eval_examples(cfg.data, cfg.trainer.eval_prompts) if cfg.trainer.eval_every else []
        eval_prompts = [render_prompt(tokenizer, ex, cfg.data) for ex in eval_set]

        start = 0
        ckpt = latest_checkpoint(run, cfg.trainer.resume)
        if ckpt is not None:  # resume: weights, optimizer, scheduler, RNG, data position
            state = learners.load_checkpoint(str(ckpt.parent), ckpt.name)
            start = int(state["step"])
            sampler.load_state(state["sampler"])
            sync_weights()
            log.info("resumed from %s at step %d", ckpt, start)
            tracker.backfill(start)  # what W&B / MLflow lost with the previous attempt's queues

        history: list[dict[str, Any]] = []
        bar = tqdm(
            range(start + 1, cfg.trainer.steps + 1), desc="GRPO", unit="step", initial=start, total=cfg.trainer.steps
        )
        for step in bar:
            m: dict[str, Any] = {}
            t_step = time.perf_counter()
            # sample, generate, verify: in rounds until the step holds groups with signal (DAPO)
            got = collect(cfg, sampler, tokenizer, rollout, rewards)
            m.update(got.metrics)
            m["rollout/engine_replacements"] = float(rollout.replacements)  # so far in this attempt
            with timed(m, "advantages"):  # advantages from the shaped reward; overlong masking
                groups, batch_metrics = training_groups(cfg, got.groups)
                m.update(batch_metrics)
            samples = []
            with timed(m, "learn"):  # learn: entropy-filtered PPO steps on the learner group
                if groups:
                    step_metrics, traces = learners.train_rollout(groups, algo.ppo_mini_batch, algo.ppo_epochs)
                    m.update(step_metrics)
                    samples = sample_records(got.groups, traces, tokenizer, cfg.rollout.group_size)
                    m["forking_tokens"] = forking_tokens(step_metrics, tokenizer)
                else:
                    log.warning("step %d trains on nothing: no group with signal (batch/sequences = 0)", step)
            m["batch/empty_step"] = float(not groups)
            with timed(m, "weight_sync"):  # sync weights learner -> every rollout engine
                if groups:
                    sync_weights()
            m["timing/step"] = time.perf_counter() - t_step  # log
            if eval_set and (step % cfg.trainer.eval_every == 0 or step == cfg.trainer.steps):
                with timed(m, "eval"):  # greedy answers on the held-out set
                    outs = rollout.generate(eval_prompts, 1, temperature=0.0)
                    right, _ = rewards.score(
                        [(o[0].text, ex.answer, ex.prompt) for o, ex in zip(outs, eval_set, strict=True)]
                    )
                    m["eval/reward_mean"] = sum(right) / len(right)
            saved = None
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0 or step == cfg.trainer.steps:
                with timed(m, "checkpoint"):
                    data_state = sampler.state()
                    saved = save_checkpoint(learners, run, step, data_state, keep, commit=False)
            tracker.log(step, m, samples)
            if saved is not None:  # it counts once the step's metrics are stored: a kill never skips them
                commit_checkpoint(run, step, data_state, keep)
                tracker.checkpoint(step, saved)
            history.append(m)
            entropy = f"{m['entropy/mean']:.3f}" if "entropy/mean" in m else "- (no update)"
            bar.set_postfix(reward=f"{m['reward/mean']:.3f}", H=entropy)
            log.info(
                "step %d | reward %.3f | %s",
                step,
                m["reward/mean"],
                " ".join(f"{k[7:]}={v:.1f}s" for k, v in m.items() if k.startswith("timing/")),
            )
        export = None
        if cfg.trainer.export_hf:
            export = learners.export_hf(str(run.hf_export))
        summary = summarize(history, run.path, export)
        summary.update(tracker.close(summary, export))  # W&B / MLflow runs end with the summary and the export
        run.summary.write_text(json.dumps(summary, indent=1))
        shutil.rmtree(run.scratch, ignore_errors=True)
        return summary
    finally:
        rollout.shutdown()
        if learners is not None:
            learners.drop_weights()


def summarize(history: list[dict[str, Any]], run_dir: Path, export: str | None) -> dict[str, Any]:
    def mean(key: str, rows: list[dict[str, Any]]) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return sum(vals) / len(vals) if vals else None

    k = max(1, min(5, len(history) // 4 or 1))
    first, last = history[:k], history[-k:]
    keys = ["entropy/mean", "entropy/p80", "entropy/threshold", "entropy/frac_below_0.01", "entropy/kept_mean"]
    return {
        "run_dir": str(run_dir),
        "export": export,
        "steps_run": len(history),
        "window": k,
        "reward_first": mean("reward/mean", first),
        "reward_last": mean("reward/mean", last),
        "entropy_first": {key: first[0].get(key) for key in keys} if history else {},
        "entropy_last": {key: last[-1].get(key) for key in keys} if history else {},
        "eval_first": next((r["eval/reward_mean"] for r in history if "eval/reward_mean" in r), None),
        "eval_last": next((r["eval/reward_mean"] for r in reversed(history) if "eval/reward_mean" in r), None),
        "seconds_per_step": mean("timing/step", history),
        "rounds_per_step": mean("batch/rounds", history),
        "sequences_per_step": mean("batch/sequences", history),
        "phase_seconds": {
            key[7:]: mean(key, history) for key in sorted({k for r in history for k in r if k.startswith("timing/")})
        },
    }


def _print_summary(s: dict[str, Any]) -> None:
    out = sys.stdout

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    out.write("\n== forkrl run summary ==\n")
    out.write(f"steps run: {s['steps_run']}   seconds/step: {fmt(s['seconds_per_step'])}\n")
    out.write(
        f"generation rounds/step: {fmt(s['rounds_per_step'])}   sequences trained/step: "
        f"{fmt(s['sequences_per_step'])}\n"
    )
    w = s["window"]
    out.write(f"mean reward: first {w} step(s) {fmt(s['reward_first'])} -> last {w} {fmt(s['reward_last'])}\n")
    if s["eval_first"] is not None:
        out.write(f"greedy eval reward: first {fmt(s['eval_first'])} -> last {fmt(s['eval_last'])}\n")
    for label, ent in (("first step", s["entropy_first"]), ("last step", s["entropy_last"])):
        out.write(f"entropy, {label}: " + "  ".join(f"{k[8:]}={fmt(v)}" for k, v in ent.items()) + "\n")
    out.write("phase seconds: " + "  ".join(f"{k}={fmt(v)}" for k, v in s["phase_seconds"].items()) + "\n")
    out.write(f"run directory: {s['run_dir']}  (metrics.jsonl, tensorboard/, checkpoints/, summary.json)\n")
    if s["export"]:
        out.write(f"Hugging Face export: {s['export']}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actors.train", description="Run one forkrl training job.")
    parser.add_argument("--config", help="YAML file validated against JobConfig")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. trainer.steps=3"
    )
    parser.add_argument(
        "--config-env",
        metavar="NAME",
        help="read the config as JSON from environment variable NAME (how the control plane passes it)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint (resume=auto)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("FORKRL_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    overrides = list(args.set) + (["trainer.resume=auto"] if args.resume else [])
    try:
        if args.config_env:
            raw = os.environ.get(args.config_env)
            if raw is None:
                raise ConfigError(f"--config-env {args.config_env}: no such environment variable")
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--config-env {args.config_env}: not valid JSON: {e}") from None
            cfg = validate_config(data, overrides)
        else:
            cfg = load_config(args.config, overrides)
    except ConfigError as e:
        sys.stderr.write(f"forkrl: invalid config:\n{e}\n")
        return 2
    summary = train(cfg)
    _print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
