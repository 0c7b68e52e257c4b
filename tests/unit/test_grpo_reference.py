"""The vectorised core against the float64 loops of reference.py, over shapes, dtypes and rho."""

import itertools

import pytest
import torch

from actors.algo.loss import policy_loss
from actors.algo.selection import high_entropy_mask
from actors.common.config import AlgorithmConfig as A
from actors.learner.logits import token_entropy, token_logprobs_and_entropy

from . import reference as ref

RHOS = [0.05, 0.2, 0.5, 1.0]


def _batch(seed, b, t, v, dtype, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(b, t, v, generator=g) * scale).to(dtype)
    ids = torch.randint(0, v, (b, t), generator=g)
    lengths = torch.randint(0, t + 1, (b,), generator=g)  # includes all-invalid rows
    valid = torch.arange(t)[None, :] < lengths[:, None]
    return z, ids, valid


@pytest.mark.parametrize(
    "seed,dtype,temp", list(itertools.product(range(3), [torch.float32, torch.bfloat16], [1.0, 0.7]))
)
def test_logprobs_and_entropy_match_float64_loops(seed, dtype, temp):
    z, ids, _ = _batch(seed, 3, 5, 37, dtype)
    logp, h = token_logprobs_and_entropy(z, ids, temperature=temp, chunk_size=2)
    zz = z.double().tolist()
    tol = 1e-5 if dtype == torch.float32 else 1e-4  # bf16 input is exact once read; math is fp32
    for b, t in itertools.product(range(3), range(5)):
        assert h[b, t].item() == pytest.approx(ref.entropy_row(zz[b][t], temp), abs=tol)
        assert logp[b, t].item() == pytest.approx(ref.logprob_row(zz[b][t], int(ids[b, t]), temp), abs=tol)
    assert torch.equal(token_entropy(z, temp, chunk_size=4), h)  # same numbers, entropy-only path


@pytest.mark.parametrize("seed,rho", list(itertools.product(range(6), RHOS)))
def test_mask_matches_reference_selection(seed, rho):
    g = torch.Generator().manual_seed(seed)
    b, t = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
    # coarse values force ties at the threshold
    h = torch.randint(0, 4, (b, t), generator=g).float() / 4
    valid = torch.rand(b, t, generator=g) < 0.7
    mask = high_entropy_mask(h, valid, rho)
    expected = ref.kept_set(h.tolist(), valid.tolist(), rho)
    got = {(i, j) for i, j in zip(*torch.nonzero(mask, as_tuple=True), strict=True)}
    assert {(int(i), int(j)) for i, j in got} == expected


def test_one_token_and_all_ties():
    one = high_entropy_mask(torch.tensor([[0.3]]), torch.tensor([[True]]), 0.05)
    assert one.tolist() == [[True]]
    flat = high_entropy_mask(torch.zeros(2, 5), torch.ones(2, 5, dtype=torch.bool), 0.2)
    assert flat.tolist() == [[True, True, False, False, False], [False] * 5]  # first 2 of 10 in order


@pytest.mark.parametrize(
    "seed,rho,agg",
    list(
        itertools.product(
            range(3), RHOS, ["token_mean_selected", "token_mean", "seq_mean_token_mean", "token_sum_norm"]
        )
    ),
)
def test_loss_matches_reference(seed, rho, agg):
    g = torch.Generator().manual_seed(100 + seed)
    b, t = 4, 6
    logp = torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3
    old = logp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    valid = torch.rand(b, t, generator=g) < 0.8
    valid[seed % b] = False  # an all-padding row (an uneven shard's copy): not a sequence of the step
    h = torch.rand(b, t, generator=g)
    kept = high_entropy_mask(h, valid, rho)
    loss, _ = policy_loss(logp, old, adv, valid, kept, A(loss_agg=agg))
    expected = ref.clipped_loss(
        logp.tolist(), old.tolist(), adv.tolist(), valid.tolist(), kept.tolist(), 0.2, 0.28, agg
    )
    assert loss.item() == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_gradient_zero_on_dropped_and_equal_to_unmasked_on_kept(temp):
    g = torch.Generator().manual_seed(7)
    b, t, v = 3, 4, 11
    z = torch.randn(b, t, v, generator=g, requires_grad=True)
    ids = torch.randint(0, v, (b, t), generator=g)
    valid = torch.ones(b, t, dtype=torch.bool)
    adv = torch.tensor([1.0, -0.5, 0.25])
    logp, h = token_logprobs_and_entropy(z, ids, temperature=temp)
    kept = high_entropy_mask(h, valid, 0.5)
    old = logp.detach() - 0.05  # ratio = e^0.05, inside the clip range
    # token_mean over valid keeps the same normaliser for masked and unmasked losses
    loss, _ = policy_loss(logp, old, adv, valid, kept, A(loss_agg="token_mean"))
    (gz,) = torch.autograd.grad(loss, z)
    # reference: autograd through torch's own log_softmax, unmasked, then per token
    z2 = z.detach().clone().requires_grad_(True)
    lp2 = torch.log_softmax(z2.double() / temp, -1).gather(-1, ids[..., None]).squeeze(-1)
    per_tok = -adv[:, None].double() * torch.exp(lp2 - old.double())
    (g_full,) = torch.autograd.grad(per_tok.sum() / (b * t), z2)
    for i, j in itertools.product(range(b), range(t)):
        if kept[i, j]:
            torch.testing.assert_close(gz[i, j], g_full[i, j], atol=1e-6, rtol=1e-5)
        else:
            assert torch.count_nonzero(gz[i, j]) == 0
