"""What the entropy filter adds to the LM-head slice of a learner step, forkrl against the peers.

Runs ../shared/bench/step_anchor.py first (its rows: the step with fp32 log_softmax + gather and no
filter, plus row-chunked and torch.compile'd entropy, and threshold selections over 67M tokens),
then the same slice the way forkrl's learner does it (learner.entropy_pass = fused): logits =
hidden @ W^T, log-probs and entropy from one read of the logits (actors.learner.logits), the exact global
threshold and masks of `actors.algo.entropy_filter.plan_step`, loss, backward. Rows:
    forkrl_step_no_filter   log-probs only, every token in the loss
    forkrl_step_filter      log-probs + entropy, top-rho mask from the global threshold
    forkrl_threshold        actors.algo.selection.entropy_threshold over the paper-scale token count
`overhead_vs_no_filter` is relative to forkrl_step_no_filter (medians of interleaved rounds).
Goal: the filter adds <= 3%.

    python bench/step.py           # GPU: N 8192, d 4096, V 151936 bf16 (the anchor's shapes)
    ANCHOR_STEP=path/to/step_anchor.py python bench/step.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anchors import load_anchor  # noqa: E402  (bench/ is on the path when run as a script)

from actors.algo.entropy_filter import plan_step  # noqa: E402
from actors.algo.selection import entropy_threshold  # noqa: E402
from actors.learner.logits import token_logprobs, token_logprobs_and_entropy  # noqa: E402


def main() -> None:
    anchor = load_anchor("ANCHOR_STEP", "step_anchor.py")
    anchor.main()  # the peers' rows, same process, same device
    dev, temp, small = anchor.dev, anchor.T, anchor.SMALL
    n, d, v = (256, 64, 4096) if small or dev == "cpu" else (8192, 4096, 151936)
    rho = 0.2
    torch.manual_seed(0)
    h = (torch.randn(n, d, device=dev) * 0.05).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(v, d, device=dev) * 0.02).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, v, (n,), device=dev)
    adv = torch.randn(n, device=dev)
    valid = torch.ones(1, n, dtype=torch.bool, device=dev)
    kept = {}

    def step(with_filter: bool) -> None:
        logits = h @ w.t()  # [N, V] bf16
        if with_filter:
            lp, ent = token_logprobs_and_entropy(logits, ids, temp)
            plan = plan_step([ent[None]], [valid], rho)
            mask = plan.masks[0][0]
            kept["k"] = plan.num_kept
        else:
            lp = token_logprobs(logits, ids, temp)
            mask = torch.ones(n, dtype=torch.bool, device=dev)
        loss = -(lp * adv * mask).sum() / n
        loss.backward()
        h.grad = None
        w.grad = None

    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    # interleaved rounds, so clock and thermal drift fall on both alike; medians over rounds
    rounds = 3 if dev == "cpu" else 7
    pairs = [
        (anchor.timeit(lambda: step(False), reps=3), anchor.timeit(lambda: step(True), reps=3)) for _ in range(rounds)
    ]
    base = sorted(p[0] for p in pairs)[rounds // 2]
    filt = sorted(p[1] for p in pairs)[rounds // 2]
    for method, ms in (("forkrl_step_no_filter", base), ("forkrl_step_filter", filt)):
        row = {
            "device": name,
            "N": n,
            "d": d,
            "V": v,
            "method": method,
            "ms": round(ms, 3),
            "overhead_vs_no_filter": round(ms / base - 1, 4),
        }
        if method == "forkrl_step_filter":
            row["kept_tokens"] = kept["k"]
        print(json.dumps(row), flush=True)
    # the filter's own work on this step's tokens (entropy comes free with the log-probs): threshold,
    # tie counts and masks of plan_step, timed alone
    ent = torch.rand(1, n, device=dev) * 3
    ms = anchor.timeit(lambda: plan_step([ent], [valid], rho).masks[0], reps=9)
    print(
        json.dumps(
            {
                "device": name,
                "N": n,
                "method": "forkrl_plan_step_only",
                "ms": round(ms, 3),
                "share_of_no_filter_step": round(ms / base, 4),
            }
        ),
        flush=True,
    )
    m = 2**16 if small or dev == "cpu" else 67_108_864
    e = torch.rand(m, device=dev)
    ms = anchor.timeit(lambda: entropy_threshold(e, rho), reps=5)
    print(json.dumps({"device": name, "tokens": m, "method": "forkrl_threshold", "ms": round(ms, 3)}), flush=True)


if __name__ == "__main__":
    main()
