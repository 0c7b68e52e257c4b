"""The training runtime on a real local Ray, with real vLLM (CPU), DeepSpeed (gloo) and a tiny
random Llama built locally. Minutes, not seconds: marked slow."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.batch import TrainSequence
from actors.data import PromptSampler, load_examples
from actors.train import batch_fingerprint, train

from .conftest import tiny_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sync_makes_the_engine_score_like_the_learner(ray_local, tiny_path, tmp_path):
    from transformers import AutoTokenizer

    from actors.learner import LearnerGroup
    from actors.rollout import RolloutPool

    cfg = tiny_config(tmp_path, "rollout.max_new_tokens=12", "algorithm.kl_coef=0.05")
    rollout = RolloutPool(tiny_path, cfg.rollout, "float32", 0)
    learners = LearnerGroup(tiny_path, cfg.learner, cfg.algorithm, cfg.rollout, cfg.trainer.seed, "float32")
    prompt = AutoTokenizer.from_pretrained(tiny_path)("What is 2 + 3?")["input_ids"]

    groups = rollout.generate([prompt] * 4, 4)
    batch = [
        TrainSequence(prompt, s.token_ids, s.logprobs, a)
        for g in groups
        for s, a in zip(g, [1.0, -1.0, 0.5, -0.5], strict=True)
    ]
    before = learners.weights_digest()
    metrics = learners.train_step(batch)
    assert learners.weights_digest() != before  # the step changed the weights
    assert metrics["actor/kl_ref"] == 0.0  # the reference is the initial policy: no divergence yet
    assert learners.train_step(batch)["actor/kl_ref"] > 0.0  # after one update there is
    assert metrics["entropy/kept_frac"] == pytest.approx(
        math.ceil(0.2 * metrics["entropy/num_valid"]) / metrics["entropy/num_valid"]
    )
    # before sync the engine still samples from the old weights; after it, from the learner's
    timing = rollout.load_weights(learners.export_weights("float32"), 60)
    assert timing[0]["tensors"] > 0
    (sample,) = rollout.generate([prompt], 2)[:1]
    seqs = [TrainSequence(prompt, s.token_ids, s.logprobs, 0.0) for s in sample]
    learner_lp = learners.score(seqs)
    for s, lp in zip(sample, learner_lp, strict=True):
        assert len(lp) == len(s.logprobs)
        diff = max(abs(a - b) for a, b in zip(lp, s.logprobs, strict=True))
        assert diff < 2e-2, diff  # bf16-level agreement between vLLM and the learner


def test_three_steps_two_learners_and_the_reward_rises(ray_local, tmp_path):
    # 2 learners, 2 reward workers, 1 engine; a dense toy reward a random model can learn
    cfg = tiny_config(
        tmp_path,
        "trainer.steps=10",
        "trainer.save_every=0",
        "data.prompts_per_step=8",
        "rollout.group_size=8",
        "learner.micro_batch_size=16",
        "learner.lr=0.2",
        "algorithm.top_entropy_quantile=0.5",
    )
    summary = train(cfg)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 11))
    # a large learning rate on a tiny model: the rise dwarfs the batch noise (about 0.02)
    first = sum(r["reward/mean"] for r in rows[:2]) / 2
    last = sum(r["reward/mean"] for r in rows[-2:]) / 2
    assert last > first + 0.05, [round(r["reward/mean"], 3) for r in rows]
    learned = [r for r in rows if "entropy/kept_tokens" in r]  # steps whose groups were not all dropped
    assert len(learned) >= 3
    for r in learned:  # the filter keeps exactly ceil(rho N) tokens and logs its statistics
        assert r["entropy/kept_tokens"] == math.ceil(0.5 * r["entropy/num_valid"])
        assert "timing/generate" in r and "timing/learn" in r and "timing/weight_sync" in r
    # the final export loads in transformers and in vLLM
    from transformers import AutoModelForCausalLM

    from actors.rollout import RolloutPool

    assert AutoModelForCausalLM.from_pretrained(summary["export"]).num_parameters() > 0
    pool = RolloutPool(summary["export"], cfg.rollout, "float32", 0)
    assert len(pool.generate([[1, 2, 3]], 2)[0]) == 2


def test_kill_after_a_checkpoint_and_resume_with_the_same_data_order(tmp_path):
    run = tmp_path / "run"
    args = [
        sys.executable, "-m", "actors.train", "--config", "examples/tiny.yaml",
        "--set", f"trainer.output_dir={run}", "--set", "trainer.steps=4", "--set", "trainer.save_every=2",
        "--set", 'reward.verifiers=[{type: plugin, function: "tests.toy_rewards:lowercase_fraction"}]',
    ]  # fmt: skip
    proc = subprocess.Popen(
        args, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    marker = run / "checkpoints" / "step_00000002" / "driver.json"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert marker.exists(), "no checkpoint at step 2"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    proc.wait()
    done = subprocess.run([*args, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(run)
    resumed = [r for r in rows if r["step"] > 2]
    assert [r["step"] for r in resumed][-2:] == [3, 4]
    cfg = tiny_config(run)
    sampler = PromptSampler(load_examples(cfg.data), cfg.data.prompts_per_step, cfg.trainer.seed)
    expected = [batch_fingerprint(sampler.next()) for _ in range(4)]
    assert [r["data/batch_crc"] for r in resumed[-2:]] == expected[2:]
    assert "step 4" in done.stderr and "resumed from" in done.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit(tmp_path):
    venv_bin = Path(sys.executable).parent
    ray_cli = str(venv_bin / "ray")
    # every Ray node's dashboard agent listens on 52365 by default: another Ray on this machine (the
    # module's local cluster, a user's) holds it, and then jobs fail with 'No available agent'
    port, dash, agent = _free_port(), _free_port(), _free_port()
    # the job's `python` must be the venv's, as on a node built from the project's image
    env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    # Ray's dashboard requires a token once one exists on the machine: give the cluster its own
    import secrets

    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    subprocess.run(
        [ray_cli, "start", "--head", "--num-cpus=4", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--dashboard-agent-listen-port={agent}",
         "--disable-usage-stats"],
        check=True, env=env, capture_output=True, timeout=180,
    )  # fmt: skip
    try:
        submit = [
            ray_cli, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".",
            "--runtime-env", "deploy/runtime_env.yaml", "--",
            "python", "-m", "actors.train", "--config", "examples/tiny.yaml",
            "--set", "trainer.steps=2", "--set", f"trainer.output_dir={tmp_path}",
        ]  # fmt: skip
        for _ in range(10):  # the dashboard's job agent registers a few seconds after `ray start`
            out = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in out.stderr:
                break
            time.sleep(3)
        assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
        assert "succeeded" in out.stdout.lower()
        assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
