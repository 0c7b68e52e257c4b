"""LoRA against full-parameter training on this box, in one run (examples/study_base.yaml: SmolLM2-135M):

  learner  one learner step on the demo's batch (8 prompts x 8 completions): seconds and the process's
           peak resident memory, full parameters against LoRA (model.lora defaults: rank 16, the seven
           projections). Each arm in its own process, so the peak is its own.
  sync     one weight sync, learner -> engine (export, then the engine's load), in one process with
           vLLM: the full model; the adapter reloaded in place into the engine's one slot (what forkrl
           does); the adapter as a new adapter id per version (the old one removed); the merged model.
  demo     40 steps of the demo, full parameters and LoRA (the engine serving the adapter, and the
           engine getting merged weights), held-out greedy accuracy every 10 steps on 128 prompts;
           the same seed and data.

    python bench/lora.py                      # every part not yet in the results file (resumable)
    python bench/lora.py --only sync --again
Results: bench/results/lora.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LORA = ["model.lora={rank: 16, alpha: 32, sync: adapter}"]
MERGED = ["model.lora={rank: 16, alpha: 32, sync: merged}"]
# LoRA's update is low-rank and starts from B = 0: it wants a larger step than full training (10x here)
DEMO_ARMS = {
    "full": ["learner.lr=2e-5"],
    "lora-adapter": [*LORA, "learner.lr=2e-4"],  # the engine serves the adapter (vLLM's CPU LoRA kernels)
    "lora-merged": [*MERGED, "learner.lr=2e-4"],  # the engine gets merged weights (sync auto on CPU)
}
DEMO = ["trainer.steps=40", "trainer.eval_every=10", "trainer.eval_prompts=128", "trainer.save_every=0",
        "trainer.export_hf=false", "tracking.tensorboard=false"]  # fmt: skip
SYNC_MODES = ("full", "adapter-inplace", "adapter-new-id", "merged")


def _cfg(config: str, sets: list[str]) -> Any:
    from actors.common.config_load import load_config

    return load_config(config, sets)


def learner_arm(config: str, lora: bool, rounds: int) -> dict[str, Any]:
    """In this process: set-up RSS, step seconds (median of `rounds` after a warm-up), peak RSS."""
    from bench.learner_step import demo_learner

    cfg = _cfg(config, LORA if lora else [])
    learner, _, batch = demo_learner(cfg)
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    learner.train_step(batch)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        learner.train_step(batch)
        times.append(time.perf_counter() - t0)
    trainable, total = learner.parameter_counts()
    return {
        "step_s": statistics.median(times),
        "step_s_all": times,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_setup_mib": rss_setup,
        "trainable_params": trainable,
        "params": total,
        "sequences": len(batch),
    }


def sync_mode(config: str, mode: str, rounds: int) -> dict[str, Any]:
    """In this process: a learner and a vLLM engine; `rounds` syncs after a warm-up: export and load seconds."""
    from vllm.lora.request import LoRARequest

    from actors.common.models import resolve_model_path
    from actors.rollout.engine import RolloutEngine
    from bench.learner_step import demo_learner

    sets = {"full": [], "merged": MERGED}.get(mode, LORA)
    cfg = _cfg(config, sets)
    learner, _, batch = demo_learner(cfg)
    learner.train_step(batch)  # a trained adapter (B != 0)
    engine = RolloutEngine(resolve_model_path(cfg.model.path), cfg.rollout, learner.dtype, 0, cfg.model.lora)
    export, load = [], []
    for version in range(1, rounds + 2):
        t0 = time.perf_counter()
        weights = learner.export_weights(learner.dtype, version)
        t1 = time.perf_counter()
        if mode == "adapter-new-id":  # a new adapter per version; the previous one removed
            engine.llm.llm_engine.add_lora(LoRARequest(f"v{version}", version, os.path.dirname(weights.path)))
            if version > 1:
                engine.llm.llm_engine.remove_lora(version - 1)
            engine.llm.reset_prefix_cache()
        else:
            engine.load_weights(weights)
        t2 = time.perf_counter()
        if version > 1:  # the first: warm-up
            export.append(t1 - t0)
            load.append(t2 - t1)
    engine.shutdown()
    learner.drop_weights()
    return {
        "export_s": statistics.median(export),
        "load_s": statistics.median(load),
        "total_s": statistics.median(e + lo for e, lo in zip(export, load, strict=True)),
        "file_bytes": weights.nbytes,
        "rounds": rounds,
    }


def demo_arm(config: str, name: str) -> dict[str, Any]:
    from bench.async_rl import train_rows

    rows, wall_s = train_rows(f"lora-{name}", config, [*DEMO_ARMS[name], *DEMO])
    return {
        "settings": DEMO_ARMS[name],
        "eval": {r["step"]: r["eval/reward_mean"] for r in rows if "eval/reward_mean" in r},
        "reward": [r["reward/mean"] for r in rows if "reward/mean" in r],  # (step 0: the evaluation only)
        "s_per_step": statistics.mean(r["timing/step"] for r in rows if "timing/step" in r),
        "learn_s": statistics.mean(r.get("timing/learn", 0.0) for r in rows if r["step"] > 0),
        "generate_s": statistics.mean(r.get("timing/generate", 0.0) for r in rows if r["step"] > 0),
        "weight_sync_s": statistics.mean(r.get("timing/weight_sync", 0.0) for r in rows if r["step"] > 0),
        "trainable_params": rows[-1].get("model/trainable_params"),
        "wall_s": wall_s,
    }


def _child(part: str, arg: str, config: str, rounds: int) -> dict[str, Any]:
    """Run one arm in a fresh process (its own peak memory, its own vLLM) and read its JSON line."""
    cmd = [sys.executable, __file__, "--child", part, arg, "--config", config, "--rounds", str(rounds)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{part} {arg} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def table(doc: dict[str, Any]) -> str:
    lines = []
    if learner := doc.get("learner"):
        lines += ["| learner step | s / step | peak RSS (MiB) | trainable parameters |", "| --- | --- | --- | --- |"]
        for name, r in learner.items():
            lines.append(f"| {name} | {r['step_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['trainable_params']:,} |")
    if sync := doc.get("sync"):
        lines += [
            "",
            "| weight sync | export (s) | engine load (s) | total (s) | file |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, r in sync.items():
            lines.append(f"| {name} | {r['export_s']:.3f} | {r['load_s']:.3f} | {r['total_s']:.3f} | "
                         f"{r['file_bytes'] / 2**20:.1f} MiB |")  # fmt: skip
    if demo := doc.get("demo"):
        steps = sorted({int(s) for r in demo.values() for s in r["eval"]})
        lines += ["", "| demo, 40 steps | " + " | ".join(f"eval @{s}" for s in steps) + " | s / step | sync (s) |"]
        lines.append("| --- " * (len(steps) + 3) + "|")
        for name, r in demo.items():
            evals = " | ".join(f"{r['eval'].get(str(s), r['eval'].get(s, float('nan'))):.3f}" for s in steps)
            lines.append(f"| {name} | {evals} | {r['s_per_step']:.1f} | {r['weight_sync_s']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=["learner", "sync", "demo"])
    ap.add_argument("--again", action="store_true", help="run parts already in the results file again")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--config", default=str(ROOT / "examples" / "study_base.yaml"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora.json"))
    ap.add_argument("--child", nargs=2, metavar=("PART", "ARM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        part, arm = args.child
        if part == "learner":
            result = learner_arm(args.config, arm == "lora", args.rounds)
        else:
            result = sync_mode(args.config, arm, max(args.rounds, 5))
        print(json.dumps(result), flush=True)
        return 0
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    arms = {"learner": ["full", "lora"], "sync": list(SYNC_MODES), "demo": list(DEMO_ARMS)}
    for part in args.only or list(arms):
        for arm in arms[part]:
            if arm in doc.get(part, {}) and not args.again:
                print(f"{part} {arm}: in {out} already (--again to rerun)", flush=True)
                continue
            print(f"{part} {arm} ...", flush=True)
            result = demo_arm(args.config, arm) if part == "demo" else _child(part, arm, args.config, args.rounds)
            doc.setdefault(part, {})[arm] = result
            out.write_text(json.dumps(doc, indent=1))  # each arm is kept as soon as it ends: resumable
    print(table(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
