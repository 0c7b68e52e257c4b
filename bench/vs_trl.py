"""forkrl against TRL's GRPOTrainer on the same work, one after the other in one invocation.

Both train SmolLM2-135M-Instruct (fp32) on the same JSONL of 512 arithmetic prompts (chat messages
with a system prompt): 8 prompts x 8 completions per step, at most 64 new tokens, temperature 1,
the top-20% entropy filter (rho = 0.2), lr 1e-5, one learner, no KL, DAPO clip 0.2/0.28, token-level
loss, one optimizer step per rollout. forkrl runs `python -m actors.train` (ZeRO 0, micro-batch 64;
groups whose 8 rewards are equal are skipped, not refilled: without KL they carry no gradient, so the
update is the same); TRL runs GRPOTrainer with HF generate (per-device batch 64, the arithmetic
verifier as its reward function). Each runs in its own process with the machine to itself. The step
time is the median of steps 2..N (step 1 holds first-call costs).

    pip install -e '.[bench]'          # TRL, not part of the main install
    python bench/vs_trl.py             # both, 6 steps each; results in bench/results/vs_trl.json
    python bench/vs_trl.py --only forkrl --refill     # forkrl with dynamic sampling refilling the batch

Numbers on a shared 2-core box move up to 2x between runs: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEM = "Answer with just the number."
MODEL = "smollm2-135m-instruct"


def write_prompts(path: Path, n: int = 512, seed: int = 7) -> None:
    """n two-number arithmetic problems as chat messages with a system prompt, plus their answers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        op = rng.choice("+-")
        user = {"role": "user", "content": f"What is {a} {op} {b}?"}
        rows.append(
            {
                "prompt": [{"role": "system", "content": SYSTEM}, user],
                "answer": str(a + b if op == "+" else a - b),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# -- forkrl ------------------------------------------------------------------------------------


def run_forkrl(work: Path, data: Path, steps: int, refill: bool, extra: list[str]) -> dict[str, Any]:
    import yaml

    out = work / ("forkrl-refill" if refill else "forkrl")
    cfg = {
        "name": "bench-vs-trl",
        "model": {"path": MODEL, "dtype": "float32"},
        "data": {"source": {"type": "jsonl", "path": str(data)}, "prompts_per_step": 8, "system_prompt": None},
        "rollout": {"num_engines": 1, "group_size": 8, "temperature": 1.0, "max_new_tokens": 64},
        "reward": {"verifiers": [{"type": "numeric"}], "num_workers": 1},
        "algorithm": {
            "top_entropy_quantile": 0.2,
            "overlong_buffer": 0,
            "kl_coef": 0.0,
            "dynamic_sampling": True,
            "dynamic_sampling_max_rounds": 3 if refill else 1,
        },
        "learner": {"num_learners": 1, "zero_stage": 0, "lr": 1.0e-5, "micro_batch_size": 64},
        "trainer": {"steps": steps, "save_every": 0, "eval_every": 0, "output_dir": str(out), "seed": 0},
    }
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / ("forkrl-refill.yaml" if refill else "forkrl.yaml")
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "actors.train", "--config", str(cfg_path)] + [a for s in extra for a in ("--set", s)]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "timing/step" in r]
    tail = rows[1:] or rows
    phases = ("generate", "verify", "learn", "weight_sync")
    seqs = [r.get("batch/sequences", 0.0) for r in tail]
    learn_per_seq = [r["timing/learn"] / r["batch/sequences"] for r in tail if r.get("batch/sequences")]
    return {
        "system": "forkrl (refill)" if refill else "forkrl",
        "steps": len(rows),
        "step_s": [round(r["timing/step"], 2) for r in rows],
        "step_s_median": round(statistics.median(r["timing/step"] for r in tail), 2),
        "phase_s_median": {p: round(statistics.median(r.get(f"timing/{p}", 0.0) for r in tail), 2) for p in phases},
        "completions_per_step": round(statistics.mean(64 * r["batch/rounds"] for r in tail), 1),
        "trained_sequences_per_step": round(statistics.mean(seqs), 1),
        "learn_s_per_trained_sequence": round(statistics.median(learn_per_seq), 3) if learn_per_seq else None,
        "completion_length_mean": round(statistics.mean(r["response/length_mean"] for r in rows), 1),
        "reward_mean": round(statistics.mean(r["reward/mean"] for r in rows), 3),
        "wall_s": round(wall, 1),
    }


# -- TRL ---------------------------------------------------------------------------------------


def run_trl_worker(work: Path, data: Path, steps: int) -> None:
    """In its own process: GRPOTrainer on the same data, sizes and filter; writes trl.json."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from actors.common.models import resolve_model_path
    from actors.common.verifier_config import NumericVerifier
    from actors.reward.verifiers import build_verifier

    torch.set_num_threads(os.cpu_count() or 1)
    _, _, score = build_verifier(NumericVerifier())

    def reward(completions: list[Any], answer: list[str], prompts: list[Any], **_: Any) -> list[float]:
        return [score(c[-1]["content"], a, p) for c, a, p in zip(completions, answer, prompts, strict=True)]

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = 0.0
            self.step_s: list[float] = []
            self.logs: list[dict[str, float]] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.step_s.append(time.perf_counter() - self.t0)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            if logs and "reward" in logs:
                self.logs.append(dict(logs))

    path = resolve_model_path(MODEL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    args = GRPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=64,
        gradient_accumulation_steps=1,
        num_generations=8,
        max_completion_length=64,
        temperature=1.0,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",
        top_entropy_quantile=0.2,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
    )
    clock = Clock()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=load_dataset("json", data_files=str(data), split="train"),
        processing_class=tok,
        callbacks=[clock],
    )
    trainer.train()
    (work / "trl.json").write_text(json.dumps({"step_s": clock.step_s, "logs": clock.logs}))


def run_trl(work: Path, data: Path, steps: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--trl-worker", "--work", str(work), "--steps", str(steps)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    got = json.loads((work / "trl.json").read_text())
    step_s, logs = got["step_s"], got["logs"]
    tail = step_s[1:] or step_s
    return {
        "system": "TRL GRPOTrainer",
        "steps": len(step_s),
        "step_s": [round(s, 2) for s in step_s],
        "step_s_median": round(statistics.median(tail), 2),
        "completions_per_step": 64,
        "trained_sequences_per_step": 64,
        "completion_length_mean": round(statistics.mean(r["completions/mean_length"] for r in logs), 1),
        "reward_mean": round(statistics.mean(r["reward"] for r in logs), 3),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--only", choices=["forkrl", "trl"])
    ap.add_argument("--refill", action="store_true", help="also run forkrl with dynamic sampling refilling")
    ap.add_argument("--set", action="append", default=[], help="extra forkrl override, e.g. learner.micro_batch_size=8")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-vs-trl"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vs_trl.json"))
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "prompts.jsonl"
    if args.trl_worker:
        run_trl_worker(work, data, args.steps)
        return
    write_prompts(data)
    results = []
    if args.only != "trl":
        results.append(run_forkrl(work, data, args.steps, False, args.set))
        if args.refill:
            results.append(run_forkrl(work, data, args.steps, True, args.set))
    if args.only != "forkrl":
        results.append(run_trl(work, data, args.steps))
    by = {r["system"]: r for r in results}
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "steps": args.steps,
        "results": results,
    }
    if "forkrl" in by and "TRL GRPOTrainer" in by:
        report["forkrl_over_trl"] = round(by["forkrl"]["step_s_median"] / by["TRL GRPOTrainer"]["step_s_median"], 3)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{'system':<18}{'step s':>8}{'complet.':>10}{'trained':>9}{'length':>8}{'reward':>8}  phases (median s)")
    for r in results:
        phases = " ".join(f"{k}={v}" for k, v in r.get("phase_s_median", {}).items())
        print(
            f"{r['system']:<18}{r['step_s_median']:>8}{r['completions_per_step']:>10}{r['trained_sequences_per_step']:>9}"
            f"{r['completion_length_mean']:>8}{r['reward_mean']:>8}  {phases}"
        )
    if "forkrl_over_trl" in report:
        print(f"forkrl step / TRL step = {report['forkrl_over_trl']} (goal <= 0.333)")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
