"""One learner update (forward, global entropy threshold, loss, backward, optimizer step) on a fixed
batch, with each prompt run once for its completions (learner.share_prompt) and with every sequence
run whole, interleaved in one process. The batch has the demo's shape: 8 prompts of the demo's data
x 8 completions of 8 to 32 random tokens. Prints one JSON row per mode.

    python bench/learner_step.py                      # examples/study_base.yaml's model and learner
    python bench/learner_step.py --rounds 5 --config examples/study_base.yaml --set learner.zero_stage=0
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def demo_learner(cfg: Any) -> tuple[Any, list[list[int]], list[Any]]:
    """A set-up single-rank Learner for cfg, and a batch of the demo's shape: data.prompts_per_step
    prompts x rollout.group_size completions of 8 to rollout.max_new_tokens random tokens."""
    import torch

    from actors.common.batch import TrainSequence
    from actors.common.models import resolve_dtype, resolve_model_path
    from actors.driver.data import PromptSampler, load_examples, render_prompt
    from actors.driver.runtime import load_tokenizer
    from actors.learner.actor import Learner

    model_path, dtype = resolve_model_path(cfg.model.path), resolve_dtype(cfg.model.dtype)
    tok = load_tokenizer(model_path)
    examples = PromptSampler(load_examples(cfg.data), cfg.data.prompts_per_step, 0, cfg.data.shuffle).next()
    prompts = [render_prompt(tok, ex, cfg.data) for ex in examples]
    g = torch.Generator().manual_seed(0)
    batch = []
    for p in prompts:
        adv = torch.randn(cfg.rollout.group_size, generator=g)
        for a in adv.tolist():
            n = int(torch.randint(8, cfg.rollout.max_new_tokens + 1, (1,), generator=g))
            ids = torch.randint(0, len(tok), (n,), generator=g).tolist()
            batch.append(TrainSequence(p, ids, [-1.0] * n, a))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    learner = Learner(
        model_path, cfg.learner, cfg.algorithm, cfg.rollout, 0, dtype, os.cpu_count() or 1, cfg.model.lora
    )
    learner.setup(0, 1, "127.0.0.1", port)
    return learner, prompts, batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "examples" / "study_base.yaml"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. learner.zero_stage=0")
    args = ap.parse_args()

    import torch

    from actors.common.config_load import load_config

    cfg = load_config(args.config, args.set)
    learner, prompts, batch = demo_learner(cfg)
    dtype = learner.dtype
    import deepspeed
    import transformers

    engine = learner.engine
    setup = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
        },
        "dtype": dtype,
        "ds_config": learner.ds_config,
        "optimizer": type(engine.optimizer).__name__,
        "basic_optimizer": f"{type(engine.basic_optimizer).__module__}.{type(engine.basic_optimizer).__name__}",
        "fused_adamw": bool(getattr(engine.basic_optimizer, "defaults", {}).get("fused")),
    }
    print(json.dumps({"setup": setup}), flush=True)
    times: dict[bool, list[float]] = {True: [], False: []}
    first = learner.train_step(batch)  # warm-up (allocator, first-call costs), and the step that is shown
    keys = ("actor/grad_norm", "actor/lr", "entropy/kept_tokens")
    print(json.dumps({"first_step": {k: first.metrics[k] for k in keys} | {"num_valid": first.num_valid}}), flush=True)
    for _ in range(args.rounds):
        for share in (True, False):
            learner.cfg = cfg.learner.model_copy(update={"share_prompt": share})
            t0 = time.perf_counter()
            learner.train_step(batch)
            times[share].append(time.perf_counter() - t0)
    tokens_full = sum(len(b.prompt_ids) + len(b.response_ids) for b in batch)
    tokens_shared = sum(len(p) for p in prompts) + sum(len(b.response_ids) - 1 for b in batch)
    for share in (True, False):
        print(
            json.dumps(
                {
                    "device": "cuda" if torch.cuda.is_available() else "cpu",
                    "model": cfg.model.path,
                    "sequences": len(batch),
                    "mean_prompt_tokens": round(statistics.mean(len(p) for p in prompts), 1),
                    "mean_response_tokens": round(statistics.mean(len(b.response_ids) for b in batch), 1),
                    "method": "share_prompt" if share else "full_sequences",
                    "token_positions": tokens_shared if share else tokens_full,
                    "s_per_step_median": round(statistics.median(times[share]), 2),
                    "s_per_step_all": [round(t, 2) for t in times[share]],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
