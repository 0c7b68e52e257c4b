"""Checks of the Triton kernels, run under Triton's interpreter on CPU by test_triton_kernel.py
(TRITON_INTERPRET=1 must be set before triton is imported, hence a separate process).

Every configuration the CUDA autotuner may pick (tile width, per-lane or scalar sums) is run here,
so whichever one a GPU selects has been checked against float64."""

import math

import torch

from actors.learner.kernels.entropy_triton import logprob_bwd, logprob_entropy_fwd
from actors.learner.logits import token_logprobs_and_entropy


def reference(z, ids, t):
    x = z.double() / t
    lp = torch.log_softmax(x, -1)
    p = lp.exp()
    h = -(torch.where(p > 0, p * lp, torch.zeros_like(p))).sum(-1)  # 0 log 0 = 0 for -inf logits
    return lp.gather(-1, ids[:, None]).squeeze(-1), h


def check_forward(n, v, dtype, t, config, tol):
    z = (torch.randn(n, v) * 4).to(dtype)
    z[0, 3] = 60.0  # a very peaked row: the running max must keep precision
    if n > 2:
        z[2, v // 2 :] = 40.0 + torch.arange(v - v // 2).to(dtype) * 0  # the max appears late: rescaling
        z[1, : v // 3] = -math.inf  # masked vocabulary entries: 0 log 0
    ids = torch.randint(0, v, (n,))
    if n > 2:
        ids[1] = v - 1  # a finite entry
    ref_lp, ref_h = reference(z, ids, t)
    lse, h, lp = logprob_entropy_fwd(z, ids, t, config=config)
    err_h = (h.double() - ref_h).abs().max().item()
    err_lp = (lp.double() - ref_lp).abs().max().item()
    assert err_h <= tol and err_lp <= tol, (n, v, dtype, t, config, err_h, err_lp)
    _, h2, none = logprob_entropy_fwd(z, None, t, config=config)
    assert none is None and torch.equal(h2, h)


def check_backward(n, v, dtype, t, config):
    z = (torch.randn(n, v) * 4).to(dtype)
    ids = torch.randint(0, v, (n,))
    zr = z.double().requires_grad_(True)
    g = torch.randn(n, dtype=torch.float64)
    (torch.log_softmax(zr / t, -1).gather(-1, ids[:, None]).squeeze(-1) * g).sum().backward()
    lse, _, _ = logprob_entropy_fwd(z, ids, t)
    dz = logprob_bwd(z, ids, lse, g.float(), t, config=config)
    assert dz.dtype == dtype
    # within 1e-3 beyond the conversion of the gradient to z's dtype: one bf16 ulp (2^-7 relative),
    # since Triton's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest
    rounding = 0.0 if dtype == torch.float32 else 2.0**-7
    excess = ((dz.double() - zr.grad).abs() - rounding * zr.grad.abs()).max().item()
    assert excess <= 1e-3, (n, v, dtype, t, config, excess)


def main():
    torch.manual_seed(0)
    shapes = [(5, 37), (4, 2048), (3, 8192 + 300)]  # V below, equal to and beyond one tile
    variants = [
        {"BLOCK_V": b, "ACC_VEC": acc, "PREFETCH": pre}
        for b in (2048, 8192)
        for acc in (True, False)
        for pre in (True, False)
    ]
    for n, v in shapes:
        for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-3)]:
            for t in [1.0, 0.7]:
                for cfg in variants:
                    check_forward(n, v, dtype, t, cfg, tol)
                for bcfg in ({"BLOCK_V": 2048}, {"BLOCK_V": 8192}):
                    check_backward(n, v, dtype, t, bcfg)
    # autograd through the public function (interpreter's default configuration)
    z = (torch.randn(4, 5000) * 4).requires_grad_(True)
    zr = z.detach().double().requires_grad_(True)
    ids = torch.randint(0, 5000, (4,))
    g = torch.randn(4, dtype=torch.float64)
    lp, ent = token_logprobs_and_entropy(z, ids, 0.7)
    (lp.double() * g).sum().backward()
    (torch.log_softmax(zr / 0.7, -1).gather(-1, ids[:, None]).squeeze(-1) * g).sum().backward()
    assert torch.allclose(z.grad.double(), zr.grad, atol=1e-3, rtol=0)
    assert not ent.requires_grad
    # a view strided along the vocabulary reaches the kernels as its contiguous copy
    wide = (torch.randn(3, 2 * 300) * 4)[:, ::2]
    ids = torch.randint(0, 300, (3,))
    lp, ent = token_logprobs_and_entropy(wide, ids, 0.7)
    ref_lp, ref_h = reference(wide.contiguous(), ids, 0.7)
    assert torch.allclose(lp.double(), ref_lp, atol=1e-5) and torch.allclose(ent.double(), ref_h, atol=1e-5)
    print("triton interpreter checks passed")


if __name__ == "__main__":
    main()
