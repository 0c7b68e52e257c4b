"""forkrl's log-prob + entropy path against the anchor methods, in one run.

Anchors come from ../shared/bench/entropy_anchor.py (read_once, logprob_only, compiled_one_pass,
chunked_lse_1024, chunked_logsoftmax_128, naive_fp32), timed by its own `bench` function; forkrl's
methods are `forkrl_entropy` (entropy only) and `forkrl_logprob_entropy` (both, one read). One JSON
row per method and shape, with the anchor's keys.

    python bench/entropy.py              # GPU: the anchor's shapes; CPU: shapes that finish in minutes
    ANCHOR=path/to/entropy_anchor.py python bench/entropy.py
Goals: GPU >= 75% of read_once bandwidth and <= 1% extra memory; CPU >= 2x chunked_logsoftmax_128.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anchors import load_anchor  # noqa: E402  (bench/ is on the path when run as a script)

from actors.learner.logits import token_entropy, token_logprobs_and_entropy  # noqa: E402


def main() -> None:
    anchor = load_anchor("ANCHOR", "entropy_anchor.py")
    dev, temp = anchor.dev, anchor.T
    if dev == "cuda":
        cases = [(8192, 151936), (16384, 151936)]
        skip: set[str] = set()
    else:  # CPU: the 2-core box; the full-materialising anchors are left out of the big shape
        cases = [(256, 151936), (2048, 32768)]
        skip = {"compiled_one_pass"}  # eager on CPU in the anchor, identical to chunked_lse
    for n, v in cases:
        torch.manual_seed(0)
        z = (torch.randn(n, v, device=dev) * 3).to(torch.bfloat16)
        ids = torch.randint(0, v, (n,), device=dev)
        gb = z.numel() * z.element_size() / 1e9
        methods = [
            ("read_once", anchor.read_once, (z,)),
            ("logprob_only", anchor.logprob_only, (z, ids)),
            ("forkrl_entropy", lambda z: token_entropy(z, temp), (z,)),
            ("forkrl_logprob_entropy", lambda z, i: token_logprobs_and_entropy(z, i, temp)[1], (z, ids)),
            ("compiled_one_pass", anchor.compiled, (z,)),
            ("chunked_lse_1024", anchor.chunked_lse, (z,)),
            ("chunked_logsoftmax_128", anchor.chunked_logsoftmax, (z,)),
            ("naive_fp32", anchor.naive_fp32, (z,)),
        ]
        ref = None
        for name, fn, args in methods:
            if name in skip:
                continue
            try:
                if name.startswith("forkrl") and dev == "cuda":
                    fn(*args)  # autotune + compile first: the tuner's scratch memory is not the method's
                    torch.cuda.synchronize()
                out, sec, peak = anchor.bench(fn, *args, reps=3 if dev == "cpu" else 5)
            except Exception as e:  # OOM or indexing limits are results too
                print(json.dumps({"N": n, "V": v, "method": name, "error": repr(e)[:300]}), flush=True)
                continue
            err = None
            if name not in ("read_once", "logprob_only"):
                ref = out if ref is None else ref
                err = float((out.float() - ref.float()).abs().max())
            row = {
                "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                "N": n,
                "V": v,
                "method": name,
                "ms": round(sec * 1e3, 3),
                "logits_GB": round(gb, 3),
                "GBps_logits_read": round(gb / sec, 1),
                # the anchor measures memory with CUDA's allocator only; on CPU the forkrl path's peak
                # is measured by tests/unit/test_scale.py (ru_maxrss in a fresh process)
                "extra_peak_GB": round(peak / 1e9, 3) if dev == "cuda" else None,
                "max_abs_err_vs_first": err,
            }
            print(json.dumps(row), flush=True)
        if dev == "cuda":  # the same kernels timed by CUDA events (no Python launch cost in the number)
            import triton.testing

            for name, fn, args in methods[:4]:
                ms = triton.testing.do_bench(lambda fn=fn, args=args: fn(*args), warmup=25, rep=200)
                print(
                    json.dumps(
                        {
                            "device": torch.cuda.get_device_name(),
                            "N": n,
                            "V": v,
                            "method": name,
                            "timer": "cuda_events",
                            "ms": round(ms, 3),
                            "GBps_logits_read": round(gb / ms * 1e3, 1),
                        }
                    ),
                    flush=True,
                )
            # the learner's use: log-probs + entropy forward, d logits backward (reads z twice, writes dz)
            zg = z.detach().requires_grad_(True)
            g = torch.randn(n, device=dev)

            def fwd_bwd(zg=zg, ids=ids, g=g):
                lp, _ = token_logprobs_and_entropy(zg, ids, temp)
                lp.backward(g)
                zg.grad = None

            ms = triton.testing.do_bench(fwd_bwd, warmup=25, rep=200)
            print(
                json.dumps(
                    {
                        "device": torch.cuda.get_device_name(),
                        "N": n,
                        "V": v,
                        "method": "forkrl_logprob_fwd_bwd",
                        "timer": "cuda_events",
                        "ms": round(ms, 3),
                        "GBps_moved": round(3 * gb / ms * 1e3, 1),
                    }
                ),
                flush=True,
            )
            del zg
        del z, ids
        if dev == "cuda":
            torch.cuda.empty_cache()
    if dev == "cuda":
        from actors.learner.kernels.entropy_triton import best_configs

        print(json.dumps({"device": torch.cuda.get_device_name(), "method": "autotuned_configs", **best_configs()}))


if __name__ == "__main__":
    main()
