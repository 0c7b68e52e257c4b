"""The off-policy correction of asynchronous mode, worked by hand (actors.algo.loss.policy_loss).

Decoupled PPO: the ratio r = pi_theta / pi_prox is taken against the proximal policy (the learner's
log-probs before the update, `old_logprobs`) and clipped there; the behaviour policy that generated the
tokens (the engine, perhaps k versions behind: `rollout_logprobs`) enters only through the truncated
importance weight w = min(pi_prox / pi_behav, tis_cap), which scales each token's term and carries no
gradient."""

import math

import pytest
import torch

from actors.algo.loss import policy_loss
from actors.common.config import AlgorithmConfig as A

LN = math.log


def _case(cap: float | None):
    prox = torch.full((1, 3), LN(0.5))  # the learner before the update
    behav = torch.tensor([[LN(0.25), LN(0.5), LN(0.8)]])  # a stale engine: pi_prox / pi_behav = 2, 1, 0.625
    theta = (prox + torch.tensor([[LN(1.1), LN(1.5), LN(0.7)]])).requires_grad_()  # ratios 1.1, 1.5, 0.7
    valid = torch.ones(1, 3, dtype=torch.bool)
    loss, m = policy_loss(theta, prox, torch.tensor([1.0]), valid, None, A(tis_cap=cap), rollout_logprobs=behav)
    loss.backward()
    return loss, m, theta.grad


def test_the_weight_is_prox_over_behaviour_truncated_and_the_ratio_is_against_prox():
    # A = +1, clip [0.8, 1.28]: per token pg = max(-r, -clip(r)) = -1.1, -1.28 (clipped), -0.7
    # weights min(2, 1.5) = 1.5, 1, 0.625 -> sum = -1.65 - 1.28 - 0.4375 = -3.3675; mean over 3 tokens
    loss, m, grad = _case(cap=1.5)
    assert loss.item() == pytest.approx(-3.3675 / 3, abs=1e-6)
    # d/dlogp of -w r A (r = exp(logp - prox)) = -w r where unclipped; 0 on the clipped token
    assert grad[0].tolist() == pytest.approx([-1.5 * 1.1 / 3, 0.0, -0.625 * 0.7 / 3], abs=1e-6)
    assert m["actor/clipfrac"] == pytest.approx(1 / 3)  # the clip acts on r against prox, not on pi_theta / pi_behav


def test_a_larger_cap_lets_the_full_weight_through():
    # cap 4: weights 2, 1, 0.625 -> -2.2 - 1.28 - 0.4375 = -3.9175
    loss, _, grad = _case(cap=4.0)
    assert loss.item() == pytest.approx(-3.9175 / 3, abs=1e-6)
    assert grad[0, 0].item() == pytest.approx(-2.0 * 1.1 / 3, abs=1e-6)


def test_on_policy_tokens_get_weight_one():
    # behaviour = prox (a fresh engine that matches the learner): w = 1, plain PPO-clip
    prox = torch.full((1, 2), LN(0.5))
    theta = prox + torch.tensor([[LN(1.1), LN(0.7)]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    weighted, _ = policy_loss(theta, prox, torch.tensor([1.0]), valid, None, A(tis_cap=2.0), rollout_logprobs=prox)
    plain, _ = policy_loss(theta, prox, torch.tensor([1.0]), valid, None, A(tis_cap=None), rollout_logprobs=prox)
    assert weighted.item() == pytest.approx(plain.item()) == pytest.approx((-1.1 - 0.7) / 2, abs=1e-6)


def test_asynchronous_mode_needs_the_weight():
    from actors.common.config import JobConfig

    with pytest.raises(ValueError, match=r"trainer.max_staleness=1 .* algorithm.tis_cap must be set"):
        JobConfig.model_validate({"trainer": {"max_staleness": 1}, "algorithm": {"tis_cap": None}})
    assert JobConfig.model_validate({"trainer": {"max_staleness": 2}}).algorithm.tis_cap == 2.0
