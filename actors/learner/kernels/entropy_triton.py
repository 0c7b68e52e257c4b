"""Triton kernels: log-prob of the sampled token and entropy of softmax(z / T), one read of z.

Forward, one program per row, streaming the vocabulary in BLOCK_V tiles. Work is in base 2,
y = z * log2(e) / T, relative to a running row maximum m (updated once per tile):
    d = y - m,  e = 2^d,  s = sum e,  u = sum e d
    natural units: lse = ln2 (m + log2 s),  H = ln2 (log2 s - u / s),  logp = z[o] / T - lse
(all three written by the kernel)
With ACC_VEC the sums are kept per lane ([BLOCK_V] accumulators, reduced once at the end of the
row), so a tile costs one cross-thread reduction (its max) instead of three; without it they are
scalars. When a tile raises the maximum, the sums are rescaled: s' = a s, u' = a (u + delta s),
a = 2^delta, delta = m_old - m_new. Everything is relative to the running max, so large logits lose
no precision to cancellation. d is clamped at -200 (2^-200 is 0 in fp32), which keeps -inf
logits and the masked lanes of the last tile from producing 0 * inf.

Backward writes d z = g (onehot(o) - 2^(y - lse2)) / T in one more pass (lse2 = lse log2(e)).
Row offsets are int64, so tensors past 2^31 elements are fine.

On CUDA the tile size, warps and accumulator layout are picked per vocabulary size and dtype by
Triton's autotuner (a one-off cost of about a second per new shape class); under Triton's
interpreter (CPU tests) a fixed configuration runs, and every variant is checked there.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
D_MIN = tl.constexpr(-200.0)  # clamp for d = y - m: 2^-200 underflows to 0 in fp32


@triton.jit  # type: ignore[untyped-decorator]
def _tile_update(z, m, s, u, scale, ACC_VEC: tl.constexpr):  # type: ignore[no-untyped-def]
    """Fold one tile z [BLOCK_V] fp32 (masked lanes -inf) into (m, s, u)."""
    m_new = tl.maximum(m, tl.max(z, 0) * scale)
    if m_new > m:  # uniform branch: rescale the sums to the new maximum
        delta = m - m_new  # m starts at -1e30 (finite), so delta * 0 = 0 on the first tile
        a = tl.exp2(delta)
        u = a * (u + delta * s)
        s = a * s
        m = m_new
    d = tl.maximum(z * scale - m, D_MIN)
    e = tl.exp2(d)
    if ACC_VEC:
        s += e
        u += e * d
    else:
        s += tl.sum(e, 0)
        u += tl.sum(e * d, 0)
    return m, s, u


@triton.jit  # type: ignore[untyped-decorator]
def _fwd_kernel(  # type: ignore[no-untyped-def]
    z_ptr,
    ids_ptr,
    lse_ptr,
    ent_ptr,
    lp_ptr,
    stride_row,
    V,
    scale,
    inv_t,
    HAS_IDS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ACC_VEC: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), -1e30, tl.float32)
    if ACC_VEC:
        s = tl.zeros((BLOCK_V,), tl.float32)
        u = tl.zeros((BLOCK_V,), tl.float32)
    else:
        s = tl.zeros((), tl.float32)
        u = tl.zeros((), tl.float32)
    n_full = V // BLOCK_V
    tail = n_full * BLOCK_V
    if PREFETCH:  # the next tile's load is issued before this tile's arithmetic: twice the bytes in flight
        z_next = tl.load(base + offs, mask=offs < tail, other=0.0)
        for i in range(0, n_full):
            z = z_next.to(tl.float32)
            nxt = (i + 1) * BLOCK_V + offs
            z_next = tl.load(base + nxt, mask=nxt < tail, other=0.0)
            m, s, u = _tile_update(z, m, s, u, scale, ACC_VEC)
    else:
        for i in range(0, n_full):  # full tiles: no masks
            z = tl.load(base + i * BLOCK_V + offs).to(tl.float32)
            m, s, u = _tile_update(z, m, s, u, scale, ACC_VEC)
    if tail < V:
        cols = tail + offs
        z = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m, s, u = _tile_update(z, m, s, u, scale, ACC_VEC)
    if ACC_VEC:
        s_tot = tl.sum(s, 0)
        u_tot = tl.sum(u, 0)
    else:
        s_tot = s
        u_tot = u
    log2_s = tl.log2(s_tot)
    lse = (m + log2_s) * LN2
    tl.store(lse_ptr + row, lse)
    tl.store(ent_ptr + row, (log2_s - u_tot / s_tot) * LN2)
    if HAS_IDS:
        tok = tl.load(ids_ptr + row)
        tl.store(lp_ptr + row, tl.load(base + tok).to(tl.float32) * inv_t - lse)


@triton.jit  # type: ignore[untyped-decorator]
def _bwd_kernel(  # type: ignore[no-untyped-def]
    z_ptr,
    ids_ptr,
    lse_ptr,
    g_ptr,
    dz_ptr,
    stride_row,
    stride_grad_row,
    V,
    scale,
    inv_t,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_row
    gbase = dz_ptr + row * stride_grad_row
    offs = tl.arange(0, BLOCK_V)
    lse2 = tl.load(lse_ptr + row) * LOG2E
    g = tl.load(g_ptr + row).to(tl.float32) * inv_t
    tok = tl.load(ids_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        valid = cols < V
        z = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32)
        p = tl.exp2(z * scale - lse2)
        dz = tl.where(cols == tok, g - g * p, -g * p)
        tl.store(gbase + cols, dz.to(dz_ptr.dtype.element_ty), mask=valid)


def _prune(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """Drop tiles far wider than the vocabulary (tiny test vocabularies)."""
    widest = max(2048, triton.next_power_of_2(max(int(named_args["V"]), 16)))
    return [c for c in configs if c.kwargs["BLOCK_V"] <= widest]


_FWD_CONFIGS = [
    triton.Config({"BLOCK_V": b, "ACC_VEC": acc, "PREFETCH": pre}, num_warps=w)
    for b, w in [(1024, 4), (2048, 2), (2048, 4), (4096, 8), (8192, 8), (8192, 16)]
    for acc in (True, False)
    for pre in (True, False)
]  # num_stages is left out: Triton's pipeliner does not touch these loads (same SASS for 1 to 3)
_BWD_CONFIGS = [triton.Config({"BLOCK_V": b}, num_warps=w) for b, w in [(2048, 4), (4096, 8), (8192, 8), (8192, 16)]]


def _quick_bench(kernel_call: Any, quantiles: Any) -> Any:
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


# tuned once per (vocabulary size, ids or not); Triton adds the tensors' dtypes to the key
_TUNE = {"prune_configs_by": {"early_config_prune": _prune}, "do_bench": _quick_bench}
_fwd_tuned = triton.autotune(configs=_FWD_CONFIGS, key=["V", "HAS_IDS"], **_TUNE)(_fwd_kernel)
_bwd_tuned = triton.autotune(configs=_BWD_CONFIGS, key=["V"], **_TUNE)(_bwd_kernel)

# the interpreter runs one fixed configuration (tests pass others explicitly)
INTERPRET_FWD = {"BLOCK_V": 4096, "ACC_VEC": True, "PREFETCH": True}
INTERPRET_BWD = {"BLOCK_V": 4096}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def best_configs() -> dict[str, str]:
    """The autotuner's picks so far, per key (for the benchmark's report)."""
    out = {}
    for name, tuned in (("fwd", _fwd_tuned), ("bwd", _bwd_tuned)):
        for key, cfg in getattr(tuned, "cache", {}).items():
            out[f"{name}{key}"] = str(cfg)
    return out


def logprob_entropy_fwd(
    z: torch.Tensor, ids: torch.Tensor | None, temperature: float, config: dict[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """z [N, V] (unit stride on V) -> (lse [N], entropy [N], log p(o) [N] or None), fp32.

    config: a fixed {"BLOCK_V", "ACC_VEC", "PREFETCH"} (and optionally "num_warps") instead of the
    autotuner's.
    """
    n, v = z.shape
    if z.stride(-1) != 1:
        raise ValueError(f"logits must be contiguous along the vocabulary, got strides {tuple(z.stride())}")
    lse = torch.empty(n, dtype=torch.float32, device=z.device)
    ent = torch.empty(n, dtype=torch.float32, device=z.device)
    lp = torch.empty(n, dtype=torch.float32, device=z.device) if ids is not None else None
    if n == 0:
        return lse, ent, lp
    args = (
        z,
        ids if ids is not None else lse,
        lse,
        ent,
        lp if lp is not None else ent,
        z.stride(0),
        v,
        float(LOG2E.value) / temperature,
        1.0 / temperature,
    )
    if config is None and not _interpreting():
        _fwd_tuned[(n,)](*args, HAS_IDS=ids is not None)
    else:
        cfg = dict(INTERPRET_FWD if config is None else config)
        _fwd_kernel[(n,)](*args, HAS_IDS=ids is not None, **cfg)
    return lse, ent, lp


def logprob_bwd(
    z: torch.Tensor,
    ids: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    temperature: float,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """d loss / d z [N, V] in z's dtype, given d loss / d logp [N]."""
    n, v = z.shape
    dz = torch.empty_like(z)
    if n == 0:
        return dz
    args = (
        z,
        ids,
        lse,
        grad_logp,
        dz,
        z.stride(0),
        dz.stride(0),
        v,
        float(LOG2E.value) / temperature,
        1.0 / temperature,
    )
    if config is None and not _interpreting():
        _bwd_tuned[(n,)](*args)
    else:
        _bwd_kernel[(n,)](*args, **dict(INTERPRET_BWD if config is None else config))
    return dz
