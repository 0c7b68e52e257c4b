"""The learner in this process (DeepSpeed on gloo, one rank, the tiny random Llama; no Ray needed):
every ZeRO stage takes the same step from a batch of several micro-batches, and `actor/grad_norm` is
the real gradient norm before clipping on each of them."""

import os
import socket

import pytest
import torch

from actors.common.batch import TrainSequence
from actors.common.config import AlgorithmConfig, LearnerConfig, RolloutConfig

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def port():
    return _port()  # one process group for the module: DeepSpeed initialises it once


def _batch() -> list[TrainSequence]:
    g = torch.Generator().manual_seed(0)
    out = []
    for p in range(2):
        prompt = torch.randint(5, 500, (6 + p,), generator=g).tolist()
        for a in (1.0, -1.0, 0.5):
            n = int(torch.randint(3, 9, (1,), generator=g))
            out.append(TrainSequence(prompt, torch.randint(5, 500, (n,), generator=g).tolist(), [-1.0] * n, a))
    return out


def _step(tiny_path, port, stage, grad_clip=1.0, entropy_pass="fused", **learner):
    """(grad_norm, update of every weight) of one step on 6 sequences in 2 micro-batches."""
    from actors.learner.actor import Learner

    learner_cfg = LearnerConfig(
        zero_stage=stage, lr=1e-3, grad_clip=grad_clip, micro_batch_size=4, entropy_pass=entropy_pass, **learner
    )
    learner = Learner(tiny_path, learner_cfg, AlgorithmConfig(top_entropy_quantile=1.0), RolloutConfig(), 0,
                      "float32", os.cpu_count() or 1)  # fmt: skip
    learner.setup(0, 1, "127.0.0.1", port)
    before = learner._full_state()
    norm = learner.train_step(_batch()).metrics["actor/grad_norm"]
    after = learner._full_state()
    return norm, {k: after[k] - before[k] for k in after}


def test_every_zero_stage_takes_the_same_step_and_reports_its_grad_norm(tiny_path, port):
    # the same initial weights and batch give the same gradient, so every stage reports the same norm
    # and makes the same update (ZeRO-3 used to keep only the last micro-batch's gradient: its norm was
    # 0.64x and many updates had the opposite sign); a tiny clip must not change the norm reported
    steps = {stage: _step(tiny_path, port, stage) for stage in (0, 1, 2, 3)}
    norm0, update0 = steps[0]
    assert norm0 > 1e-5, norm0  # stage 0 used to report 0.0 (DeepSpeed keeps no norm without ZeRO)
    for stage in (1, 2, 3):
        norm, update = steps[stage]
        assert norm == pytest.approx(norm0, rel=1e-4), (stage, norm, norm0)
        for k in update0:
            torch.testing.assert_close(update[k], update0[k], atol=1e-6, rtol=0, msg=f"stage {stage}: {k}")
    norm3s, update3s = _step(tiny_path, port, 3, entropy_pass="separate")
    assert norm3s == pytest.approx(norm0, rel=1e-4)
    clipped, _ = _step(tiny_path, port, 0, grad_clip=norm0 / 100)
    assert clipped == pytest.approx(norm0, rel=1e-5)


@pytest.mark.parametrize(
    "variant",
    [
        {"entropy_pass": "separate"},  # no-grad entropy pass first, then forward + backward per micro-batch
        {"share_prompt": False},  # every sequence run whole
        {"gradient_checkpointing": True},  # share_prompt falls back to whole sequences (no KV cache)
    ],
)
def test_learner_variants_take_the_same_step(tiny_path, port, variant):
    norm0, update0 = _step(tiny_path, port, 0)
    norm, update = _step(tiny_path, port, 0, **variant)
    assert norm == pytest.approx(norm0, rel=1e-4)
    for k in update0:
        torch.testing.assert_close(update[k], update0[k], atol=1e-6, rtol=0, msg=k)


def _optimizer_tensors(learner) -> dict[str, torch.Tensor]:
    state = learner.engine.optimizer.state_dict()["state"]
    return {f"{i}.{k}": v.clone() for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)}


def test_checkpoint_restores_weights_optimizer_and_rng(tiny_path, port, tmp_path):
    # save after one step; a second step changes weights, Adam moments and the RNG; loading the
    # checkpoint must bring back exactly what was saved (compared, not assumed)
    from actors.learner.actor import Learner

    learner = Learner(tiny_path, LearnerConfig(zero_stage=0, lr=1e-2, micro_batch_size=4), AlgorithmConfig(),
                      RolloutConfig(), 0, "float32", os.cpu_count() or 1)  # fmt: skip
    learner.setup(0, 1, "127.0.0.1", port)
    learner.train_step(_batch())
    saved_w, saved_opt, saved_rng = learner._full_state(), _optimizer_tensors(learner), torch.get_rng_state()
    learner.save_checkpoint(str(tmp_path), "step_1", {"step": 1})
    learner.train_step(_batch())
    torch.rand(100)  # the RNG moves on too
    moved = learner._full_state()
    assert any(not torch.equal(moved[k], saved_w[k]) for k in saved_w)
    assert any(not torch.equal(v, saved_opt[k]) for k, v in _optimizer_tensors(learner).items())
    assert not torch.equal(torch.get_rng_state(), saved_rng)
    assert learner.load_checkpoint(str(tmp_path), "step_1")["step"] == 1
    restored = learner._full_state()
    for k in saved_w:
        assert torch.equal(restored[k], saved_w[k]), k
    opt = _optimizer_tensors(learner)
    assert opt.keys() == saved_opt.keys() and len(opt) > 10
    for k in saved_opt:
        assert torch.equal(opt[k], saved_opt[k]), k
    assert torch.equal(torch.get_rng_state(), saved_rng)
