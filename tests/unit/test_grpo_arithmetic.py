"""Worked arithmetic: every expected value is derived in the comment beside it."""

import math

import pytest
import torch

from actors.algo.advantages import group_advantages
from actors.algo.loss import policy_loss
from actors.algo.selection import entropy_threshold, high_entropy_mask, kth_largest, num_kept
from actors.algo.stats import entropy_stats
from actors.common.config import AlgorithmConfig as A
from actors.learner.logits import token_entropy, token_logprobs


def test_entropy_of_uniform_and_one_hot():
    # uniform over 4 -> H = log 4; a near one-hot (logit gap 100) -> H ~ 0
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    h = token_entropy(z)
    assert h[0].item() == pytest.approx(math.log(4), abs=1e-6)
    assert h[1].item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_uses_temperature():
    # z = [log 1, log 3] -> at T = 1, p = [1/4, 3/4], H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335
    # at T = 2, x = z/2 = [0, ln sqrt 3] -> p = [1/(1+sqrt3), sqrt3/(1+sqrt3)] = [0.366025, 0.633975]
    # H = -(0.366025 ln 0.366025 + 0.633975 ln 0.633975) = 0.656807
    z = torch.tensor([0.0, math.log(3.0)])
    assert token_entropy(z).item() == pytest.approx(0.562335, abs=1e-6)
    assert token_entropy(z, temperature=2.0).item() == pytest.approx(0.656807, abs=1e-6)


def test_logprob_with_temperature():
    # z = [0, ln 3], token 1, T = 1: log 3/4 = -0.287682
    z = torch.tensor([[0.0, math.log(3.0)]])
    assert token_logprobs(z, torch.tensor([1])).item() == pytest.approx(math.log(0.75), abs=1e-6)


def test_k_is_ceil_in_decimal():
    # ceil(0.2 * 10) = 2; ceil(0.7 * 10) = 7 (binary 0.7 * 10 = 7.000000000000001 would give 8)
    assert num_kept(10, 0.2) == 2
    assert num_kept(10, 0.7) == 7
    assert num_kept(11, 0.2) == 3  # 2.2 -> 3
    assert num_kept(100, 0.07) == 7  # binary 0.07 * 100 = 7.000000000000001 would give 8
    assert num_kept(1, 0.05) == 1  # 0.05 -> 1: one token always keeps itself
    assert num_kept(0, 0.2) == 0
    with pytest.raises(ValueError, match="top_entropy_quantile=0"):
        num_kept(5, 0.0)
    with pytest.raises(ValueError, match="1.5"):
        num_kept(5, 1.5)


def test_threshold_and_mask_with_padding_and_ties():
    # valid entropies, row-major: [0.9, 0.5, 0.5 | 0.5, 0.1]; the 7.0 is padding and must not count
    # N = 5, rho = 0.4 -> k = 2: 0.9 is above; tau = 0.5 with 3 ties, keep 1 -> the first in order
    h = torch.tensor([[0.9, 0.5, 0.5], [0.5, 0.1, 7.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    th = entropy_threshold(h[valid], 0.4)
    assert (th.tau, th.k, th.num_above, th.ties_to_keep) == (0.5, 2, 1, 1)
    mask = high_entropy_mask(h, valid, 0.4)
    assert mask.tolist() == [[True, True, False], [False, False, False]]
    # a later micro-batch that sees one earlier tie keeps none of its ties
    later = high_entropy_mask(h, valid, threshold=th, tie_offset=1)
    assert later.tolist() == [[True, False, False], [False, False, False]]


def test_kth_largest_topk_and_kthvalue_agree_with_ties():
    # values 5, 1, 3, 3, 3, 2: sorted descending 5 3 3 3 2 1 -> 1st 5, 2nd..4th 3, 5th 2, 6th 1
    v = torch.tensor([5.0, 1.0, 3.0, 3.0, 3.0, 2.0])
    for method in ("topk", "kthvalue"):
        assert [kth_largest(v, k, method) for k in range(1, 7)] == [5.0, 3.0, 3.0, 3.0, 2.0, 1.0]
    r = torch.rand(100_003, generator=torch.Generator().manual_seed(1))
    k = 20_001
    assert kth_largest(r, k, "topk") == kth_largest(r, k, "kthvalue") == float(r.sort(descending=True).values[k - 1])
    with pytest.raises(ValueError, match="k=0"):
        kth_largest(v, 0)
    with pytest.raises(ValueError, match="method='median'"):
        kth_largest(v, 1, "median")


def test_rho_one_keeps_every_valid_token_and_nothing_valid_keeps_nothing():
    h = torch.tensor([[0.3, 0.3, 0.0]])
    valid = torch.tensor([[True, True, False]])
    assert high_entropy_mask(h, valid, 1.0).tolist() == [[True, True, False]]
    none = torch.zeros_like(valid)
    assert not high_entropy_mask(h, none, 0.2).any()
    assert entropy_threshold(torch.empty(0), 0.2).tau == math.inf


def test_group_advantages_grpo_drgrpo_dynamic_sampling():
    # group 1 rewards [1, 0, 0, 1]: mean 0.5, unbiased std = sqrt(4 * 0.25 / 3) = 0.57735
    # -> A = +-0.5 / 0.57735 = +-0.866025; group 2 [1, 1, 1, 1]: constant -> 0 and dropped
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv, keep = group_advantages(r, 4, drop_zero_variance=True, eps=0.0)
    assert adv[:4].tolist() == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-5)
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert keep.tolist() == [True] * 4 + [False] * 4
    adv_dr, keep_dr = group_advantages(r, 4, estimator="drgrpo")
    assert adv_dr[:4].tolist() == [0.5, -0.5, -0.5, 0.5]  # mean only
    assert keep_dr.all()
    with pytest.raises(ValueError, match="group_size=3"):
        group_advantages(r, 3)


def test_clip_higher_positive_advantage():
    # A = +1, logp - old = 1 -> ratio = e = 2.718, clipped to 1 + 0.28 = 1.28
    # pg = max(-e, -1.28) = -1.28, one kept token -> loss = -1.28, clipfrac = 1
    lp = torch.tensor([[1.0]], requires_grad=True)
    loss, m = policy_loss(lp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool))
    assert loss.item() == pytest.approx(-1.28)
    assert m["actor/clipfrac"] == 1.0
    loss.backward()
    assert lp.grad.item() == 0.0  # clipped: no gradient


def test_ratio_inside_the_range_is_not_clipped():
    # A = +1, logp - old = 0.1 -> ratio = e^0.1 = 1.105171 inside [0.8, 1.28]: both terms equal -1.105171,
    # the loss is -1.105171 and nothing counts as clipped; ratio exactly 1 likewise
    lp = torch.tensor([[0.1, 0.0]], requires_grad=True)
    loss, m = policy_loss(lp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool))
    assert loss.item() == pytest.approx(-(math.exp(0.1) + 1.0) / 2, abs=1e-6)
    assert m["actor/clipfrac"] == 0.0 and m["actor/dual_clipfrac"] == 0.0
    assert m["actor/ratio_mean"] == pytest.approx((math.exp(0.1) + 1.0) / 2, abs=1e-6)


def test_token_sum_norm_counts_only_sequences_with_tokens():
    # Dr.GRPO: sum over kept / (sequences x max_response_len); rows: one real sequence of 2 tokens (A = 1,
    # ratio 1 -> terms -1, -1) and one all-padding row -> -2 / (1 x 4) = -0.5, not -2 / (2 x 4)
    lp = torch.zeros(2, 2)
    valid = torch.tensor([[True, True], [False, False]])
    loss, _ = policy_loss(lp, lp, torch.tensor([1.0, 1.0]), valid, None, A(loss_agg="token_sum_norm"),
                          max_response_len=4)  # fmt: skip
    assert loss.item() == pytest.approx(-0.5)


def test_clip_low_negative_advantage_and_dual_clip():
    # A = -1, ratio = e^-1 = 0.3679 < 1 - 0.2 -> pg = max(0.3679, 0.8) = 0.8 (clipped)
    lp = torch.tensor([[-1.0]])
    loss, _ = policy_loss(lp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.8)
    # A = -1, ratio = e^2 = 7.389 -> pg = max(7.389, 1.28) = 7.389; dual clip c = 3 caps it at 3
    lp = torch.tensor([[2.0]])
    loss, m = policy_loss(
        lp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1, dtype=torch.bool), algo=A(dual_clip_c=3.0)
    )
    assert loss.item() == pytest.approx(3.0)
    assert m["actor/dual_clipfrac"] == 1.0


def test_entropy_mask_and_aggregation_modes():
    # two sequences, T = 2, all valid, ratio = 1 everywhere (logp = old): pg = -A per token
    # A = [2, -1]; kept = [[1, 0], [1, 1]] -> kept terms: -2, +1, +1 (sum 0); dropped term: -2
    lp = torch.zeros(2, 2)
    valid = torch.ones(2, 2, dtype=torch.bool)
    kept = torch.tensor([[True, False], [True, True]])
    adv = torch.tensor([2.0, -1.0])

    def loss(mode):
        return policy_loss(lp, lp, adv, valid, kept, A(loss_agg=mode))[0].item()

    assert loss("token_mean_selected") == pytest.approx(0.0 / 3)  # sum 0 over 3 kept
    assert loss("token_mean") == pytest.approx(0.0 / 4)
    # seq mean: seq 1 -> -2 / 1 kept; seq 2 -> (1 + 1) / 2 = 1; mean over 2 sequences = -0.5
    assert loss("seq_mean_token_mean") == pytest.approx(-0.5)
    # Dr.GRPO: sum over kept (0) / (2 sequences * 2 max len)
    assert loss("token_sum_norm") == pytest.approx(0.0)
    # change A so the sums differ: A = [1, 1] -> kept sum = -3; token_mean_selected = -1, token_mean = -0.75
    adv = torch.tensor([1.0, 1.0])
    assert policy_loss(lp, lp, adv, valid, kept)[0].item() == pytest.approx(-1.0)
    assert policy_loss(lp, lp, adv, valid, kept, A(loss_agg="token_mean"))[0].item() == pytest.approx(-0.75)
    assert policy_loss(lp, lp, adv, valid, kept, A(loss_agg="token_sum_norm"))[0].item() == pytest.approx(-0.75)


def test_kl_k3_masked_or_not():
    # logp = 0, ref = ln 2 -> d = ln 2, k3 = e^d - d - 1 = 2 - 0.693147 - 1 = 0.306853
    # one kept, one dropped token, A = 0 (no pg), kl_coef = 0.5; the KL is a mean over the tokens it
    # applies to: all 2 valid ones, or with mask_kl_by_entropy the 1 kept one
    lp = torch.zeros(1, 2)
    ref = torch.full((1, 2), math.log(2.0))
    valid = torch.ones(1, 2, dtype=torch.bool)
    kept = torch.tensor([[True, False]])
    unmasked, _ = policy_loss(
        lp, lp, torch.zeros(1), valid, kept, A(kl_coef=0.5, loss_agg="token_mean"), ref_logprobs=ref
    )
    masked, _ = policy_loss(
        lp,
        lp,
        torch.zeros(1),
        valid,
        kept,
        A(kl_coef=0.5, loss_agg="token_mean", mask_kl_by_entropy=True),
        ref_logprobs=ref,
    )
    assert unmasked.item() == pytest.approx(0.5 * 2 * 0.306853 / 2, abs=1e-6)
    assert masked.item() == pytest.approx(0.5 * 1 * 0.306853 / 1, abs=1e-6)


def test_truncated_importance_weight():
    # old - rollout = ln 4 -> weight 4, capped at 2; A = 1, ratio 1 -> pg = -1 * 2 = -2
    lp = torch.zeros(1, 1)
    loss, _ = policy_loss(
        lp,
        lp,
        torch.tensor([1.0]),
        torch.ones(1, 1, dtype=torch.bool),
        algo=A(tis_cap=2.0),
        rollout_logprobs=torch.full((1, 1), -math.log(4.0)),
    )
    assert loss.item() == pytest.approx(-2.0)


def test_entropy_stats_names_and_values():
    # valid entropies 0.0, 0.005, 0.5, 1.0, 2.0 (one padded 9.0 ignored); rho = 0.4 -> k = 2, tau = 1.0
    h = torch.tensor([[0.0, 0.005, 0.5, 1.0, 2.0, 9.0]])
    valid = torch.tensor([[True] * 5 + [False]])
    ids = torch.tensor([[5, 6, 7, 8, 8, 9]])
    th = entropy_threshold(h[valid], 0.4)
    kept = high_entropy_mask(h, valid, threshold=th)
    s = entropy_stats(h, valid, kept, th, ids)
    assert s["entropy/mean"] == pytest.approx(3.505 / 5)
    assert s["entropy/p50"] == pytest.approx(0.5)
    assert s["entropy/p80"] == pytest.approx(1.0 + 0.2 * (2.0 - 1.0))  # pos 3.2 between 1.0 and 2.0
    assert s["entropy/threshold"] == 1.0
    assert s["entropy/kept_frac"] == pytest.approx(0.4)
    assert s["entropy/kept_mean"] == pytest.approx(1.5)
    assert s["entropy/dropped_mean"] == pytest.approx(0.505 / 3)
    assert s["entropy/frac_below_0.01"] == pytest.approx(0.4)
    assert s["entropy/frac_below_threshold"] == pytest.approx(0.6)
    assert s["entropy/top_forking_tokens"] == [[8, 2]]
    assert s["entropy/forking_tokens_dropped"] == [[8, 0]]  # both 8s were kept


def test_forking_tokens_count_their_drops():
    # ids 4, 4, 5, 4, 5 with entropies 0.1, 0.9, 0.2, 0.8, 0.3; rho 0.4 -> k = 2: keeps 0.9 and 0.8 (both 4)
    # dropped: 0.1 (a 4), 0.2 and 0.3 (5s) -> token 4 kept twice, dropped once; 5 never kept
    h = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.3]])
    valid = torch.ones_like(h, dtype=torch.bool)
    th = entropy_threshold(h[valid], 0.4)
    s = entropy_stats(h, valid, high_entropy_mask(h, valid, threshold=th), th, torch.tensor([[4, 4, 5, 4, 5]]))
    assert s["entropy/top_forking_tokens"] == [[4, 2]]
    assert s["entropy/forking_tokens_dropped"] == [[4, 1]]


def test_overlong_penalty():
    # max 64, buffer 16: free up to 48; 56 -> -(8/16) = -0.5; 64 -> -1.0 (times penalty 1)
    from actors.algo.advantages import overlong_penalty

    got = overlong_penalty(torch.tensor([10, 48, 56, 64]), 64, 16)
    assert got.tolist() == [0.0, 0.0, -0.5, -1.0]
    assert overlong_penalty(torch.tensor([64]), 64, 0).tolist() == [0.0]


def test_group_advantages_edge_cases():
    # G = 1: every group is constant -> advantage 0, nothing kept under dynamic sampling
    adv, keep = group_advantages(torch.tensor([1.0, 0.0]), 1, drop_zero_variance=True)
    assert adv.tolist() == [0.0, 0.0] and keep.tolist() == [False, False] and keep.dtype == torch.bool
    _, keep_all = group_advantages(torch.tensor([1.0, 0.0]), 2)
    assert keep_all.dtype == torch.bool and keep_all.tolist() == [True, True]
    # eps matters at tiny spreads: r = [0, 2e-6]: centred +-1e-6, std (unbiased) = 1.414214e-6
    # adv = +-1e-6 / (1.414214e-6 + 1e-6) = +-0.414214 (minus eps would give +-2.414214)
    adv, _ = group_advantages(torch.tensor([0.0, 2e-6], dtype=torch.float64), 2)
    assert adv.tolist() == pytest.approx([-0.414214, 0.414214], abs=1e-4)
    with pytest.raises(ValueError, match="estimator='ppo' is not one of"):
        group_advantages(torch.tensor([1.0, 0.0]), 2, estimator="ppo")  # type: ignore[arg-type]


def test_groups_with_signal_of_one():
    from actors.algo.advantages import groups_with_signal

    assert groups_with_signal(torch.tensor([1.0, 0.0]), 1).tolist() == [False, False]  # one answer: no spread


def test_merge_keeps_as_many_forking_tokens_as_the_longest_list():
    from actors.algo.metrics import merge_step_metrics

    # counts 5:2, 7:1+3 = 4, 9:1 -> the 2 most common, as each step logged 2
    m = merge_step_metrics(
        [{"entropy/top_forking_tokens": [[5, 2], [7, 1]]}, {"entropy/top_forking_tokens": [[7, 3], [9, 1]]}]
    )
    assert m["entropy/top_forking_tokens"] == [[7, 4], [5, 2]]
    assert "entropy/forking_tokens_dropped" not in m
    # drops follow the merged top tokens, summed over the steps that logged them: 7: 0 + 2, 5: 1
    m = merge_step_metrics(
        [
            {"entropy/top_forking_tokens": [[5, 2], [7, 1]], "entropy/forking_tokens_dropped": [[5, 1], [7, 0]]},
            {"entropy/top_forking_tokens": [[7, 3], [9, 1]], "entropy/forking_tokens_dropped": [[7, 2], [9, 5]]},
        ]
    )
    assert m["entropy/top_forking_tokens"] == [[7, 4], [5, 2]]
    assert m["entropy/forking_tokens_dropped"] == [[7, 2], [5, 1]]


def test_overlong_penalty_edges():
    from actors.algo.advantages import overlong_penalty

    # buffer 1, max 4: free up to 3, length 4 -> -1.0; beyond the hard limit the penalty stays at -1
    assert overlong_penalty(torch.tensor([3, 4, 9]), 4, 1).tolist() == [0.0, -1.0, -1.0]
    assert overlong_penalty(torch.tensor([3, 4]), 4, 0).dtype == torch.float32


def test_token_logprobs_passes_the_chunk_size_on():
    from actors.learner.logits import token_logprobs

    with pytest.raises(ValueError, match="chunk_size=0"):
        token_logprobs(torch.zeros(2, 3), torch.tensor([0, 1]), chunk_size=0)


def test_entropy_stats_quantiles_one_token_and_the_forking_list():
    # ten values 0..9: p50 at position 4.5 -> 4.5; p80 at 7.2 -> 7.2; p99 at 8.91 -> 8.91 (numpy's linear rule)
    h = torch.arange(10.0)[None, :]
    valid = torch.ones(1, 10, dtype=torch.bool)
    s = entropy_stats(h, valid, valid, token_ids=torch.arange(10)[None, :] + 100)
    assert (s["entropy/p50"], s["entropy/p80"], s["entropy/p99"]) == pytest.approx((4.5, 7.2, 8.91))
    assert len(s["entropy/top_forking_tokens"]) == 10  # at most 20 forking tokens, here 10 distinct kept
    wide = entropy_stats(torch.arange(12.0)[None, :], torch.ones(1, 12, dtype=torch.bool),
                         torch.ones(1, 12, dtype=torch.bool), token_ids=torch.arange(12)[None, :])  # fmt: skip
    assert len(wide["entropy/top_forking_tokens"]) == 12
    many = entropy_stats(torch.arange(25.0)[None, :], torch.ones(1, 25, dtype=torch.bool),
                         torch.ones(1, 25, dtype=torch.bool), token_ids=torch.arange(25)[None, :])  # fmt: skip
    assert len(many["entropy/top_forking_tokens"]) == 20  # the paper's table shows 20
    one = entropy_stats(torch.tensor([[0.7]]), torch.tensor([[True]]), torch.tensor([[True]]))
    assert one["entropy/p50"] == one["entropy/p99"] == pytest.approx(0.7)  # a single token is every quantile


def test_entropy_stats_without_a_threshold_and_empty_sides():
    # every key is there; tau defaults to the smallest kept entropy (here 0.5: kept 0.5 and 2.0)
    h = torch.tensor([[0.01, 0.5, 2.0, 0.2]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    s = entropy_stats(h, valid, torch.tensor([[False, True, True, False]]))
    assert set(s) == {f"entropy/{k}" for k in ("num_valid", "mean", "p50", "p80", "p90", "p95", "p99", "threshold",
                      "kept_frac", "kept_mean", "dropped_mean", "frac_below_0.01", "frac_below_threshold")}  # fmt: skip
    assert s["entropy/threshold"] == 0.5 and s["entropy/num_valid"] == 4.0
    assert s["entropy/frac_below_0.01"] == 0.0  # 0.01 itself is not below 0.01
    everything = entropy_stats(h, valid, valid)
    assert everything["entropy/dropped_mean"] == 0.0 and everything["entropy/threshold"] == pytest.approx(0.01)
    nothing = entropy_stats(h, valid, torch.zeros(1, 4, dtype=torch.bool))
    assert nothing["entropy/kept_mean"] == 0.0 and nothing["entropy/threshold"] == math.inf
    assert nothing["entropy/frac_below_threshold"] == 1.0


def test_logits_path_defaults_checks_and_layouts():
    from actors.learner.logits import _rows_per_chunk, token_logprobs_and_entropy

    # default temperature is 1: z = [0, ln 3], token 1 -> log 3/4
    z = torch.tensor([[0.0, math.log(3.0)]])
    lp, _ = token_logprobs_and_entropy(z, torch.tensor([1]))
    assert lp.item() == pytest.approx(math.log(0.75), abs=1e-6)
    with pytest.raises(ValueError, match=r"token_ids shape \(3,\) must equal logits.shape\[:-1\] = \(1,\)"):
        token_logprobs_and_entropy(z, torch.tensor([0, 1, 1]))
    # chunks of one row are allowed; the default chunk is 2^19 fp32 elements, at least one row
    one_row, _ = token_logprobs_and_entropy(z, torch.tensor([1]), chunk_size=1)
    assert torch.equal(one_row, lp)
    assert _rows_per_chunk(1, None) == 1 << 19 and _rows_per_chunk(1 << 20, None) == 1
    # a strided (non-contiguous) view gives the numbers of its contiguous copy
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(5, 2 * 7, generator=g)[:, ::2]  # [5, 7], stride 2 along the vocabulary
    ids = torch.randint(0, 7, (5,), generator=g)
    assert wide.stride(-1) == 2
    a, b = token_logprobs_and_entropy(wide, ids), token_logprobs_and_entropy(wide.contiguous(), ids)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # every buffer follows the logits' device: on "meta" nothing may land on the CPU
    lp_meta, h_meta = token_logprobs_and_entropy(torch.empty(4, 8, device="meta"), torch.zeros(4, dtype=torch.long))
    assert lp_meta.device.type == h_meta.device.type == "meta"


def test_kl_with_a_moving_policy_and_the_step_kept_count():
    # logp = ln 0.5, ref = 0 -> d = ref - logp = ln 2, k3 = 2 - ln 2 - 1 = 0.306853 (d = ref + logp would give
    # k3 = 0.5 + ln 2 - 1 = 0.193147); A = 0, kl_coef 0.5, two valid tokens -> loss 0.5 x 0.306853
    lp = torch.full((1, 2), math.log(0.5))
    valid = torch.ones(1, 2, dtype=torch.bool)
    loss, m = policy_loss(lp, lp, torch.zeros(1), valid, None, A(kl_coef=0.5), ref_logprobs=torch.zeros(1, 2))
    assert loss.item() == pytest.approx(0.5 * 0.306853, abs=1e-6) and m["actor/kl_ref"] == pytest.approx(0.306853)
    # mask_kl_by_entropy with the step's kept count: this micro-batch keeps 1 of the step's 4 kept tokens
    kept = torch.tensor([[True, False]])
    loss, _ = policy_loss(lp, lp, torch.zeros(1), valid, kept, A(kl_coef=0.5, mask_kl_by_entropy=True),
                          num_kept_step=4, ref_logprobs=torch.zeros(1, 2))  # fmt: skip
    assert loss.item() == pytest.approx(0.5 * 0.306853 / 4, abs=1e-6)


def test_log_ratio_is_clamped_at_plus_minus_20():
    # A = -1, logp - old = 30: ratio = e^20 (clamped), pg = max(e^20, 1.28) = e^20 = 4.85165e8
    valid = torch.ones(1, 1, dtype=torch.bool)
    loss, _ = policy_loss(torch.tensor([[30.0]]), torch.zeros(1, 1), torch.tensor([-1.0]), valid)
    assert loss.item() == pytest.approx(math.exp(20), rel=1e-6)
    # A = +1, logp - old = -30: ratio = e^-20 below 0.8 -> pg = max(-e^-20, -0.8) = -e^-20 = -2.06115e-9
    loss, _ = policy_loss(torch.tensor([[-30.0]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64),
                          torch.tensor([1.0]), valid)  # fmt: skip
    assert loss.item() == pytest.approx(-math.exp(-20), rel=1e-6)


def test_dual_clip_only_for_negative_advantages_and_strictly_above_c():
    valid = torch.ones(1, 1, dtype=torch.bool)
    # A = +0.5, ratio = e^2: clipped at 1.28 -> pg = -0.64; dual clip does not apply to A > 0
    loss, m = policy_loss(
        torch.tensor([[2.0]]), torch.zeros(1, 1), torch.tensor([0.5]), valid, None, A(dual_clip_c=3.0)
    )
    assert loss.item() == pytest.approx(-0.64) and m["actor/dual_clipfrac"] == 0.0
    # A = -1, ratio exactly 2 = c (exp(ln 2) is exactly 2.0 in float64): pg = max(2, 1.28) = 2, not above
    # -A c = 2 -> not dual-clipped
    loss, m = policy_loss(torch.tensor([[math.log(2.0)]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64),
                          torch.tensor([-1.0]), valid, None, A(dual_clip_c=2.0))  # fmt: skip
    assert loss.item() == 2.0 and m["actor/dual_clipfrac"] == 0.0
    # a dropped token is never counted as dual-clipped: A = -1, ratio e^2 on a kept and a dropped token
    two = torch.ones(1, 2, dtype=torch.bool)
    _, m = policy_loss(torch.full((1, 2), 2.0), torch.zeros(1, 2), torch.tensor([-1.0]), two,
                       torch.tensor([[True, False]]), A(dual_clip_c=3.0))  # fmt: skip
    assert m["actor/dual_clipfrac"] == 1.0  # 1 of the 1 kept token


def test_truncated_importance_weight_below_one_and_its_clamp():
    # old - rollout = ln 0.5 -> weight 0.5 (under the cap 2); A = 1, ratio 1 -> pg = -0.5
    lp, valid = torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool)
    loss, _ = policy_loss(lp, lp, torch.tensor([1.0]), valid, None, A(tis_cap=2.0),
                          rollout_logprobs=torch.full((1, 1), math.log(2.0)))  # fmt: skip
    assert loss.item() == pytest.approx(-0.5)
    # old - rollout = -30 -> weight e^-20 (clamped): pg = -e^-20
    lp64 = torch.zeros(1, 1, dtype=torch.float64)
    loss, _ = policy_loss(lp64, lp64, torch.tensor([1.0]), valid, None, A(tis_cap=2.0),
                          rollout_logprobs=torch.full((1, 1), 30.0, dtype=torch.float64))  # fmt: skip
    assert loss.item() == pytest.approx(-math.exp(-20), rel=1e-6)
