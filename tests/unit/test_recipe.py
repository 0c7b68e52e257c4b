"""The DAPO recipe's pieces in the pure core: exact k for every float dtype, a KL term that does not
depend on the entropy mask, dynamic-sampling group selection on verifier scores, PPO mini-batch
splitting, the merge of several optimizer steps' metrics, and the config refusals."""

import math

import pytest
import torch

from actors.algo.advantages import groups_with_signal
from actors.algo.batching import mini_batches
from actors.algo.loss import policy_loss
from actors.algo.metrics import merge_step_metrics
from actors.algo.selection import entropy_threshold, high_entropy_mask, num_kept
from actors.common.batch import Completion
from actors.common.config import AlgorithmConfig as A
from actors.common.config_load import ConfigError, load_config


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_mask_keeps_exactly_k_for_every_float_dtype(dtype):
    # float64 values that differ only below float32's resolution: a float32 threshold compared in
    # float64 would keep a different number than k
    g = torch.Generator().manual_seed(3)
    base = torch.rand(40, 50, generator=g, dtype=torch.float64)
    h = (base + torch.rand(40, 50, generator=g, dtype=torch.float64) * 1e-12).to(dtype)
    valid = torch.rand(40, 50, generator=g) < 0.9
    n = int(valid.sum())
    for rho in (0.07, 0.2, 0.5, 1.0):
        kept = high_entropy_mask(h, valid, rho)
        assert int(kept.sum()) == num_kept(n, rho), (dtype, rho)
        assert not (kept & ~valid).any()
    # low-precision inputs really tie (bf16 has 8 bits of mantissa): the tie rule is exercised
    if dtype in (torch.float16, torch.bfloat16):
        th = entropy_threshold(h[valid], 0.2)
        assert int((h[valid].float() == th.tau).sum()) > th.ties_to_keep > 0


def test_kl_does_not_depend_on_the_entropy_mask():
    # A = 0 (no policy gradient), kl_coef 0.5, logp = 0, ref = ln 2 on two tokens and 0 on two:
    # k3 = [0.306853, 0.306853, 0, 0]; KL mean over the 4 valid tokens = 0.153426
    # loss = 0.5 * 0.153426 = 0.076713, whatever the filter keeps and whatever the loss normaliser
    lp = torch.zeros(1, 4)
    ref = torch.tensor([[math.log(2.0), math.log(2.0), 0.0, 0.0]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    for agg in ("token_mean_selected", "token_mean", "seq_mean_token_mean", "token_sum_norm"):
        for kept in ([[True, False, False, False]], [[True, True, True, True]], [[False, False, True, True]]):
            loss, m = policy_loss(lp, lp, torch.zeros(1), valid, torch.tensor(kept), A(kl_coef=0.5, loss_agg=agg),
                                  ref_logprobs=ref)  # fmt: skip
            assert loss.item() == pytest.approx(0.5 * 0.306853 * 2 / 4, abs=1e-6), (agg, kept)
            assert m["actor/kl_ref"] == pytest.approx(0.306853 * 2 / 4, abs=1e-6)
    # step-global: two micro-batches of one step, 4 + 4 valid tokens -> each contributes sum / 8
    loss, m = policy_loss(lp, lp, torch.zeros(1), valid, None, A(kl_coef=0.5), ref_logprobs=ref, num_valid_step=8)
    assert loss.item() == pytest.approx(0.5 * 0.306853 * 2 / 8, abs=1e-6)
    # mask_kl_by_entropy: the KL applies to the kept tokens only, averaged over them
    # kept = first and third: k3 = [0.306853, 0] -> mean 0.153426 over 2 kept tokens
    kept = torch.tensor([[True, False, True, False]])
    loss, _ = policy_loss(
        lp, lp, torch.zeros(1), valid, kept, A(kl_coef=0.5, mask_kl_by_entropy=True), ref_logprobs=ref
    )
    assert loss.item() == pytest.approx(0.5 * 0.306853 / 2, abs=1e-6)


def test_groups_with_signal_filters_on_verifier_scores():
    # 4 groups of 3: [1,0,0] signal, [1,1,1] constant, [0,0,0] constant, [0.5,0,0] signal
    scores = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 0, 0, 0.5, 0, 0])
    assert groups_with_signal(scores, 3).tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="group_size=5"):
        groups_with_signal(scores, 5)


def test_mini_batches_split_whole_groups_in_order():
    groups = [[f"p{i}s{j}" for j in range(2)] for i in range(5)]  # 5 prompts x 2 samples
    assert mini_batches(groups, None) == [[s for g in groups for s in g]]
    parts = mini_batches(groups, 2)  # 2 prompts per optimizer step: 2 + 2 + 1
    assert [len(p) for p in parts] == [4, 4, 2]
    assert parts[0] == ["p0s0", "p0s1", "p1s0", "p1s1"] and parts[2] == ["p4s0", "p4s1"]
    assert mini_batches([], 2) == []


def test_merge_step_metrics():
    # two optimizer steps: means of the actor/entropy values, sums of the counts, forking tokens merged
    a = {"actor/clipfrac": 0.0, "entropy/num_valid": 10.0, "entropy/kept_tokens": 2.0,
         "entropy/top_forking_tokens": [[5, 2], [7, 1]]}  # fmt: skip
    b = {"actor/clipfrac": 0.5, "entropy/num_valid": 6.0, "entropy/kept_tokens": 2.0,
         "entropy/top_forking_tokens": [[7, 3]]}  # fmt: skip
    m = merge_step_metrics([a, b])
    assert m["actor/clipfrac"] == 0.25
    assert m["entropy/num_valid"] == 16.0 and m["entropy/kept_tokens"] == 4.0
    assert m["entropy/top_forking_tokens"] == [[7, 4], [5, 2]]
    assert m["actor/optimizer_steps"] == 2.0
    assert merge_step_metrics([a]) == {**a, "actor/optimizer_steps": 1.0}


@pytest.mark.parametrize(
    "override,needle",
    [
        ("rollout.top_p=0.9", "rollout.top_p = 0.9"),
        ("algorithm.ppo_mini_batch=9", "algorithm.ppo_mini_batch=9 must be <= data.prompts_per_step=8"),
        ("algorithm.ppo_epochs=0", "algorithm.ppo_epochs = 0"),
        ("algorithm.dynamic_sampling_max_rounds=0", "algorithm.dynamic_sampling_max_rounds = 0"),
    ],
)
def test_recipe_config_refusals_name_the_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    if "top_p" in override:
        assert "accepted: 1.0" in str(e.value)


class _ScriptedRollout:
    """Stands in for the rollout pool so that each round's scores are chosen by hand (the real pools
    run in tests/ray): completion text "1" scores 1 under the numeric verifier, "0" scores 0."""

    def __init__(self, rounds):
        self.rounds = iter(rounds)

    def generate(self, prompts, n):
        texts = next(self.rounds)
        assert len(texts) == len(prompts) and all(len(t) == n for t in texts)
        return [[Completion([7] * (1 + k), [-1.0] * (1 + k), t, "stop") for k, t in enumerate(g)] for g in texts]


class _Tok:
    def __call__(self, text):
        return {"input_ids": [len(text)]}


def _collect(rounds, **algo):
    from actors.driver.data import PromptSampler, load_examples
    from actors.driver.sampling import collect
    from actors.reward.pool import RewardWorker

    cfg = load_config(None, ["data.prompts_per_step=2", "rollout.group_size=2", "data.use_chat_template=false",
                             *(f"algorithm.{k}={v}" for k, v in algo.items())])  # fmt: skip
    sampler = PromptSampler(load_examples(cfg.data), 2, 0)
    worker = RewardWorker(cfg.reward)
    scored = type("Rewards", (), {"score": lambda self, items: worker.score([(t, "1", p) for t, _, p in items])})()
    return collect(cfg, sampler, _Tok(), _ScriptedRollout(rounds), scored), sampler


def test_dynamic_sampling_refills_until_the_step_is_full():
    # round 1: groups [1,1] (constant) and [1,0] (signal); round 2: [0,0] constant, [0,1] signal -> full
    got, sampler = _collect([[["1", "1"], ["1", "0"]], [["0", "0"], ["0", "1"]], [["1", "0"], ["1", "0"]]])
    assert [g.scores for g in got.groups] == [[1.0, 0.0], [0.0, 1.0]]
    assert got.metrics["batch/rounds"] == 2 and got.metrics["batch/groups_discarded"] == 2
    assert got.metrics["batch/groups_generated"] == 4 and got.metrics["batch/signal_share"] == 0.5
    assert got.metrics["batch/sampling_bound_hit"] == 0.0
    assert got.metrics["reward/mean"] == 0.5  # over all 8 completions generated in the step
    assert sampler.state()["pos"] == 4  # two rounds of 2 prompts: the position the checkpoint records


def test_dynamic_sampling_bound_and_empty_step():
    from actors.driver.sampling import training_groups

    got, _ = _collect([[["1", "1"], ["0", "0"]], [["1", "1"], ["1", "1"]]], dynamic_sampling_max_rounds=2)
    assert got.groups == [] and got.metrics["batch/sampling_bound_hit"] == 1.0 and got.metrics["batch/rounds"] == 2
    groups, m = training_groups(load_config(None, []), got.groups)
    assert groups == [] and m["batch/sequences"] == 0.0
    # a step with more signal than it needs keeps the first prompts_per_step groups, in order
    got, _ = _collect([[["1", "0"], ["0", "1"]]], dynamic_sampling_max_rounds=1)
    assert len(got.groups) == 2 and got.metrics["batch/rounds"] == 1
    # without dynamic sampling every group is kept (constant ones get advantage 0)
    got, _ = _collect([[["1", "1"], ["1", "0"]]], dynamic_sampling=False)
    assert len(got.groups) == 2 and got.metrics["batch/groups_discarded"] == 0
    assert got.metrics["batch/signal_share"] == 0.5  # [1,1] still has no signal: the share counts it so


def test_overlong_mask_leaves_truncated_responses_out():
    from actors.driver.data import Example
    from actors.driver.sampling import Group, training_groups

    cfg = load_config(None, ["rollout.group_size=2", "algorithm.overlong_mask=true", "algorithm.overlong_buffer=0"])
    done, cut = Completion([1, 2], [-1.0, -1.0], "1", "stop"), Completion([3] * 64, [-1.0] * 64, "0", "length")
    groups, m = training_groups(cfg, [Group(Example("q", "1"), [5], [done, cut], [1.0, 0.0])])
    # both shape the baseline (advantages +0.707 / -0.707), only the finished one enters the loss
    assert [s.response_ids for g in groups for s in g] == [[1, 2]]
    assert groups[0][0].advantage == pytest.approx(1 / math.sqrt(2), abs=1e-5)
    assert m["batch/truncated_masked"] == 1.0


def test_sampled_completions_are_marked_and_come_back_as_records():
    from actors.common.batch import TokenTrace
    from actors.driver.data import Example
    from actors.driver.sampling import SAMPLE_TOKENS, Group, sample_records, training_groups

    cfg = load_config(None, ["rollout.group_size=2", "tracking.samples_per_step=2", "algorithm.overlong_buffer=0"])
    long = Completion(list(range(600)), [-1.0] * 600, "x", "length")
    groups_in = [
        Group(Example("p0", "1"), [5], [Completion([], [], "", "stop"), Completion([7, 8], [-1.0, -1.0], "ab", "stop")],
              [0.0, 1.0]),
        Group(Example("p1", "2"), [6], [long, Completion([9], [-1.0], "c", "stop")], [1.0, 0.0]),
        Group(Example("p2", "3"), [6], [Completion([4], [-1.0], "d", "stop")] * 2, [1.0, 0.0]),
    ]  # fmt: skip
    groups, _ = training_groups(cfg, groups_in)
    # the first trained completion of each of the first 2 groups: group 0's second (its first is empty), group 1's
    # first; group 2 is past samples_per_step. sample_id = group * group_size + completion
    assert [s.sample_id for g in groups for s in g] == [1, 2, None, None, None]

    class Tok:  # one character per token id
        def decode(self, ids):
            return "".join(chr(ord("a") + i % 26) for i in ids)

    traces = [TokenTrace(1, [0.5, 0.25], [True, False]), TokenTrace(2, [0.1] * 600, [False] * 600)]
    recs = sample_records(groups_in, traces, Tok(), 2)
    assert recs[0] == {"prompt": "p0", "answer": "1", "reward": 1.0, "tokens": ["h", "i"], "entropy": [0.5, 0.25],
                       "kept": [1, 0], "truncated": False}  # fmt: skip
    assert recs[1]["prompt"] == "p1" and recs[1]["reward"] == 1.0 and recs[1]["truncated"]
    assert len(recs[1]["tokens"]) == len(recs[1]["entropy"]) == len(recs[1]["kept"]) == SAMPLE_TOKENS


def test_forking_tokens_are_decoded_with_their_drops():
    from actors.driver.sampling import forking_tokens

    class Tok:
        def decode(self, ids):
            return {4: " so", 9: " wait"}[ids[0]]

    m = {"entropy/top_forking_tokens": [[9, 5], [4, 2]], "entropy/forking_tokens_dropped": [[9, 1], [4, 7]]}
    assert forking_tokens(m, Tok()) == [
        {"id": 9, "text": " wait", "kept": 5, "dropped": 1},
        {"id": 4, "text": " so", "kept": 2, "dropped": 7},
    ]
    assert forking_tokens({"entropy/top_forking_tokens": [[4, 3]]}, Tok())[0]["dropped"] == 0  # older records
    assert forking_tokens({}, Tok()) == []  # log_entropy off
