"""Triton kernels: log-prob of the sampled token and entropy of softmax(z / T), one read of z.

Forward, one program per row, streaming the vocabulary in BLOCK_V tiles with an online max m:
    s = sum_j exp(x_j - m)              (rescaled by exp(m_old - m_new) when m grows)
    t = sum_j exp(x_j - m) (x_j - m)    (t_new = a (t + (m_old - m_new) s), a = exp(m_old - m_new))
    lse = m + log s,   H = log s - t / s,   logp = x[o] - lse
Everything is relative to the running max, so large logits lose no precision to cancellation.
Backward writes d z = g (onehot(o) - exp(x - lse)) / T in one more pass. Row offsets are int64,
so tensors past 2^31 elements are fine.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fwd_kernel(
    z_ptr,
    ids_ptr,
    lse_ptr,
    ent_ptr,
    tgt_ptr,
    stride_row,
    V,
    inv_t,
    HAS_IDS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), -float("inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        valid = cols < V
        x = tl.load(base + cols, mask=valid, other=-float("inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(x, 0))
        a = tl.exp(m - m_new)  # 0 on the first tile (m = -inf)
        d = tl.where(valid, x - m_new, 0.0)  # masked lanes never see -inf
        e = tl.where(valid, tl.exp(d), 0.0)
        ed = e * d
        delta = tl.where(m == -float("inf"), 0.0, m - m_new)
        t = a * (t + delta * s) + tl.sum(ed, 0)
        s = a * s + tl.sum(e, 0)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    tl.store(lse_ptr + row, lse)
    tl.store(ent_ptr + row, log_s - t / s)
    if HAS_IDS:
        tok = tl.load(ids_ptr + row)
        tl.store(tgt_ptr + row, tl.load(base + tok).to(tl.float32) * inv_t)


@triton.jit
def _bwd_kernel(
    z_ptr,
    ids_ptr,
    lse_ptr,
    g_ptr,
    dz_ptr,
    stride_row,
    stride_grad_row,
    V,
    inv_t,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_row
    gbase = dz_ptr + row * stride_grad_row
    offs = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row).to(tl.float32) * inv_t
    tok = tl.load(ids_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        valid = cols < V
        x = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32) * inv_t
        p = tl.exp(x - lse)
        dz = tl.where(cols == tok, g - g * p, -g * p)
        tl.store(gbase + cols, dz.to(dz_ptr.dtype.element_ty), mask=valid)


def _block(v: int) -> int:
    return min(8192, triton.next_power_of_2(max(v, 16)))


def logprob_entropy_fwd(
    z: torch.Tensor, ids: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """z [N, V] (unit stride on V) -> (lse [N], entropy [N], target logit x[o] [N] or None), fp32."""
    n, v = z.shape
    assert z.stride(-1) == 1
    lse = torch.empty(n, dtype=torch.float32, device=z.device)
    ent = torch.empty(n, dtype=torch.float32, device=z.device)
    tgt = torch.empty(n, dtype=torch.float32, device=z.device) if ids is not None else None
    if n == 0:
        return lse, ent, tgt
    block = _block(v)
    _fwd_kernel[(n,)](
        z,
        ids if ids is not None else lse,
        lse,
        ent,
        tgt if tgt is not None else ent,
        z.stride(0),
        v,
        1.0 / temperature,
        HAS_IDS=ids is not None,
        BLOCK_V=block,
        num_warps=8 if block >= 4096 else 4,
    )
    return lse, ent, tgt


def logprob_bwd(
    z: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor, temperature: float
) -> torch.Tensor:
    """d loss / d z [N, V] in z's dtype, given d loss / d logp [N]."""
    n, v = z.shape
    dz = torch.empty_like(z)
    if n == 0:
        return dz
    block = _block(v)
    _bwd_kernel[(n,)](
        z,
        ids,
        lse,
        grad_logp,
        dz,
        z.stride(0),
        dz.stride(0),
        v,
        1.0 / temperature,
        BLOCK_V=block,
        num_warps=8 if block >= 4096 else 4,
    )
    return dz
