"""Edges of the algorithm core that mutation testing (make mutation) found unchecked: error
messages, the empty step, the selection dtype, metric names and values, the KL clamp. Worked
arithmetic in the comments, as in test_grpo_arithmetic.py."""

import math

import pytest
import torch

from actors.algo.loss import loss_normalizer, policy_loss
from actors.algo.selection import EntropyThreshold, entropy_threshold, high_entropy_mask, num_kept, selection_values
from actors.algo.stats import entropy_stats
from actors.common.config import AlgorithmConfig as A
from actors.learner.logits import token_logprobs_and_entropy


def test_refusals_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"num_valid=-1 must be >= 0"):
        num_kept(-1, 0.2)
    with pytest.raises(ValueError, match=r"^give exactly one of top_entropy_quantile and threshold$"):
        high_entropy_mask(torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match=r"loss_agg='mean' is not one of: token_mean, token_mean_selected"):
        loss_normalizer("mean", num_valid_tokens=1, num_selected_tokens=1, num_sequences=1, max_response_len=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"logits must have a vocabulary dimension, got shape \(\)"):
        token_logprobs_and_entropy(torch.tensor(1.0), torch.tensor(0))
    # temperature 0 is refused (it would divide by zero), as is a negative one
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"temperature={t!r} must be > 0"):
            token_logprobs_and_entropy(torch.zeros(1, 3), torch.tensor([0]), temperature=t)


def test_an_empty_step_keeps_nothing_and_says_so_in_every_field():
    assert entropy_threshold(torch.empty(0), 0.2) == EntropyThreshold(
        tau=math.inf, k=0, num_valid=0, num_above=0, ties_to_keep=0
    )


def test_selection_dtype_float64_stays_and_the_rest_become_float32():
    # 1 and 1 + 2^-40 differ in float64 and are equal in float32: a float64 step must not merge them
    h64 = torch.tensor([1.0, 1.0 + 2.0**-40], dtype=torch.float64)
    assert selection_values(h64).dtype == torch.float64
    assert entropy_threshold(h64, 0.5) == EntropyThreshold(tau=1.0 + 2.0**-40, k=1, num_valid=2, num_above=0,
                                                           ties_to_keep=1)  # fmt: skip
    assert selection_values(h64.to(torch.bfloat16)).dtype == torch.float32
    assert selection_values(h64.float()).dtype == torch.float32


def test_normalizers_with_a_single_token_or_sequence():
    # one valid token / one sequence: the mean divides by 1, not by a floor above 1
    kw = {"num_selected_tokens": 1, "max_response_len": 4}
    assert loss_normalizer("token_mean", num_valid_tokens=1, num_sequences=1, **kw) == 1.0
    assert loss_normalizer("seq_mean_token_mean", num_valid_tokens=1, num_sequences=1, **kw) == 1.0
    assert loss_normalizer("token_mean", num_valid_tokens=0, num_sequences=0, **kw) == 1.0  # nothing: no 0/0


def test_metric_names_and_per_kept_token_values():
    # 4 kept tokens of 5 valid (the last is dropped by the filter), A = +1, eps = 0.2 / 0.28
    # ratios e^[0.5, 0, -0.5, 0.1, 2]: 1.65 > 1.28 is clipped (pg2 > pg1 for A > 0 means r > 1 + eps_high),
    # 0.61 < 0.8 is not (for A > 0 the lower clip never binds): clipped 1 of 4 kept -> clipfrac 0.25
    lr = torch.tensor([[0.5, 0.0, -0.5, 0.1, 2.0]])
    old = torch.zeros(1, 5)
    valid = torch.ones(1, 5, dtype=torch.bool)
    keep = torch.tensor([[True, True, True, True, False]])
    _, m = policy_loss(lr, old, torch.tensor([1.0]), valid, keep, A())
    assert set(m) == {"actor/loss", "actor/clipfrac", "actor/dual_clipfrac", "actor/ratio_mean",
                      "actor/approx_kl_old", "actor/kl_ref", "actor/entropy_bonus", "mismatch/weight_mean",
                      "actor/clipfrac_high", "actor/clipfrac_low", "mismatch/limited_frac"}  # fmt: skip
    assert m["actor/clipfrac"] == pytest.approx(0.25)
    assert (m["actor/clipfrac_high"], m["actor/clipfrac_low"]) == (pytest.approx(0.25), 0.0)  # A > 0: the upper bound
    # ratio_mean over kept tokens only: (e^.5 + 1 + e^-.5 + e^.1) / 4; the dropped e^2 does not count
    assert m["actor/ratio_mean"] == pytest.approx((math.exp(0.5) + 1 + math.exp(-0.5) + math.exp(0.1)) / 4)
    # approx_kl_old = mean of -(logp - old) over kept tokens: -(0.5 + 0 - 0.5 + 0.1) / 4 = -0.025
    assert m["actor/approx_kl_old"] == pytest.approx(-0.025)
    # the loss: -sum(A * min(r, 1.28)) over kept / 4 (token_mean_selected) = -(1.28 + 1 + e^-.5 + e^.1) / 4
    assert m["actor/loss"] == pytest.approx(-(1.28 + 1 + math.exp(-0.5) + math.exp(0.1)) / 4)
    # as one micro-batch of a step that kept 8 tokens, the same counts are shares of 8: 1/8 clipped
    _, part = policy_loss(lr, old, torch.tensor([1.0]), valid, keep, A(), normalizer=8.0, num_kept_step=8)
    assert part["actor/clipfrac"] == pytest.approx(1 / 8)
    assert part["actor/approx_kl_old"] == pytest.approx(-0.1 / 8)
    # dual clip: A = -1, c = 3 caps pg at 3; r = e^2 on a kept token -> pg = 7.39 > 3: dual-clipped, 1 of 2
    keep2 = torch.tensor([[False, True, False, False, True]])
    _, d = policy_loss(lr, old, torch.tensor([-1.0]), valid, keep2, A(dual_clip_c=3.0))
    assert d["actor/dual_clipfrac"] == pytest.approx(0.5)


def test_kl_term_only_with_a_reference_and_a_positive_coefficient():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    valid = torch.ones(1, 2, dtype=torch.bool)
    ref = torch.tensor([[-1.5, -1.0]])
    # a reference with kl_coef 0: no KL term, and none reported
    loss0, m0 = policy_loss(lp, lp.detach(), torch.tensor([0.0]), valid, None, A(kl_coef=0.0), ref_logprobs=ref)
    assert m0["actor/kl_ref"] == 0.0 and float(loss0.detach()) == 0.0
    # no reference: no KL term whatever the coefficient
    _, m1 = policy_loss(lp, lp.detach(), torch.tensor([0.0]), valid, None, A(kl_coef=0.5))
    assert m1["actor/kl_ref"] == 0.0


def test_kl_log_ratio_is_clamped_to_plus_minus_20():
    # d = ref - logp = +25 and -25 are clamped to +20 and -20: k3 = e^d - d - 1 per token
    lp = torch.tensor([[-30.0, -1.0]])
    ref = torch.tensor([[-5.0, -26.0]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    _, m = policy_loss(lp, lp, torch.tensor([0.0]), valid, None, A(kl_coef=1.0), ref_logprobs=ref)
    k3 = ((math.exp(20.0) - 20.0 - 1.0) + (math.exp(-20.0) + 20.0 - 1.0)) / 2
    assert m["actor/kl_ref"] == pytest.approx(k3, rel=1e-6)
    # the lower clamp alone (the e^20 term above would hide it): d = -25 -> -20, k3 = e^-20 + 20 - 1 = 19
    low = torch.tensor([[-1.0]])
    _, m = policy_loss(low, low, torch.tensor([0.0]), valid[:, :1], None, A(kl_coef=1.0), ref_logprobs=low - 25.0)
    assert m["actor/kl_ref"] == pytest.approx(math.exp(-20.0) + 19.0, rel=1e-6)


def test_logged_threshold_is_the_steps_not_the_micro_batchs():
    # the step's threshold is 0.5 (kept elsewhere); this micro-batch's kept tokens are all above it
    h = torch.tensor([[0.9, 0.7, 0.1]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    kept = torch.tensor([[True, True, False]])
    step = EntropyThreshold(tau=0.5, k=3, num_valid=6, num_above=2, ties_to_keep=1)
    stats = entropy_stats(h, valid, kept, step)
    assert stats["entropy/threshold"] == 0.5
    assert stats["entropy/frac_below_threshold"] == pytest.approx(1 / 3)  # only 0.1 < 0.5


def test_triton_on_cpu_only_when_both_switches_are_set_and_never_when_disabled(monkeypatch):
    from actors.learner.logits import _use_triton

    cpu = torch.zeros(1, 2)
    for name in ("FORKRL_DISABLE_TRITON", "TRITON_INTERPRET", "FORKRL_TRITON_ON_CPU"):
        monkeypatch.delenv(name, raising=False)
    assert not _use_triton(cpu)  # a CPU tensor: the chunked torch path
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _use_triton(cpu)  # the interpreter alone does not route CPU work through it
    monkeypatch.setenv("FORKRL_TRITON_ON_CPU", "1")
    assert _use_triton(cpu)  # both: the kernels run in Triton's interpreter (tests/unit/test_triton_kernel.py)
    monkeypatch.setenv("FORKRL_DISABLE_TRITON", "1")
    assert not _use_triton(cpu)


def test_plan_step_refuses_micro_batches_without_their_masks():
    from actors.algo.entropy_filter import plan_step

    h = [torch.ones(1, 2), torch.ones(1, 2)]
    with pytest.raises(ValueError, match="zip"):
        plan_step(h, [torch.ones(1, 2, dtype=torch.bool)], 0.5)


def test_the_chunked_path_computes_in_float32_whatever_the_default_dtype():
    # buffers and outputs are float32 by contract: a float64 default must change neither dtype nor a bit
    from actors.learner.logits import _forward_chunked

    g = torch.Generator().manual_seed(1)
    z, ids = torch.randn(6, 11, generator=g), torch.randint(0, 11, (6,), generator=g)
    lp32, h32 = token_logprobs_and_entropy(z, ids, temperature=0.7, chunk_size=4)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        lp, h = token_logprobs_and_entropy(z, ids, temperature=0.7, chunk_size=4)
        lse, ent, logp = _forward_chunked(z, None, 0.7, 4)
    finally:
        torch.set_default_dtype(old)
    assert lp.dtype == h.dtype == lse.dtype == ent.dtype == torch.float32
    assert torch.equal(lp, lp32) and torch.equal(h, h32) and torch.equal(ent, h32)
    assert logp is None  # entropy only: no log-prob buffer
