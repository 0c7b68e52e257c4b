"""The learner in this process (DeepSpeed on gloo, one rank, the tiny random Llama; no Ray needed):
every ZeRO stage takes the same step from a batch of several micro-batches, and `actor/grad_norm` is
the real gradient norm before clipping on each of them; with LoRA, the step is PEFT's own."""

import os
import socket

import pytest
import torch

from actors.common.batch import TrainSequence
from actors.common.config import AlgorithmConfig, LearnerConfig, LoraConfig, RolloutConfig

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


def _step(tiny_path, port, stage, grad_clip=1.0, entropy_pass="fused", algo=None, **learner):
    """(grad_norm, update of every weight) of one step on 6 sequences in 2 micro-batches; algo: settings
    of `algorithm` beside rho = 1."""
    norm, update, _ = _step_metrics(tiny_path, port, stage, grad_clip, entropy_pass, algo, **learner)
    return norm, update


def _step_metrics(tiny_path, port, stage, grad_clip=1.0, entropy_pass="fused", algo=None, **learner):
    from actors.learner.actor import Learner

    learner_cfg = LearnerConfig(
        zero_stage=stage, lr=1e-3, grad_clip=grad_clip, micro_batch_size=4, entropy_pass=entropy_pass, **learner
    )
    algorithm = AlgorithmConfig(**{"top_entropy_quantile": 1.0, **(algo or {})})
    learner = Learner(tiny_path, learner_cfg, algorithm, RolloutConfig(), 0, "float32", os.cpu_count() or 1)
    learner.setup(0, 1, "127.0.0.1", port)
    before = learner._full_state()
    metrics = learner.train_step(_batch()).metrics
    after = learner._full_state()
    return metrics["actor/grad_norm"], {k: after[k] - before[k] for k in after}, metrics


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


def test_gspo_with_an_entropy_bonus_takes_the_same_step_in_both_entropy_passes(tiny_path, port):
    """The bonus's gradient reaches the weights whether the entropies come from the fused pass (kept
    graph) or are recomputed with the loss; it changes the step; lr_scale divides the rate by rho."""
    algo = {"policy_loss": "gspo", "entropy_coef": 0.5, "top_entropy_quantile": 0.5, "lr_scale": "inverse_rho"}
    norm, update, metrics = _step_metrics(tiny_path, port, 0, algo=algo)
    norm_s, update_s = _step(tiny_path, port, 0, entropy_pass="separate", algo=algo)
    assert norm_s == pytest.approx(norm, rel=1e-4)
    for k in update:
        torch.testing.assert_close(update_s[k], update[k], atol=1e-6, rtol=0, msg=k)
    assert metrics["actor/entropy_bonus"] > 0 and metrics["actor/lr"] == pytest.approx(2e-3)  # 1e-3 / 0.5
    no_bonus, _ = _step(tiny_path, port, 0, algo={**algo, "entropy_coef": 0.0})
    assert abs(no_bonus - norm) > 1e-3 * norm, (no_bonus, norm)


def test_kl_cov_takes_the_same_step_in_both_entropy_passes_and_reports_the_covariance(tiny_path, port):
    """KL-Cov's penalty acts where the ratio to the old policy is not 1: the batch comes with old
    log-probs (as a later PPO mini-batch does), so |log r| and its gradient are not 0."""
    from dataclasses import replace

    from actors.learner.actor import Learner

    batch = [replace(s, old_logprobs=[-5.0] * len(s.response_ids)) for s in _batch()]

    def step(entropy_pass: str, coef: float):
        algo = AlgorithmConfig(top_entropy_quantile=0.5, policy_loss="kl_cov", kl_cov_ratio=0.2, kl_cov_coef=coef)
        cfg = LearnerConfig(zero_stage=0, lr=1e-3, micro_batch_size=4, entropy_pass=entropy_pass)
        learner = Learner(tiny_path, cfg, algo, RolloutConfig(), 0, "float32", os.cpu_count() or 1)
        learner.setup(0, 1, "127.0.0.1", port)
        before = learner._full_state()
        result = learner.train_step(batch)
        after = learner._full_state()
        return result, {k: after[k] - before[k] for k in after}

    (fused, update), (separate, update_s) = step("fused", 5.0), step("separate", 5.0)
    assert fused.stats["cov/selected_frac"] == pytest.approx(separate.stats["cov/selected_frac"])
    assert 0 < fused.stats["cov/selected_frac"] <= 0.2 and fused.stats["cov/max"] > fused.stats["cov/p50"]
    for k in update:
        torch.testing.assert_close(update_s[k], update[k], atol=1e-6, rtol=0, msg=k)
    _, unpenalised = step("fused", 0.0)
    assert any(not torch.allclose(unpenalised[k], update[k], atol=1e-7) for k in update)  # the penalty acted


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


# -- LoRA (model.lora): the adapters are the only trainable parameters -------------------------------

LORA = LoraConfig(rank=4, alpha=8)


def _lora_learner(tiny_path, port, stage=0, lr=1e-2, **algo):
    from actors.learner.actor import Learner

    learner = Learner(tiny_path, LearnerConfig(zero_stage=stage, lr=lr, micro_batch_size=4, grad_clip=1e3),
                      AlgorithmConfig(top_entropy_quantile=1.0, tis_cap=None, **algo), RolloutConfig(), 0, "float32",
                      os.cpu_count() or 1, LORA)  # fmt: skip
    learner.setup(0, 1, "127.0.0.1", port)
    return learner


def _peft_reference(tiny_path, steps: int, lr: float) -> tuple[list[float], dict[str, torch.Tensor]]:
    """PEFT's own model, forward and backward, with torch's AdamW: the gradient norm of each step and the
    adapter after them. The loss is GRPO's with every token kept and no clipping in play (each step's old
    policy is its own detached log-probs): -sum(A * log p) / tokens, as gradients go."""
    from transformers import AutoModelForCausalLM

    from actors.learner.lora import apply_lora

    torch.manual_seed(0)  # the learner seeds the same way before it builds its model and adapters
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32), LORA)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    norms = []
    for _ in range(steps):
        opt.zero_grad()
        total, tokens = 0.0, 0
        for s in _batch():
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1 : -1]  # [R, V]
            lp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0]
            total = total - s.advantage * lp.sum()
            tokens += len(s.response_ids)
        (total / tokens).backward()
        norms.append(float(torch.stack([p.grad.pow(2).sum() for p in params]).sum().sqrt()))
        opt.step()
    return norms, {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_a_lora_step_equals_peft_forward_and_backward_and_leaves_the_base_alone(tiny_path, port):
    learner = _lora_learner(tiny_path, port)
    trainable, total = learner.parameter_counts()
    assert 0 < trainable < total / 10, (trainable, total)
    base = learner.weights_digest(frozen=True)
    norms = [learner.train_step(_batch()).metrics["actor/grad_norm"] for _ in range(2)]
    ref_norms, ref = _peft_reference(tiny_path, 2, 1e-2)
    # B starts at zero: step 1 moves B only; step 2's gradient reaches A through the new B, and Adam's
    # second update depends on both gradients' sizes, so a wrong loss or forward shows up in the weights
    assert norms == pytest.approx(ref_norms, rel=1e-4), (norms, ref_norms)
    ours = {k: v for k, v in learner.engine.module.named_parameters() if "lora_" in k}
    assert ours.keys() == ref.keys() and len(ours) == 2 * 7 * 2  # A and B of 7 projections, 2 layers
    # Adam moves a weight by about lr = 1e-2 a step whatever its gradient's size, except where the gradient
    # is near zero: there the update follows the gradient's last digits, which the fused and the per-tensor
    # AdamW kernels round differently (one weight in 512 off by 1e-4 to 5e-4 seen). So: nearly every weight
    # equal to float rounding, none off by more than a fifth of a step
    tight = sum(int(((ours[k].detach() - ref[k]).abs() <= 2e-6).sum()) for k in ref)
    assert tight >= 0.99 * sum(v.numel() for v in ref.values()), tight
    for k in ref:
        torch.testing.assert_close(ours[k].detach(), ref[k], atol=2e-3, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert learner.weights_digest(frozen=True) == base  # the base weights never change


def test_lora_zero_stages_agree_and_a_checkpoint_holds_the_adapters(tiny_path, port, tmp_path):
    updates = {}
    for stage in (0, 2, 3):
        learner = _lora_learner(tiny_path, port, stage)
        before = learner._full_state()
        learner.train_step(_batch())
        after = learner._full_state()
        updates[stage] = {k: after[k] - before[k] for k in after}
        assert all(torch.count_nonzero(v) == 0 for k, v in updates[stage].items() if "lora_" not in k), stage
    for stage in (2, 3):
        for k, v in updates[0].items():
            torch.testing.assert_close(updates[stage][k], v, atol=1e-6, rtol=0, msg=f"stage {stage}: {k}")
    # the checkpoint: adapters and their Adam moments only (the base comes from the model again)
    learner = _lora_learner(tiny_path, port)
    learner.train_step(_batch())
    saved_w, saved_opt = learner._full_state(), _optimizer_tensors(learner)
    learner.save_checkpoint(str(tmp_path), "step_1", {"step": 1})
    (module_file,) = (tmp_path / "step_1").glob("*model_states.pt")
    saved = torch.load(module_file, weights_only=False)["module"]
    assert saved and all("lora_" in k for k in saved), sorted(saved)[:5]
    learner.train_step(_batch())
    assert learner.load_checkpoint(str(tmp_path), "step_1")["step"] == 1
    restored = learner._full_state()
    for k in saved_w:
        assert torch.equal(restored[k], saved_w[k]), k
    for k, v in _optimizer_tensors(learner).items():
        assert torch.equal(v, saved_opt[k]), k


def test_lora_export_loads_in_peft_and_transformers_and_matches_the_learner(tiny_path, port, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    learner = _lora_learner(tiny_path, port)
    learner.train_step(_batch())
    learner.train_step(_batch())
    learner.export_hf(str(tmp_path / "hf"))
    seq = _batch()[0]
    ids = torch.tensor([seq.prompt_ids + seq.response_ids])
    want = torch.tensor(learner.score([seq])[0])

    def response_logprobs(model) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(seq.prompt_ids) - 1 : -1]
        return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(seq.response_ids)[:, None])[:, 0]

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    assert (response_logprobs(base) - want).abs().max() > 1e-4  # the adapter changed the policy
    adapted = PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter")
    torch.testing.assert_close(response_logprobs(merged), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(response_logprobs(adapted), want, atol=1e-5, rtol=0)
