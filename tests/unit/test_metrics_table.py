"""The one metric-reduction table (actors.algo.metrics): worked combinations, and every metric the
pure producers write has a rule."""

import pytest
import torch

from actors.algo.loss import policy_loss
from actors.algo.metrics import Reduce, combine_parts, merge_step_metrics, rule
from actors.algo.stats import entropy_stats


def test_parts_add_contributions_and_take_global_values_once():
    # two ranks: loss contributions 0.25 + 0.5 = 0.75; kept tokens 3 + 4 = 7; the global grad norm and
    # the entropy threshold are the same on both ranks and taken once (not 2.0 + 2.0)
    a = {"actor/loss": 0.25, "entropy/kept_tokens": 3.0, "actor/grad_norm": 2.0, "entropy/threshold": 1.5}
    b = {"actor/loss": 0.5, "entropy/kept_tokens": 4.0, "actor/grad_norm": 2.0, "entropy/threshold": 1.5}
    assert combine_parts([a, b]) == {
        "actor/loss": 0.75, "entropy/kept_tokens": 7.0, "actor/grad_norm": 2.0, "entropy/threshold": 1.5,
    }  # fmt: skip


def test_rounds_add_timings_and_verifier_counts():
    rounds = [{"timing/generate": 1.5, "reward/errors": 1.0}, {"timing/generate": 2.0, "reward/errors": 0.0}]
    assert combine_parts(rounds) == {"timing/generate": 3.5, "reward/errors": 1.0}


def test_a_metric_without_a_rule_or_combined_where_it_is_whole_is_refused():
    with pytest.raises(KeyError, match="'actor/made_up' has no reduction rule"):
        combine_parts([{"actor/made_up": 1.0}])
    with pytest.raises(ValueError, match="'reward/mean' is produced whole"):
        combine_parts([{"reward/mean": 0.5}, {"reward/mean": 0.25}])
    with pytest.raises(ValueError, match="'timing/generate' is produced whole"):
        merge_step_metrics([{"timing/generate": 1.0}])


def test_steps_average_values_and_add_counts():
    # kl 0.1 and 0.3 -> 0.2; valid tokens 10 + 6 = 16 (counts add over optimizer steps)
    m = merge_step_metrics(
        [{"actor/kl_ref": 0.1, "entropy/num_valid": 10.0}, {"actor/kl_ref": 0.3, "entropy/num_valid": 6.0}]
    )
    assert m["actor/kl_ref"] == pytest.approx(0.2) and m["entropy/num_valid"] == 16.0
    assert rule("entropy/top_forking_tokens").steps is Reduce.COUNTS


def test_every_metric_of_the_pure_producers_has_a_rule():
    h = torch.tensor([[0.5, 1.0, 0.0], [2.0, 0.1, 0.3]])  # [B, T]
    valid = torch.tensor([[True, True, False], [True, True, True]])
    kept = h >= 1.0
    ids = torch.tensor([[5, 6, 0], [7, 8, 9]])
    _, loss_metrics = policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1.0, -1.0]), valid, kept)
    stats = entropy_stats(h, valid, kept, token_ids=ids)
    keys = set(loss_metrics) | set(stats)
    assert {"actor/loss", "entropy/p80", "entropy/top_forking_tokens"} <= keys
    for key in keys:
        rule(key)
