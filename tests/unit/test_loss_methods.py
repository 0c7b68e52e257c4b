"""The loss methods beside PPO-clip (GSPO, CISPO), the rollout-mismatch weight (TIS/MIS, token or
sequence), the entropy bonus and the filter's learning-rate scale: worked arithmetic, then the
vectorised loss against the float64 loops of reference.py."""

import itertools
import math

import pytest
import torch

from actors.algo.covariance import plan_covariance, select_covariance
from actors.algo.loss import mismatch_weight, policy_loss
from actors.algo.selection import high_entropy_mask
from actors.common.config import AlgorithmConfig as A
from actors.common.config import JobConfig, LearnerConfig
from actors.learner.deepspeed_config import deepspeed_config, learning_rate
from actors.learner.logits import token_entropy, token_entropy_with_grad

from . import reference as ref

VALID2 = torch.tensor([[True, True]])


def _grad(algo: A, diff: list[float], adv: float, mask=None, valid=VALID2, **kw) -> tuple[float, list[float], dict]:
    """(loss, d loss / d logp, metrics) of one sequence whose log-ratios to the old policy are `diff`."""
    old = torch.tensor([[-1.0] * len(diff)], dtype=torch.float64)
    logp = (old + torch.tensor([diff], dtype=torch.float64)).requires_grad_()
    loss, m = policy_loss(logp, old, torch.tensor([adv], dtype=torch.float64), valid, mask, algo, **kw)
    loss.backward()
    return float(loss.detach()), logp.grad[0].tolist(), m


def test_gspo_takes_one_length_normalised_ratio_per_sequence():
    # log-ratios 0.1 and 0.3: s = exp(0.2) = 1.2214 < 1 + 0.28, unclipped; each token's term is -A s
    # and its gradient -A s / 2 (the mean over the two kept tokens), the same for both tokens
    loss, grad, m = _grad(A(policy_loss="gspo"), [0.1, 0.3], adv=1.0)
    s = math.exp(0.2)
    assert loss == pytest.approx(-s) and grad == pytest.approx([-s / 2, -s / 2]) and m["actor/clipfrac"] == 0
    # PPO-clip on the same tokens clips the second (exp(0.3) = 1.35 > 1.28): its gradient is 0
    _, ppo, _ = _grad(A(), [0.1, 0.3], adv=1.0)
    assert ppo == pytest.approx([-math.exp(0.1) / 2, 0.0])
    # log-ratios 0.2 and 0.4: s = exp(0.3) = 1.35 > 1.28, the whole sequence is clipped
    loss, grad, m = _grad(A(policy_loss="gspo"), [0.2, 0.4], adv=1.0)
    assert loss == pytest.approx(-1.28) and grad == [0.0, 0.0] and m["actor/clipfrac"] == 1.0


def test_gspo_with_the_filter_keeps_the_sequence_ratio_and_trains_the_kept_tokens():
    # only the second token is kept: the ratio is still the whole sequence's (mean of 0.1 and 0.3)
    keep = torch.tensor([[False, True]])
    loss, grad, _ = _grad(A(policy_loss="gspo"), [0.1, 0.3], adv=1.0, mask=keep)
    assert loss == pytest.approx(-math.exp(0.2)) and grad == pytest.approx([0.0, -math.exp(0.2)])


def test_cispo_keeps_every_tokens_gradient_with_a_capped_stop_gradient_weight():
    # ratios 1 and 5, cap 4: weights 1 and 4; A = 0.5; d/dlogp of -w A logp / 2 = -w A / 2
    loss, grad, m = _grad(A(policy_loss="cispo", cispo_max_weight=4.0), [0.0, math.log(5.0)], adv=0.5)
    logp = [-1.0, -1.0 + math.log(5.0)]
    assert grad == pytest.approx([-0.25, -1.0]) and m["actor/clipfrac"] == 0.5
    assert loss == pytest.approx(-(1 * 0.5 * logp[0] + 4 * 0.5 * logp[1]) / 2)
    # a negative advantage pushes down with the same weights (PPO-clip would zero nothing here either,
    # but a ratio of 5 with A > 0 is where PPO-clip drops the token and CISPO does not)
    _, grad, _ = _grad(A(policy_loss="cispo", cispo_max_weight=4.0), [0.0, math.log(5.0)], adv=-0.5)
    assert grad == pytest.approx([0.25, 1.0])


def test_the_mismatch_weight_truncates_or_masks_per_token_or_per_sequence():
    old = torch.tensor([[math.log(3.0), math.log(0.5), 0.0]], dtype=torch.float64)
    rollout = torch.zeros_like(old)
    valid = torch.tensor([[True, True, False]])

    def weight(cap, level, mode):
        w, limited = mismatch_weight(old, rollout, valid, A(tis_cap=cap, mismatch_level=level, mismatch_mode=mode))
        return [round(x, 6) for x in w[0, :2].tolist()], limited[0].tolist()

    # token: ratios 3 and 0.5; at C = 2 TIS gives 2 and 0.5, MIS drops the first token
    assert weight(2.0, "token", "truncate") == ([2.0, 0.5], [True, False, False])
    assert weight(2.0, "token", "mask") == ([0.0, 0.5], [True, False, False])
    # sequence: one weight 3 x 0.5 = 1.5 (the padding position counts for nothing)
    assert weight(2.0, "sequence", "truncate") == ([1.5, 1.5], [False, False, False])
    assert weight(1.2, "sequence", "truncate") == ([1.2, 1.2], [True, True, False])
    assert weight(1.2, "sequence", "mask") == ([0.0, 0.0], [True, True, False])


def test_the_mismatch_weight_scales_the_loss_and_is_reported():
    algo = A(tis_cap=2.0, mismatch_mode="mask")
    old = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    rollout = old - torch.tensor([[math.log(3.0), math.log(0.5)]], dtype=torch.float64)  # ratios 3 and 0.5
    logp = old.clone().requires_grad_()
    loss, m = policy_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), VALID2, None, algo,
                          rollout_logprobs=rollout)  # fmt: skip
    loss.backward()
    # r = 1: each token's term is -A w; the first is masked (w 0), the second weighs 0.5
    assert float(loss.detach()) == pytest.approx(-0.5 / 2) and logp.grad[0].tolist() == pytest.approx([0.0, -0.25])
    assert m["mismatch/weight_mean"] == pytest.approx(0.25) and m["mismatch/limited_frac"] == 0.5
    # tis_cap None: no correction at all, whatever the mode
    plain, m = policy_loss(old, old, torch.tensor([1.0], dtype=torch.float64), VALID2, None,
                           A(tis_cap=None, mismatch_mode="mask"), rollout_logprobs=rollout)  # fmt: skip
    assert float(plain) == pytest.approx(-1.0) and m["mismatch/weight_mean"] == 1.0


def test_the_entropy_bonus_is_the_step_mean_entropy_over_valid_or_kept_tokens():
    old = torch.full((2, 3), -1.0)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    keep = torch.tensor([[False, True, False], [True, False, False]])
    ent = torch.tensor([[0.5, 1.5, 9.0], [2.5, 9.0, 9.0]], requires_grad=True)
    adv = torch.zeros(2)  # no policy term: the loss is the bonus alone
    loss, m = policy_loss(old, old, adv, valid, keep, A(entropy_coef=0.1), entropy=ent)
    loss.backward()
    # valid entropies 0.5, 1.5, 2.5: mean 1.5; loss -0.1 x 1.5; gradient -0.1 / 3 on each valid token
    assert float(loss) == pytest.approx(-0.15) and m["actor/entropy_bonus"] == pytest.approx(1.5)
    assert torch.allclose(ent.grad, torch.tensor([[-0.1 / 3, -0.1 / 3, 0.0], [-0.1 / 3, 0.0, 0.0]]))
    # on the kept tokens only: mean of 1.5 and 2.5 = 2.0; split into micro-batches with the step's kept
    # count, the parts add up to the whole
    algo = A(entropy_coef=0.1, entropy_bonus_tokens="kept")
    whole, _ = policy_loss(old, old, adv, valid, keep, algo, entropy=ent.detach())
    rows = [slice(0, 1), slice(1, 2)]
    parts = [policy_loss(old[r], old[r], adv[r], valid[r], keep[r], algo, entropy=ent.detach()[r], num_kept_step=2,
                         normalizer=2.0)[0] for r in rows]  # fmt: skip
    assert float(whole) == pytest.approx(-0.2) and float(sum(parts)) == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="entropy_coef > 0 needs the entropy"):
        policy_loss(old, old, adv, valid, keep, A(entropy_coef=0.1))


def test_the_entropy_with_gradient_matches_the_fused_entropy_and_its_derivative():
    z = torch.tensor([[1.0, 2.0, 0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    h = token_entropy_with_grad(z, temperature=0.7)
    assert float(h) == pytest.approx(ref.entropy_row(z[0].tolist(), 0.7), abs=1e-9)
    assert float(h) == pytest.approx(float(token_entropy(z.detach().float(), 0.7)), abs=1e-5)
    h.sum().backward()
    # dH/dz_j = -p_j (log p_j + H) / T
    p = torch.softmax(z.detach() / 0.7, -1)
    expected = -p * (p.log() + float(h)) / 0.7
    assert torch.allclose(z.grad, expected, atol=1e-12)


@pytest.mark.parametrize(
    "seed,method,level,mode",
    list(itertools.product(range(3), ["ppo_clip", "gspo", "cispo"], ["token", "sequence"], ["truncate", "mask"])),
)
def test_each_method_matches_the_float64_loops(seed, method, level, mode):
    g = torch.Generator().manual_seed(seed)
    b, t = 4, 6
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logp = old + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3
    rollout = old + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    valid = torch.arange(t)[None, :] < torch.randint(0, t + 1, (b,), generator=g)[:, None]
    keep = high_entropy_mask(torch.rand(b, t, generator=g), valid, 0.5)
    algo = A(policy_loss=method, mismatch_level=level, mismatch_mode=mode, tis_cap=1.3, cispo_max_weight=1.5)
    loss, _ = policy_loss(logp, old, adv, valid, keep, algo, rollout_logprobs=rollout)
    expected = ref.method_loss(logp.tolist(), old.tolist(), adv.tolist(), valid.tolist(), keep.tolist(),
                               rollout.tolist(), method, 0.2, 0.28, 1.5, 1.3, level, mode)  # fmt: skip
    assert float(loss) == pytest.approx(expected, abs=1e-12)


def test_lr_scale_inverse_rho_divides_the_learning_rate_by_rho():
    learner = LearnerConfig(lr=1e-6, warmup_steps=0)
    assert learning_rate(learner, A(top_entropy_quantile=0.2)) == 1e-6
    assert learning_rate(learner, A(top_entropy_quantile=0.2, lr_scale="inverse_rho")) == pytest.approx(5e-6)
    ds = deepspeed_config(learner, "float32", A(top_entropy_quantile=0.25, lr_scale="inverse_rho"))
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(4e-6)
    assert ds["scheduler"]["params"]["warmup_max_lr"] == pytest.approx(4e-6)


def test_adam_divides_out_a_constant_loss_scale_which_is_why_lr_scale_changes_the_learning_rate():
    """Why lr_scale scales the learning rate and not the loss: AdamW's step is the same for L and 5 L
    (up to its eps), so a loss normalised by the kept tokens instead of all of them changes nothing
    unless the gradient clip bites."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    steps = []
    for scale in (1.0, 5.0):
        model = torch.nn.Linear(4, 1)
        torch.nn.init.constant_(model.weight, 0.1)
        torch.nn.init.zeros_(model.bias)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-12)
        for _ in range(5):
            opt.zero_grad()
            (scale * ((model(x) - y) ** 2).mean()).backward()
            opt.step()
        steps.append(model.weight.detach().clone())
    assert torch.allclose(steps[0], steps[1], atol=1e-6)


def test_methods_that_do_not_compose_are_refused_naming_the_fields():
    with pytest.raises(ValueError, match=r"algorithm.dual_clip_c=3.0 .* algorithm.policy_loss='gspo' accepted is null"):
        JobConfig.model_validate({"algorithm": {"policy_loss": "gspo", "dual_clip_c": 3.0}})
    with pytest.raises(ValueError, match=r"lr_scale=inverse_rho with learner.lr=0.5 .* trains at 2.5"):
        JobConfig.model_validate(
            {"learner": {"lr": 0.5}, "algorithm": {"top_entropy_quantile": 0.2, "lr_scale": "inverse_rho"}}
        )
    with pytest.raises(ValueError, match="policy_loss"):
        JobConfig.model_validate({"algorithm": {"policy_loss": "grpo"}})
    assert (
        JobConfig.model_validate({"algorithm": {"policy_loss": "cispo", "entropy_coef": 0.01}}).algorithm.lr_scale
        == "none"
    )


# -- Clip-Cov and KL-Cov (arXiv 2505.22617): the covariance selection, taken over the whole step --------


def _cov_step():
    """Two sequences: A = +1 with log-probs -1, -3; A = -1 with log-prob -2 (and a padding position).
    Means over the 3 tokens: A 1/3, logp -2; cov = (A - 1/3)(logp + 2) = 2/3, -2/3, 0."""
    lp = torch.tensor([[-1.0, -3.0], [-2.0, 0.0]], dtype=torch.float64)
    valid = torch.tensor([[True, True], [True, False]])
    return lp, torch.tensor([1.0, -1.0], dtype=torch.float64), valid


def test_the_covariance_of_log_prob_and_advantage_is_taken_over_the_steps_tokens():
    lp, adv, valid = _cov_step()
    cov = plan_covariance([lp], [lp], [adv], [valid], A(policy_loss="kl_cov", kl_cov_ratio=0.5), seed=0)
    # k = max(1, floor(0.5 x 3)) = 1: the largest covariance, 2/3 at (0, 0)
    assert cov.masks[0].tolist() == [[True, False], [False, False]]
    assert cov.stats["cov/mean"] == pytest.approx(0.0) and cov.stats["cov/max"] == pytest.approx(2 / 3)
    assert cov.stats["cov/p01"] == pytest.approx(-2 / 3) and cov.stats["cov/p50"] == pytest.approx(0.0)
    assert cov.stats["cov/selected_frac"] == pytest.approx(1 / 3)
    # k = floor(0.7 x 3) = 2: 2/3, then 0 (above -2/3)
    two = plan_covariance([lp], [lp], [adv], [valid], A(policy_loss="kl_cov", kl_cov_ratio=0.7), seed=0)
    assert two.masks[0].tolist() == [[True, False], [True, False]]
    # with the filter keeping two tokens, the means are over those: A 0, logp -1.5; cov 0.5 and 0.5, a
    # tie: the earlier token in the step's order is taken
    keep = torch.tensor([[True, False], [True, False]])
    tied = plan_covariance([lp], [lp], [adv], [keep], A(policy_loss="kl_cov", kl_cov_ratio=0.5), seed=0)
    assert tied.masks[0].tolist() == [[True, False], [False, False]]


def test_clip_cov_draws_among_the_tokens_between_its_bounds_that_ppo_does_not_clip():
    cov = torch.tensor([0.5, 2.0, 3.0, 4.0, 6.0, 1.5, 2.5, 0.9, 4.5, 1.2])
    clipped = torch.zeros(10, dtype=torch.bool)
    clipped[3] = True  # 4.0 is a candidate by value, but PPO already clips it
    algo = A(policy_loss="clip_cov", clip_cov_ratio=0.25, clip_cov_lb=1.0, clip_cov_ub=5.0)
    candidates = {1, 2, 5, 6, 8, 9}
    draws = [set(torch.nonzero(select_covariance(cov, clipped, algo, seed)).reshape(-1).tolist()) for seed in range(8)]
    assert all(len(d) == 2 and d <= candidates for d in draws)  # floor(0.25 x 10) = 2 of the candidates
    assert len({frozenset(d) for d in draws}) > 1  # a draw, not a rule
    assert draws[0] == set(torch.nonzero(select_covariance(cov, clipped, algo, 0)).reshape(-1).tolist())  # seeded
    # a ratio that rounds to nothing still acts on one token (the paper's max(1, ...))
    one = select_covariance(cov, clipped, A(policy_loss="clip_cov", clip_cov_ratio=1e-4), 0)
    assert int(one.sum()) == 1 and int(torch.nonzero(one)) in candidates
    assert not select_covariance(cov, clipped, A(), 0).any()  # other methods: nothing


def test_clip_cov_detaches_its_tokens_and_kl_cov_penalises_them():
    old = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    chosen = torch.tensor([[True, False]])
    diff = torch.tensor([[0.1, 0.1]], dtype=torch.float64)

    def run(method):
        logp = (old + diff).requires_grad_()
        algo = A(policy_loss=method, kl_cov_coef=2.0)
        loss, _ = policy_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), VALID2, None, algo,
                              cov_mask=chosen)  # fmt: skip
        loss.backward()
        return float(loss.detach()), logp.grad[0].tolist()

    r = math.exp(0.1)
    # Clip-Cov: the chosen token contributes nothing and gets no gradient; the other is PPO's -A r / 2
    loss, grad = run("clip_cov")
    assert loss == pytest.approx(-r / 2) and grad == pytest.approx([0.0, -r / 2])
    # KL-Cov: no clip; the chosen token's term is -A r + 2 |0.1|, its gradient (-r + 2) / 2
    loss, grad = run("kl_cov")
    assert loss == pytest.approx((-r + 0.2 - r) / 2) and grad == pytest.approx([(-r + 2.0) / 2, -r / 2])
    with pytest.raises(ValueError, match="needs the step's covariance selection"):
        policy_loss(old, old, torch.tensor([1.0]), VALID2, None, A(policy_loss="kl_cov"))
    with pytest.raises(ValueError, match=r"algorithm.clip_cov_lb=5.0 must be < algorithm.clip_cov_ub=1.0"):
        A(clip_cov_lb=5.0, clip_cov_ub=1.0)


def test_the_clipped_share_is_split_by_bound():
    # A = -1: a ratio of exp(-0.3) = 0.74 < 0.8 is clipped below; exp(0.1) is not clipped
    _, _, m = _grad(A(), [-0.3, 0.1], adv=-1.0)
    assert (m["actor/clipfrac"], m["actor/clipfrac_low"], m["actor/clipfrac_high"]) == (0.5, 0.5, 0.0)
    # CISPO: a weight at its cap counts above, whatever the advantage's sign
    _, _, m = _grad(A(policy_loss="cispo", cispo_max_weight=1.2), [0.5, 0.0], adv=-1.0)
    assert (m["actor/clipfrac"], m["actor/clipfrac_low"], m["actor/clipfrac_high"]) == (0.5, 0.0, 0.5)
