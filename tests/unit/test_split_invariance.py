"""One optimizer step gives the same threshold, masks, loss and gradients however it is split:
1 or 4 micro-batches, 1 rank or 2 real ranks (torch.distributed gloo in separate processes)."""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from actors.algo.covariance import plan_covariance
from actors.algo.entropy_filter import plan_step
from actors.algo.loss import loss_normalizer, policy_loss
from actors.common.config import AlgorithmConfig as A
from actors.learner.logits import token_logprobs_and_entropy

B, T, V, D = 8, 6, 13, 5
RHO = 0.2


def _problem():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, D, generator=g)
    w0 = torch.randn(V, D, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    valid = torch.arange(T)[None, :] < torch.tensor([6, 3, 5, 0, 6, 2, 4, 1])[:, None]
    adv = torch.randn(B, generator=g)
    # equal hidden states give exactly equal entropies: 8 tokens share one near-uniform state, spread
    # over every micro-batch of the 4-way split and both ranks; one all-zero state (uniform, the largest
    # entropy there is) sits above them. k = ceil(0.2 * 27) = 6: 1 above + the first 5 of the 8 ties.
    tied = 0.3 * torch.randn(D, generator=g)
    for row, pos in TIES:
        hidden[row, pos] = tied
    hidden[4, 5] = 0.0
    return hidden, w0, ids, valid, adv


TIES = [(0, 1), (1, 0), (2, 2), (4, 3), (5, 0), (6, 1), (6, 3), (7, 0)]  # (row, position), all valid


def test_the_fixture_really_has_ties_across_the_splits():
    loss, grad, plan = _step([range(0, B)])
    th = plan.threshold
    assert (th.k, th.num_above, th.ties_to_keep) == (6, 1, 5)  # more tied tokens (8) than are kept (5)
    kept = plan.masks[0]
    assert [bool(kept[r, p]) for r, p in TIES] == [True] * 5 + [False] * 3  # the first 5 in step order
    # kept ties fall in 3 of the 4 micro-batches (rows 0-1, 2-3, 4-5) and on both ranks (rows 0-3, 4-7)
    assert {r // 2 for r, p in TIES[:5]} == {0, 1, 2} and {r // 4 for r, p in TIES} == {0, 1}


# Clip-Cov / KL-Cov act on about a third of the 6 kept tokens here (the defaults: 2e-4 of a long step)
COV = {"kl_cov_ratio": 0.34, "clip_cov_ratio": 0.34, "clip_cov_lb": -1e6, "clip_cov_ub": 1e6}


def _step(
    rows: list[range], world: int = 1, agg="token_mean_selected", dtype=torch.float32, selection="highest",
    method="ppo_clip",
):  # fmt: skip
    """Run one step over this rank's micro-batches; returns (loss, grad, plan); with Clip-Cov / KL-Cov
    the plan's masks are followed by the covariance selection's."""
    hidden, w0, ids, valid, adv = _problem()
    w = w0.clone().requires_grad_(True)
    algo = A(loss_agg=agg, policy_loss=method, **COV)
    with torch.no_grad():
        # x (1 + 1e-9) moves float64 values off the float32 grid (a float32 input is unchanged): gathering
        # them as float32 would round them and move the threshold
        ents = [token_logprobs_and_entropy(hidden[r] @ w.T, ids[r], 0.7)[1].to(dtype) * (1 + 1e-9) for r in rows]
        lps = [token_logprobs_and_entropy(hidden[r] @ w.T, ids[r], 0.7)[0] for r in rows]
    # the default device is "meta" inside plan_step: a tensor it creates without naming the data's device
    # (as a CPU tensor would be under NCCL) lands there and fails, in the collective or when read
    with torch.device("meta"):
        plan = plan_step(
            ents, [valid[r] for r in rows], RHO, [ids[r] for r in rows], log_entropy=True, selection=selection, seed=7
        )
        cov = plan_covariance(lps, [lp + 0.1 for lp in lps], [adv[r] for r in rows], plan.masks, algo, seed=7)
    plan.stats.update(cov.stats)
    norm = loss_normalizer(
        agg,
        num_valid_tokens=plan.num_valid,
        num_selected_tokens=plan.num_kept,
        num_sequences=plan.num_sequences,
        max_response_len=T,
    )
    total = 0.0
    for r, mask, chosen in zip(rows, plan.masks, cov.masks, strict=True):
        logp, _ = token_logprobs_and_entropy(hidden[r] @ w.T, ids[r], 0.7)
        old = logp.detach() + 0.1
        loss, _ = policy_loss(logp, old, adv[r], valid[r], mask, algo, normalizer=norm, cov_mask=chosen)
        (loss * world).backward()  # data-parallel engines average gradients over ranks
        total += loss.item()
    if method != "ppo_clip":
        plan.masks = plan.masks + cov.masks  # the tests compare both selections
    return total, w.grad, plan


def _split(start, stop, n):
    size = (stop - start) // n
    return [range(start + i * size, start + (i + 1) * size) for i in range(n)]


@pytest.mark.parametrize("selection", ["highest", "random", "lowest"])
@pytest.mark.parametrize("agg", ["token_mean_selected", "token_mean", "seq_mean_token_mean", "token_sum_norm"])
def test_micro_batches_do_not_change_the_step(agg, selection):
    loss1, grad1, plan1 = _step([range(0, B)], agg=agg, selection=selection)
    loss4, grad4, plan4 = _step(_split(0, B, 4), agg=agg, selection=selection)
    assert plan1.threshold == plan4.threshold
    assert torch.equal(plan1.masks[0], torch.cat(plan4.masks))
    assert int(plan1.masks[0].sum()) == plan1.threshold.k == 6  # ceil(0.2 * 27 valid tokens)
    assert loss4 == pytest.approx(loss1, abs=1e-6)
    torch.testing.assert_close(grad4, grad1, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["clip_cov", "kl_cov"])
def test_clip_cov_and_kl_cov_choose_the_same_tokens_however_the_step_is_split(method):
    loss1, grad1, plan1 = _step([range(0, B)], method=method)
    loss4, grad4, plan4 = _step(_split(0, B, 4), method=method)
    kept1, chosen1 = plan1.masks
    chosen4 = torch.cat(plan4.masks[4:])
    # floor(0.34 x 6 kept tokens) = 2 tokens chosen, all of them kept, the same ones in both splits
    assert int(chosen1.sum()) == 2 and not (chosen1 & ~kept1).any() and torch.equal(chosen1, chosen4)
    assert plan1.stats["cov/selected_frac"] == pytest.approx(2 / 6) and plan1.stats == plan4.stats
    assert loss4 == pytest.approx(loss1, abs=1e-6)
    torch.testing.assert_close(grad4, grad1, atol=1e-6, rtol=1e-5)
    plain, grad_plain, _ = _step([range(0, B)])
    assert not torch.allclose(grad_plain, grad1)  # the method changed the step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out_dir, dtype, selection, method="ppo_clip"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a rank that fails leaves the other in a collective: a short timeout turns that into a failure
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        half = B // world
        loss, grad, plan = _step(
            _split(rank * half, (rank + 1) * half, 2), world=world, dtype=dtype, selection=selection, method=method
        )
        dist.all_reduce(grad)
        grad /= world  # what DDP / DeepSpeed do
        t_loss = torch.tensor([loss])
        dist.all_reduce(t_loss)
        torch.save(
            {
                "loss": float(t_loss),
                "grad": grad,
                "masks": torch.cat(plan.masks),
                "plan": plan.threshold,
                "num_sequences": plan.num_sequences,
                "stats": plan.stats,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize(  # float64 entropies travel as float64; the controls rank other keys the same way;
    ("dtype", "selection", "method"),  # KL-Cov: the covariance selection over two ranks too
    [
        (torch.float32, "highest", "ppo_clip"),
        (torch.float64, "highest", "ppo_clip"),
        (torch.float32, "random", "ppo_clip"),
        (torch.float32, "lowest", "ppo_clip"),
        (torch.float32, "highest", "kl_cov"),
    ],
)
def test_two_real_ranks_equal_one_process(tmp_path, dtype, selection, method):
    loss1, grad1, plan1 = _step([range(0, B)], dtype=dtype, selection=selection, method=method)
    args = (2, _free_port(), str(tmp_path), dtype, selection, method)
    mp.start_processes(_rank_main, args=args, nprocs=2, join=True, start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["plan"] == r1["plan"] == plan1.threshold
    assert r0["num_sequences"] == r1["num_sequences"] == plan1.num_sequences == 7  # summed over the ranks
    if method == "ppo_clip":
        assert torch.equal(torch.cat([r0["masks"], r1["masks"]]), plan1.masks[0])
    else:  # each rank's 4 rows of kept masks (2 micro-batches), then its 4 rows of covariance masks
        half = B // 2
        assert torch.equal(torch.cat([r0["masks"][:half], r1["masks"][:half]]), plan1.masks[0])
        assert torch.equal(torch.cat([r0["masks"][half:], r1["masks"][half:]]), plan1.masks[1])
        assert int(plan1.masks[1].sum()) == 2
    assert r0["loss"] == pytest.approx(loss1, abs=1e-6)
    torch.testing.assert_close(r0["grad"], grad1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r1["grad"], grad1, atol=1e-6, rtol=1e-5)
    assert r0["stats"] == r1["stats"] == plan1.stats


def test_plan_statistics_are_those_of_the_unsplit_step():
    # the log_entropy record of a split step equals entropy_stats over the whole step's tokens, forking
    # tokens included; without log_entropy there is none
    from actors.algo.stats import entropy_stats

    hidden, w0, ids, valid, _ = _problem()
    ents = token_logprobs_and_entropy(hidden @ w0.T, ids, 0.7)[1]
    rows = _split(0, B, 4)
    plan = plan_step([ents[r] for r in rows], [valid[r] for r in rows], RHO, [ids[r] for r in rows], True)
    whole = plan_step([ents], [valid], RHO)
    assert whole.stats == {} and plan.num_sequences == whole.num_sequences == 7  # row 3 has no valid token
    direct = entropy_stats(ents, valid, whole.masks[0], whole.threshold, ids)
    assert plan.stats == direct and len(direct["entropy/top_forking_tokens"]) > 0
    no_ids = plan_step([ents[r] for r in rows], [valid[r] for r in rows], RHO, log_entropy=True).stats
    assert "entropy/top_forking_tokens" not in no_ids and no_ids["entropy/mean"] == direct["entropy/mean"]


def test_plan_refuses_parts_that_do_not_line_up():
    hidden, w0, ids, valid, _ = _problem()
    ents = token_logprobs_and_entropy(hidden @ w0.T, ids, 0.7)[1]
    with pytest.raises(ValueError):
        plan_step([ents, ents], [valid], RHO)  # two entropy tensors, one mask
    with pytest.raises(ValueError):
        plan_step([ents], [valid], RHO, [ids, ids], log_entropy=True)  # token ids of two micro-batches
