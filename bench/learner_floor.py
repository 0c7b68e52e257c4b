"""The learner's time per trained sequence against what this machine's matrix products allow.

The floor: a learner step is, to first order, its matrix products. Forward costs 2 FLOP per
parameter of the transformer body per token position (with learner.share_prompt, each prompt runs
once per group), 2 x vocab x hidden per response position for the LM head (the prompt's logits are
never built) and 4 x positions x hidden per layer for attention scores and values; backward costs
twice the forward. The rate is measured here, in this process, on the step's own shapes: every
linear layer's `x @ W^T` at one micro-batch's positions, timed as one pass over the model. Floor =
FLOPs / rate; the learner is timed on the same batch (bench/learner_step.py's shape: the demo's
prompts x 8 completions of 8..64 random tokens, all of them trained). A torch.profiler table of one
step says where the rest goes.

    python bench/learner_floor.py        # float32, ZeRO 0, micro-batch 64, as bench/vs_trl.py runs forkrl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULTS = [
    "model.dtype=float32",
    "learner.zero_stage=0",
    "learner.micro_batch_size=64",
    "rollout.max_new_tokens=64",
    "algorithm.top_entropy_quantile=0.2",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "study_base.yaml"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "learner_floor.json"))
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from actors.common.config_load import load_config
    from bench.learner_step import demo_learner

    cfg = load_config(args.config, DEFAULTS + args.set)
    learner, prompts, batch = demo_learner(cfg)
    model = learner.engine.module
    conf = model.config
    hidden, layers, vocab = conf.hidden_size, conf.num_hidden_layers, conf.vocab_size
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in name]
    body_params = sum(m.weight.numel() for m in linears)

    share = learner.cfg.share_prompt
    group = cfg.rollout.group_size
    resp = sum(len(b.response_ids) for b in batch)
    prompt_pos = sum(len(p) for p in prompts) if share else sum(len(b.prompt_ids) for b in batch)
    positions = prompt_pos + resp
    fwd = 2 * body_params * positions + 2 * vocab * hidden * resp + 4 * layers * hidden * positions
    step_flops = 3 * fwd

    # the rate of this machine's matrix products at the step's shapes: one micro-batch's positions
    m_rows = max(1, positions * learner.cfg.micro_batch_size // len(batch))
    dt = next(model.parameters()).dtype
    weights = [m.weight.detach() for m in linears] + [model.get_output_embeddings().weight.detach()]
    xs = {w.shape[1]: torch.randn(m_rows, w.shape[1], dtype=dt) for w in weights}
    pass_flops = sum(2 * m_rows * w.shape[0] * w.shape[1] for w in weights)

    def one_pass() -> None:
        for w in weights:
            torch.mm(xs[w.shape[1]], w.t())

    one_pass()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - t0)
    rate = pass_flops / statistics.median(times)

    learner.train_step(batch)  # warm-up
    step_s = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        learner.train_step(batch)
        step_s.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        learner.train_step(batch)
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    mm = [e for e in averages if e.key in ("aten::mm", "aten::addmm", "aten::bmm")]
    mm_flops, mm_s = sum(e.flops for e in mm), sum(e.self_cpu_time_total for e in mm) / 1e6

    measured = statistics.median(step_s)
    floor = step_flops / rate
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "threads": torch.get_num_threads(),
        "dtype": str(dt),
        "sequences": len(batch),
        "prompt_positions": prompt_pos,
        "response_tokens": resp,
        "share_prompt": share,
        "group_size": group,
        "step_gflop": round(step_flops / 1e9, 1),
        "mm_gflops_per_s": round(rate / 1e9, 1),
        "floor_s_per_step": round(floor, 2),
        # as the learner's own profile sees its matrix products: FLOPs run (padding included) per second
        "mm_gflop_run_in_step": round(mm_flops / 1e9, 1),
        "mm_gflops_per_s_in_step": round(mm_flops / mm_s / 1e9, 1) if mm_s else None,
        "floor_s_per_step_at_step_rate": round(step_flops / (mm_flops / mm_s), 2) if mm_flops else None,
        "step_s": [round(s, 2) for s in step_s],
        "step_s_median": round(measured, 2),
        "floor_s_per_sequence": round(floor / len(batch), 3),
        "s_per_sequence": round(measured / len(batch), 3),
        "over_floor": round(measured / floor, 2),
        # the floor as the issue defines it: the step's FLOPs at the rate aten::mm ran in the learner's profile
        "over_floor_at_step_rate": round(measured * mm_flops / mm_s / step_flops, 2) if mm_flops else None,
        "profile_self_cpu_share": {e.key: round(e.self_cpu_time_total / total, 3) for e in top},
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    print(
        f"learner: {report['s_per_sequence']} s per trained sequence, floor {report['floor_s_per_sequence']} s "
        f"({report['over_floor']}x; goal <= 1.3x); {report['over_floor_at_step_rate']}x of the floor at the step's "
        f"own aten::mm rate"
    )


if __name__ == "__main__":
    main()
