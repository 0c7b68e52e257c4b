"""Checks of the Triton kernels, run under Triton's interpreter on CPU by test_triton_kernel.py
(TRITON_INTERPRET=1 must be set before triton is imported, hence a separate process)."""

import torch

from actors.kernels.entropy_triton import logprob_entropy_fwd
from actors.logits import token_logprobs_and_entropy


def reference(z, ids, t):
    x = z.double() / t
    lp = torch.log_softmax(x, -1)
    return lp.gather(-1, ids[:, None]).squeeze(-1), -(lp.exp() * lp).sum(-1)


def main():
    torch.manual_seed(0)
    # V not a multiple of the tile, V larger than one tile (8192), both dtypes, two temperatures
    for n, v in [(5, 37), (3, 8192 + 300)]:
        for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-3)]:
            for t in [1.0, 0.7]:
                z = (torch.randn(n, v) * 4).to(dtype)
                z[0, 3] = 60.0  # a very peaked row: online max must keep precision
                ids = torch.randint(0, v, (n,))
                ref_lp, ref_h = reference(z, ids, t)
                lse, h, tgt = logprob_entropy_fwd(z, ids, t)
                assert torch.allclose(h.double(), ref_h, atol=tol, rtol=0), (n, v, dtype, t, (h - ref_h).abs().max())
                assert torch.allclose((tgt - lse).double(), ref_lp, atol=tol, rtol=0), (n, v, dtype, t)
                # autograd through the kernel's backward vs autograd of the float64 reference
                zz = z.detach().float().clone().requires_grad_(True)
                zr = z.detach().double().clone().requires_grad_(True)
                g = torch.randn(n, dtype=torch.float64)
                lp, _ = token_logprobs_and_entropy(zz, ids, t)
                (lp.double() * g).sum().backward()
                (torch.log_softmax(zr / t, -1).gather(-1, ids[:, None]).squeeze(-1) * g).sum().backward()
                assert torch.allclose(zz.grad.double(), zr.grad, atol=1e-3, rtol=0), (n, v, dtype, t)
    print("triton interpreter checks passed")


if __name__ == "__main__":
    main()
