"""LoRA through the real pools (Ray, vLLM on CPU with its LoRA kernels, DeepSpeed on gloo, the tiny
random Llama): only the adapter travels to the engines, which then score like the learner; a LoRA job
trains asynchronously, resumes, and its export serves in vLLM. Marked slow."""

import json
import os
import re

import pytest
import torch

from actors.common.batch import TrainSequence
from actors.driver.loop import train

from .conftest import tiny_config

pytestmark = pytest.mark.slow


def _gap(rollout, learners, prompt) -> float:
    """Largest |engine log-prob - learner log-prob| over the tokens of two fresh samples."""
    (sample,) = rollout.generate([prompt], 2)[:1]
    learner_lp = learners.score([TrainSequence(prompt, s.token_ids, s.logprobs, 0.0) for s in sample])
    pairs = [(a, b) for s, lp in zip(sample, learner_lp, strict=True) for a, b in zip(lp, s.logprobs, strict=True)]
    return max(abs(a - b) for a, b in pairs)


@pytest.mark.parametrize("sync", ["adapter", "merged"])
def test_lora_sync_makes_the_engine_score_like_the_learner(ray_local, tiny_path, tmp_path, sync):
    import dataclasses

    import ray

    from actors.learner.group import LearnerGroup
    from actors.rollout.pool import RolloutPool

    cfg = tiny_config(tmp_path, "rollout.max_new_tokens=12", "learner.num_learners=1", "learner.lr=5e-2",
                      f"model.lora={{rank: 8, alpha: 16, sync: {sync}}}")  # fmt: skip
    lora = cfg.model.lora
    rollout = RolloutPool(tiny_path, cfg.rollout, "float32", 0, lora=lora)
    learners = LearnerGroup(tiny_path, cfg.learner, cfg.algorithm, cfg.rollout, 0, "float32", lora)
    try:
        prompt = [1, 2, 3, 4, 5, 6]
        assert _gap(rollout, learners, prompt) < 2e-2  # B = 0: the adapted model starts as the base
        groups = rollout.generate([prompt] * 4, 4)
        batch = [TrainSequence(prompt, s.token_ids, s.logprobs, a) for g in groups
                 for s, a in zip(g, [1.0, -1.0, 0.5, -0.5], strict=True)]  # fmt: skip
        base = learners.weights_digest(frozen=True)
        learners.train_step(batch)
        learners.train_step(batch)
        assert learners.weights_digest(frozen=True) == base  # the base never changes
        assert _gap(rollout, learners, prompt) > 0.1  # before the sync: the engine samples the old policy
        ref = learners.export_weights("float32", 2)
        file = ray.get(ref)
        timing = rollout.load_weights(ref, 60)[0]
        assert timing["version"] == 2.0 and timing["local"] == 1.0
        if sync == "adapter":  # the adapter alone: A and B of 7 projections x 2 layers, a small file
            assert file.adapter_config is not None and timing["tensors"] == 28
            assert json.loads(file.adapter_config)["r"] == 8 and file.nbytes < 200_000
        else:  # the merged model, as without LoRA
            assert file.adapter_config is None and file.nbytes > 1_000_000
        assert _gap(rollout, learners, prompt) < 2e-2  # after it: the learner's numbers
        if sync == "adapter":  # an engine on another node (named so) gets the adapter's bytes and config
            learners.train_step(batch)
            other = ray.put(dataclasses.replace(ray.get(learners.export_weights("float32", 3)), node_id="x"))
            remote = rollout.load_weights(other, 60)[0]
            assert remote["local"] == 0.0 and remote["version"] == 3.0
            assert _gap(rollout, learners, prompt) < 2e-2
            _a_stalled_engine_fails_the_adapter_sync_naming_it(rollout, learners.export_weights("float32", 4))
    finally:
        rollout.shutdown()
        learners.shutdown()


def _a_stalled_engine_fails_the_adapter_sync_naming_it(rollout, ref) -> None:
    """SIGSTOP the engine (alive, holding its connections, doing nothing): the adapter's load fails after
    the timeout naming the engine and the setting, never a hang."""
    import time

    import psutil

    procs = psutil.process_iter(["cmdline"])
    (engine,) = [p for p in procs if "ray::RolloutEngine" in " ".join(p.info["cmdline"] or [])]
    engine.suspend()
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError) as failed:
            rollout.load_weights(ref, 5)
    finally:
        engine.resume()
    message = str(failed.value)
    assert re.search(r"weight sync to rollout engine 0 .*did not finish .*within 5 s", message), message
    assert "learner.weight_sync_timeout_s" in message and time.monotonic() - t0 < 5 + 30


def test_a_lora_job_trains_asynchronously_resumes_and_its_export_serves(ray_local, tiny_path, tmp_path):
    settings = ["model.lora={rank: 8, alpha: 16, sync: adapter}", "learner.lr=5e-2", "trainer.max_staleness=1",
                "trainer.save_every=2", "trainer.steps=2"]  # fmt: skip
    train(tiny_config(tmp_path, *settings))
    summary = train(tiny_config(tmp_path, *settings[:-1], "trainer.steps=3"))  # resumes at step 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0 < r["model/trainable_params"] < r["model/params"] / 10 for r in rows)
    assert all(r["async/staleness_max"] <= 1 for r in rows if "async/staleness_max" in r)
    checkpoint = sorted(tmp_path.glob("checkpoints/step_*"))[-1]
    assert sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()) < 5_000_000  # no base weights
    # the export: a PEFT adapter and the merged model; vLLM serves the merged one like transformers scores it
    from transformers import AutoModelForCausalLM

    from actors.rollout.pool import RolloutPool

    export = summary["export"]
    assert os.path.exists(os.path.join(export, "adapter", "adapter_config.json"))
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    cfg = tiny_config(tmp_path)
    pool = RolloutPool(export, cfg.rollout, "float32", 0)
    try:
        prompt = [1, 2, 3, 4, 5]
        sample = pool.generate([prompt], 1)[0][0]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + sample.token_ids])).logits[0, len(prompt) - 1 : -1]
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(sample.token_ids)[:, None])[:, 0]
        assert (lp - torch.tensor(sample.logprobs)).abs().max() < 2e-2
    finally:
        pool.shutdown()
