"""algorithm.token_selection: the same exact top-k over other keys - the lowest entropies (the paper's
negative control) or a seeded uniform draw of the same size (the random control)."""

import pytest
import torch

from actors.algo.entropy_filter import plan_step
from actors.common.config_load import ConfigError, validate_config

# one micro-batch, 5 valid tokens and a padded one; rho = 0.4 -> k = ceil(0.4 * 5) = 2
ENT = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7, 0.05]])
VALID = torch.tensor([[True, True, True, True, True, False]])


def _kept(selection: str, seed: int = 0, rho: float = 0.4) -> list[bool]:
    return plan_step([ENT], [VALID], rho, selection=selection, seed=seed).masks[0][0].tolist()


def test_highest_keeps_the_two_largest_entropies_and_lowest_the_two_smallest():
    assert _kept("highest") == [False, False, True, False, True, False]  # 0.9 and 0.7
    assert _kept("lowest") == [False, True, False, True, False, False]  # 0.1 and 0.3; padding 0.05 never


def test_random_keeps_exactly_k_tokens_drawn_in_step_order_from_the_seed():
    for seed in range(20):
        draws = torch.rand(5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
        top2 = set(torch.topk(draws, 2).indices.tolist())  # the two largest draws, in step order
        assert _kept("random", seed) == [i in top2 for i in range(5)] + [False]
    assert len({tuple(_kept("random", s)) for s in range(20)}) > 3  # the seed changes the choice


def test_the_statistics_stay_those_of_the_entropies_whatever_is_kept():
    plan = plan_step([ENT], [VALID], 0.4, log_entropy=True, selection="lowest")
    s = plan.stats
    assert s["entropy/kept_mean"] == pytest.approx((0.1 + 0.3) / 2)
    assert s["entropy/dropped_mean"] == pytest.approx((0.5 + 0.9 + 0.7) / 3)
    assert s["entropy/mean"] == pytest.approx((0.5 + 0.1 + 0.9 + 0.3 + 0.7) / 5)
    assert s["entropy/threshold"] == pytest.approx(0.1)  # not the entropy cut: the lowest kept entropy
    assert plan.num_kept == 2 and plan.num_valid == 5
    high = plan_step([ENT], [VALID], 0.4, log_entropy=True).stats
    assert high["entropy/threshold"] == pytest.approx(0.7) and high["entropy/kept_mean"] == pytest.approx(0.8)


def test_rho_one_keeps_every_valid_token_under_each_selection():
    for how in ("highest", "random", "lowest"):
        assert _kept(how, rho=1.0) == [True] * 5 + [False]


def test_an_unknown_selection_is_refused_naming_the_field_and_the_choices():
    with pytest.raises(ConfigError) as e:
        validate_config({"algorithm": {"token_selection": "middle"}})
    msg = str(e.value)
    assert "algorithm.token_selection" in msg and "middle" in msg and "highest" in msg and "lowest" in msg
    with pytest.raises(ValueError, match="not one of highest, random, lowest"):
        plan_step([ENT], [VALID], 0.4, selection="middle")
