"""The Triton kernels compiled for a real GPU: accuracy, strides, > 2^31 elements, memory.

Skipped where no CUDA device is present (CI and the CPU box): there the same kernel code runs under
Triton's interpreter (test_triton_kernel.py). On a GPU machine: `pytest tests/unit/test_entropy_cuda.py`.
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled Triton path)")

if torch.cuda.is_available():
    from actors.algo.selection import entropy_threshold, kth_largest
    from actors.learner.kernels import entropy_triton as kt
    from actors.learner.logits import token_entropy, token_logprobs_and_entropy


def _reference(z, ids, t):
    x = z.double() / t
    lp = torch.log_softmax(x, -1)
    return lp.gather(-1, ids[..., None]).squeeze(-1), -(lp.exp() * lp).sum(-1)


def _grad_excess(dz, ref, dtype):
    # within 1e-3 beyond the rounding of the gradient to the logits' dtype (bf16: 2^-8 relative)
    rounding = 0.0 if dtype == torch.float32 else 2.0**-8
    return ((dz.double() - ref).abs() - rounding * ref.abs()).max().item()


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize("n,v", [(7, 37), (64, 8192 + 300), (512, 151936), (300, 32768)])
@pytest.mark.parametrize("t", [1.0, 0.7])
def test_matches_float64_forward_and_backward(n, v, dtype, tol, t):
    torch.manual_seed(0)
    z = (torch.randn(n, v, device="cuda") * 4).to(dtype)
    z[0, 3] = 60.0  # peaked row
    z[-1, v // 2 :] += 30.0  # the maximum arrives late in the row: the sums are rescaled
    ids = torch.randint(0, v, (n,), device="cuda")
    ref_lp, ref_h = _reference(z, ids, t)
    zz = z.clone().requires_grad_(True)
    lp, h = token_logprobs_and_entropy(zz, ids, t)
    assert (h.double() - ref_h).abs().max().item() <= tol
    assert (lp.double() - ref_lp).abs().max().item() <= tol
    g = torch.randn(n, device="cuda", dtype=torch.float64)
    (lp.double() * g).sum().backward()
    zr = z.double().requires_grad_(True)
    (torch.log_softmax(zr / t, -1).gather(-1, ids[:, None]).squeeze(-1) * g).sum().backward()
    assert zz.grad.dtype == dtype
    assert _grad_excess(zz.grad, zr.grad, dtype) <= 1e-3


def test_every_autotuner_configuration_is_correct():
    torch.manual_seed(1)
    n, v, t = 96, 151936, 0.7
    z = (torch.randn(n, v, device="cuda") * 4).to(torch.bfloat16)
    ids = torch.randint(0, v, (n,), device="cuda")
    ref_lp, ref_h = _reference(z, ids, t)
    for cfg in kt._FWD_CONFIGS:
        lse, h, lp = kt.logprob_entropy_fwd(z, ids, t, config={**cfg.kwargs, "num_warps": cfg.num_warps})
        assert (h.double() - ref_h).abs().max().item() <= 1e-3, cfg
        assert (lp.double() - ref_lp).abs().max().item() <= 1e-3, cfg
    g = torch.randn(n, device="cuda")
    zr = z.double().requires_grad_(True)
    (torch.log_softmax(zr / t, -1).gather(-1, ids[:, None]).squeeze(-1) * g.double()).sum().backward()
    lse, _, _ = kt.logprob_entropy_fwd(z, ids, t)
    for cfg in kt._BWD_CONFIGS:
        dz = kt.logprob_bwd(z, ids, lse, g, t, config={**cfg.kwargs, "num_warps": cfg.num_warps})
        assert _grad_excess(dz, zr.grad, torch.bfloat16) <= 1e-3, cfg


def test_strided_rows_and_leading_dims_give_the_same_result():
    torch.manual_seed(2)
    wide = (torch.randn(6, 50, 4100, device="cuda") * 3).to(torch.bfloat16)
    z = wide[..., :4000]  # rows 4100 apart: not contiguous, unit stride on the vocabulary
    ids = torch.randint(0, 4000, (6, 50), device="cuda")
    lp, h = token_logprobs_and_entropy(z, ids, 0.7)
    lp2, h2 = token_logprobs_and_entropy(z.contiguous(), ids, 0.7)
    assert lp.shape == h.shape == (6, 50)
    # rows 4100 apart are not 16-byte aligned, so Triton compiles other (unvectorised) loads and
    # the lanes sum in another order: equal up to fp32 rounding
    assert torch.allclose(lp, lp2, atol=1e-5, rtol=0) and torch.allclose(h, h2, atol=1e-5, rtol=0)
    # entropy alone is tuned separately (no ids): it may pick another tile, so again up to rounding
    assert torch.allclose(token_entropy(z, 0.7), h, atol=1e-5, rtol=0)


def test_agrees_with_the_cpu_path():
    torch.manual_seed(3)
    z = (torch.randn(256, 32768) * 3).to(torch.bfloat16)
    ids = torch.randint(0, 32768, (256,))
    lp_c, h_c = token_logprobs_and_entropy(z, ids, 0.7)
    lp_g, h_g = token_logprobs_and_entropy(z.cuda(), ids.cuda(), 0.7)
    assert (lp_g.cpu() - lp_c).abs().max().item() < 1e-4
    assert (h_g.cpu() - h_c).abs().max().item() < 1e-4


def test_past_two_to_the_31_elements():
    # 14200 x 151936 = 2.157e9 > 2^31 elements (4.3 GB bf16): rows past the int32 range are right
    n, v, t = 14200, 151936, 0.7
    assert n * v > 2**31
    g = torch.Generator(device="cuda").manual_seed(4)
    z = torch.empty(n, v, device="cuda", dtype=torch.bfloat16)
    for i in range(0, n, 1024):  # fill in slices: no fp32 copy of the whole tensor
        z[i : i + 1024] = (torch.randn(min(1024, n - i), v, device="cuda", generator=g) * 3).to(torch.bfloat16)
    ids = torch.randint(0, v, (n,), device="cuda", generator=g)
    zz = z.requires_grad_(True)
    lp, h = token_logprobs_and_entropy(zz, ids, t)
    tail = slice(n - 64, n)  # offsets beyond 2^31
    assert (tail.start * v) > 2**31
    ref_lp, ref_h = _reference(z.detach()[tail], ids[tail], t)
    assert (h[tail].double() - ref_h).abs().max().item() <= 1e-3
    assert (lp[tail].double() - ref_lp).abs().max().item() <= 1e-3
    w = torch.zeros(n, device="cuda")
    w[tail] = 1.0
    (lp * w).sum().backward()
    zr = z.detach()[tail].double().requires_grad_(True)
    torch.log_softmax(zr / t, -1).gather(-1, ids[tail, None]).sum().backward()
    assert _grad_excess(zz.grad[tail], zr.grad, torch.bfloat16) <= 1e-3
    assert zz.grad[: n - 64].abs().max().item() == 0.0  # rows with zero upstream gradient


def test_forward_extra_memory_is_at_most_one_percent_of_the_logits():
    n, v = 8192, 151936
    z = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, v, (n,), device="cuda")
    token_logprobs_and_entropy(z, ids, 0.7)  # tune and compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, h = token_logprobs_and_entropy(z, ids, 0.7)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 0.01 * z.numel() * z.element_size(), extra


def test_threshold_on_cuda_equals_the_cpu_selection():
    x = torch.rand(5_000_000, generator=torch.Generator().manual_seed(5))
    x[:1000] = 0.5  # ties
    k = 1_000_000
    assert kth_largest(x.cuda(), k) == kth_largest(x, k) == float(x.sort(descending=True).values[k - 1])
    a, b = entropy_threshold(x.cuda(), 0.2), entropy_threshold(x, 0.2)
    assert a == b
