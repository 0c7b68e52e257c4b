"""The training runtime on a real local Ray, with real vLLM (CPU), DeepSpeed (gloo) and a tiny
random Llama built locally. Minutes, not seconds: marked slow."""

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from actors.common.batch import TrainSequence
from actors.common.config_load import load_config
from actors.common.contract import RunDir
from actors.driver.loop import train

from .conftest import tiny_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _every_metric_has_a_rule(rows: list[dict]) -> None:
    """Each metric the driver wrote has its reduction rule in actors.algo.metrics (KeyError otherwise)."""
    from actors.algo.metrics import rule

    keys = {k for r in rows for k in r} - {"step", "samples"}  # the record's step and its sampled completions
    assert {"actor/loss", "entropy/threshold", "reward/errors", "timing/generate"} <= keys  # the check sees them
    for key in sorted(keys):
        rule(key)


def test_sync_makes_the_engine_score_like_the_learner(ray_local, tiny_path, tmp_path):
    import ray
    from transformers import AutoTokenizer

    from actors.learner.group import LearnerGroup
    from actors.rollout.pool import RolloutPool

    cfg = tiny_config(tmp_path, "rollout.max_new_tokens=12", "algorithm.kl_coef=0.05", "learner.lr=1e-2")
    rollout = RolloutPool(tiny_path, cfg.rollout, "float32", 0)
    learners = LearnerGroup(tiny_path, cfg.learner, cfg.algorithm, cfg.rollout, cfg.trainer.seed, "float32")
    try:
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
        # before sync the engine still samples from the old weights: its log-probs are far from the learner's
        assert _max_logprob_gap(rollout, learners, prompt) > 0.1
        # as the driver syncs: the learner's file in shared memory, read in place by the engine on its node
        ref = learners.export_weights("float32")
        file = ray.get(ref)
        assert file.path.startswith("/dev/shm/") and os.path.getsize(file.path) == file.nbytes > 0
        timing = rollout.load_weights(ref, 60)
        assert timing[0]["tensors"] > 0 and timing[0]["local"] == 1.0
        assert file.version == 2 and timing[0]["version"] == 2.0  # the policy version: two optimizer steps
        # after it, from the learner's: the same numbers up to float rounding
        assert _max_logprob_gap(rollout, learners, prompt) < 2e-2
        # an engine on another node (named so here) gets the bytes from the learner: the same weights
        learners.train_step(batch)
        other = ray.put(dataclasses.replace(ray.get(learners.export_weights("float32")), node_id="x"))
        remote = rollout.load_weights(other, 60)[0]
        assert remote["local"] == 0.0 and remote["version"] == 3.0
        assert _max_logprob_gap(rollout, learners, prompt) < 2e-2
        learners.drop_weights()
        assert not os.path.exists(file.path)
    finally:  # vLLM's engine processes would outlive a killed actor
        rollout.shutdown()
        learners.shutdown()


def _max_logprob_gap(rollout, learners, prompt) -> float:
    """Largest |engine log-prob - learner log-prob| over the tokens of two fresh samples."""
    (sample,) = rollout.generate([prompt], 2)[:1]
    learner_lp = learners.score([TrainSequence(prompt, s.token_ids, s.logprobs, 0.0) for s in sample])
    gaps = []
    for s, lp in zip(sample, learner_lp, strict=True):
        assert len(lp) == len(s.logprobs)
        gaps += [abs(a - b) for a, b in zip(lp, s.logprobs, strict=True)]
    return max(gaps)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _readme_recipe() -> list[str]:
    """The shell lines of the README's `ray job submit` recipe (continuations joined, comments cut)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("### As a Ray job") :].split("\n\n")[1]
    lines = [ln.split("  #")[0].strip() for ln in block.replace("\\\n", " ").splitlines()]
    assert [ln.split()[0] for ln in lines] == ["export", "ray", "ray", "ray"], lines
    return lines


def _stop_ray(temp_dir: Path) -> None:
    """Stop the Ray whose processes carry temp_dir in their command line (`ray stop` would stop every
    Ray on the machine, the module's own and a user's included)."""
    import psutil

    mine = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if str(temp_dir) in " ".join(p.info["cmdline"] or []):
                mine += [p, *p.children(recursive=True)]
    for p in mine:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(mine, timeout=30)


def _recipe_machine(home: Path, ran_before: bool, export: str, token: str) -> dict[str, str]:
    """A HOME of its own, fresh or where a local ray.init() (an earlier forkrl run) left a token, after the
    recipe's first two lines: they leave exactly one token there, the earlier one if there was one. The
    environment to go on with."""
    home.mkdir()
    venv_bin = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", HOME=str(home))
    env["FORKRL_MODEL_CACHE"] = str(resolve_cache())  # the models built for the suite, not a new HOME's
    # DeepSpeed's CPU ops as the suite built them (a new HOME would compile them again: a minute, 3 GB)
    build = f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    env["TORCH_EXTENSIONS_DIR"] = os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" / build)
    )
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        env.pop(var, None)
    before = None
    if ran_before:
        probe = "import ray; ray.init(address='local', num_cpus=1, include_dashboard=False); ray.shutdown()"
        subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True, timeout=180)
        before = (home / ".ray" / "auth_token").read_text()  # the condition this case is about
    else:
        assert not (home / ".ray").exists()
    out = subprocess.run(["bash", "-c", f"{export} && {token}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=180)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    made = (home / ".ray" / "auth_token").read_text()
    assert made.strip() and made == (before or made), (before, made)
    return env


def test_readme_ray_job_submit_recipe(tmp_path):
    """The README's recipe, line by line, with ports of its own (another Ray runs beside it), on a machine
    with no ~/.ray/auth_token. On one where an earlier forkrl run left a token (which makes `ray start
    --head` turn token authentication on), its first two lines keep that token and set the mode: `ray
    start` and `ray job submit` then meet what they meet on the fresh machine, so the job runs there once."""
    export, token, start, submit = _readme_recipe()
    _recipe_machine(tmp_path / "ran-before", True, export, token)
    env = _recipe_machine(tmp_path / "fresh", False, export, token)
    port, dash, agent = _free_port(), _free_port(), _free_port()
    temp_dir = Path(f"/tmp/fk-ray-{port}")  # short: Ray's socket paths must stay under 108 bytes
    start += (
        f" --port={port} --dashboard-port={dash} --dashboard-host=127.0.0.1 --dashboard-agent-listen-port={agent}"
        f" --disable-usage-stats --temp-dir={temp_dir}"
    )
    submit = submit.replace("http://127.0.0.1:8265", f"http://127.0.0.1:{dash}")
    submit += f" --set trainer.steps=2 --set trainer.export_hf=false --set trainer.output_dir={tmp_path / 'run'}"
    submit += " --set trainer.eval_every=2 --set trainer.eval_prompts=4"  # this door records step 0 and the end too
    run_dir = tmp_path / "run"
    try:
        out = subprocess.run(["bash", "-c", f"{export} && {start}"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=180)  # fmt: skip
        assert out.returncode == 0, (start, out.stderr[-3000:])
        for _ in range(10):  # the dashboard's job agent registers a few seconds after `ray start`
            out = subprocess.run(["bash", "-c", f"{export} && {submit}"], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=600)  # fmt: skip
            if "No available agent" not in out.stderr:
                break
            time.sleep(3)
        assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
        assert "succeeded" in out.stdout.lower() and f"run directory: {run_dir}" in out.stdout
        evaluated, *rows = _rows(run_dir)
        assert evaluated["step"] == 0 and "eval/reward_stderr" in evaluated and "eval/reward_mean" in rows[-1]
        assert [r["step"] for r in rows] == [1, 2]
        # the tiny example learns something: its format reward gives a random model groups with signal
        assert sum(r["batch/sequences"] for r in rows) > 0 and all("entropy/mean" in r for r in rows)
        # a relative output_dir would land in Ray's temporary copy of the working directory: refused at once
        relative = submit.split(" --set trainer.output_dir=")[0]
        out = subprocess.run(["bash", "-c", f"{export} && {relative}"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert out.returncode != 0 and "trainer.output_dir = 'runs/tiny' is relative" in out.stdout, out.stdout[-3000:]
    finally:
        _stop_ray(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def resolve_cache() -> Path:
    from actors.common.models import cache_dir

    return cache_dir()


def test_ppo_mini_batches_move_the_ratio_and_clip(ray_local, tmp_path):
    # 4 prompts per rollout, 2 per optimizer step: 2 updates per rollout against old log-probs taken
    # once; the second update's ratio is no longer 1, and a large learning rate makes it clip. The
    # tiny example's own verifier (a format reward) is used, with dynamic sampling refilling the step.
    cfg = load_config(
        "examples/tiny.yaml",
        [f"trainer.output_dir={tmp_path}", "trainer.steps=2", "trainer.save_every=0", "trainer.export_hf=false",
         "algorithm.ppo_mini_batch=2", "learner.lr=0.05", "algorithm.dynamic_sampling_max_rounds=4"],
    )  # fmt: skip
    train(cfg)
    rows = _rows(tmp_path)
    learned = [r for r in rows if r["batch/sequences"] > 0]
    assert learned, rows
    for r in learned:
        assert r["actor/optimizer_steps"] == math.ceil(r["batch/groups_kept"] / 2)
        assert r["batch/rounds"] >= 1 and r["batch/groups_kept"] + r["batch/groups_discarded"] >= 4
        # every round draws the step's 4 prompts; those with signal are signal_share of them
        assert r["batch/groups_generated"] == 4 * r["batch/rounds"]
        assert r["batch/groups_generated"] - r["batch/groups_discarded"] >= r["batch/groups_kept"]
        assert r["batch/signal_share"] == pytest.approx(1 - r["batch/groups_discarded"] / r["batch/groups_generated"])
        if not r["batch/sampling_bound_hit"]:
            assert r["batch/groups_kept"] == 4
    two = [r for r in learned if r["actor/optimizer_steps"] == 2]
    assert two, [(r["batch/groups_kept"], r["batch/rounds"]) for r in rows]
    _every_metric_has_a_rule(rows)
    # the first update has ratio exactly 1 (old = current); the mean over both moves away from it
    assert max(abs(r["actor/ratio_mean"] - 1.0) for r in two) > 1e-3
    assert max(r["actor/clipfrac"] for r in two) > 0.0


def test_one_learner_and_two_learners_take_the_same_step(ray_local, tiny_path, tmp_path):
    """Learner.train_step through LearnerGroup: 1 rank against 2 ranks on the same batch (7 sequences,
    an uneven split) gives the same global gradient norm and the same updated weights; a loss scaled
    wrongly for the data-parallel average shows in the norm (Adam's first step alone would hide it)."""
    import ray
    from safetensors.torch import load_file

    from actors.learner.group import LearnerGroup

    cfg = tiny_config(tmp_path, "learner.zero_stage=2", "learner.micro_batch_size=2")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 500, (6,), generator=g).tolist()
    batch = []
    for a in (1.0, -1.0, 0.5, -0.5, 0.25, -0.25, 0.75):
        n = int(torch.randint(3, 9, (1,), generator=g))
        batch.append(TrainSequence(prompt, torch.randint(5, 500, (n,), generator=g).tolist(), [-1.0] * n, a))
    out = {}
    for k in (1, 2):
        learner_cfg = cfg.learner.model_copy(update={"num_learners": k})
        group = LearnerGroup(tiny_path, learner_cfg, cfg.algorithm, cfg.rollout, cfg.trainer.seed, "float32")
        m = group.train_step(batch)
        out[k] = (m, load_file(ray.get(group.export_weights("float32")).path))
        group.shutdown()
    (m1, w1), (m2, w2) = out[1], out[2]
    assert m1["actor/grad_norm"] > 0 and m2["actor/grad_norm"] == pytest.approx(m1["actor/grad_norm"], rel=1e-5)
    assert m2["actor/loss"] == pytest.approx(m1["actor/loss"], abs=1e-6)
    assert m2["entropy/kept_tokens"] == m1["entropy/kept_tokens"]
    # Adam moves each weight by up to lr (1e-3) whatever its gradient's size: an entry whose gradient is
    # ~eps differs by float rounding of the sums (one of 6.3 M embedding entries by 1.3e-6 was seen)
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-5, rtol=0, msg=key)


def _start_tiny(run: Path, steps: int, settings: list[str]) -> subprocess.Popen[bytes]:
    """The tiny config's driver in its own session, with the dense toy reward, output to one pipe."""
    args = [
        sys.executable, "-m", "actors.train", "--config", "examples/tiny.yaml",
        "--set", f"trainer.output_dir={run}", "--set", f"trainer.steps={steps}", "--set", "trainer.save_every=0",
        "--set", 'reward.verifiers=[{type: plugin, function: "tests.toy_rewards:lowercase_fraction"}]',
        *[a for s in settings for a in ("--set", s)],
    ]  # fmt: skip
    return subprocess.Popen(args, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _actors_after_step(run: Path, proc: subprocess.Popen[bytes], step: int, role: str) -> list:
    """Once the run logged `step`: the processes of its `role` actors."""
    import psutil

    deadline = time.time() + 300
    while not any(r["step"] >= step for r in (_rows(run) if RunDir(run).metrics.is_file() else [])):
        if proc.poll() is not None:  # the driver ended first: its output says why
            raise AssertionError(f"no step {step}: the driver exited {proc.returncode}\n{_tail(proc)}")
        assert time.time() < deadline, f"no step {step} within 300 s"
        time.sleep(0.2)
    # only this driver's own actors (its Ray node's workers): a shared test cluster may hold others
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if f"ray::{role}" in _cmdline(p)]


def _tail(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    return proc.stdout.read().decode(errors="replace")[-3000:]


def _cmdline(p) -> str:
    import psutil

    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone, or a zombie: no command line
        return ""


def _running(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class _Peer:
    """A stand-in for a learner in a collective: `fail` raises the way gloo does when its peer is gone."""

    def fail(self, after_s: float) -> None:
        time.sleep(after_s)
        raise RuntimeError("Connection closed by peer")

    def wait(self, s: float) -> str:
        time.sleep(s)
        return "done"


def test_a_call_failing_because_its_peer_died_is_reported_as_the_peer_s_death(ray_local):
    """A learner's collective fails ("Connection closed by peer") before Ray reports the killed peer:
    gather raises the death (naming the actor), the failure as its cause; with no death, the failure."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from actors.common.pool import gather

    remote = ray.remote(num_cpus=0)(_Peer)
    first, peer = remote.remote(), remote.remote()
    assert ray.get([first.wait.remote(0), peer.wait.remote(0)]) == ["done", "done"]  # both started
    refs = [first.fail.remote(0.5), peer.wait.remote(60)]
    threading.Timer(2.0, ray.kill, (peer,)).start()  # the death shows 1.5 s after the failure
    with pytest.raises(RayActorError) as death:
        gather(refs)
    assert isinstance(death.value.__cause__, RayTaskError) and "closed by peer" in str(death.value.__cause__)
    assert peer._actor_id.hex() in str(death.value)
    with pytest.raises(RayTaskError, match="closed by peer"):  # the other call finished: no death behind it
        gather([first.fail.remote(0.1), first.wait.remote(0.5)])


def test_a_killed_engine_is_replaced_with_the_current_weights_and_one_past_its_restarts_fails(tmp_path):
    """SIGKILL the vLLM engine actor mid-job: Ray starts it again, it gets the weights the learner last
    pushed before it generates, the lost generation runs there again, and the job goes on with each
    step once. Killed again with rollout.engine_restarts = 1 used up: the job fails naming the engine."""
    run = tmp_path / "run"
    # vLLM's own processes (rollout.engine_process separate, as on a GPU): they must end with the actor
    proc = _start_tiny(run, 60, ["rollout.engine_restarts=1", "rollout.engine_process=separate"])
    try:
        engines = _actors_after_step(run, proc, 3, "RolloutEngine")
        assert len(engines) == 1
        vllm = engines[0].children(recursive=True)  # vLLM's engine-core and worker processes
        assert len(vllm) >= 2, vllm
        engines[0].kill()
        deadline = time.time() + 300  # three steps after the replacement
        while not [r for r in _rows(run) if r.get("rollout/engine_replacements") == 1.0][2:]:
            assert time.time() < deadline and proc.poll() is None, "the job did not go on after the replacement"
            time.sleep(0.2)
        # the killed engine's vLLM processes ended with it (they would hold the memory the replacement needs)
        assert not [p for p in vllm if _running(p)], [(p.pid, _cmdline(p)) for p in vllm if _running(p)]
        (replacement,) = _actors_after_step(run, proc, 1, "RolloutEngine")
        replacement.kill()
        out, _ = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    log = out.decode(errors="replace")
    assert proc.returncode != 0 and "replaced in" in log, log[-3000:]
    assert re.search(r"rollout engine 0 \(RolloutEngine actor [0-9a-f]+\) died and cannot be replaced "
                     r"\(rollout.engine_restarts = 1 used up\)", log), log[-3000:]  # fmt: skip
    rows = _rows(run)
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 6  # nothing lost, nothing twice
    assert rows[0]["rollout/engine_replacements"] == 0.0 and rows[-1]["rollout/engine_replacements"] == 1.0
    # the replacement samples from the learner's current weights: the engine's log-probs of its own samples
    # match the learner's at every step, the one it generated first included (about 3e-7 here; without the
    # weight push the replacement, 3 updates behind, was 0.23 off at that step)
    diff = [r["rollout/logprob_abs_diff"] for r in rows]
    first = next(i for i, r in enumerate(rows) if r["rollout/engine_replacements"] == 1.0)
    assert max(diff) < 1e-3 and first >= 3, (first, [f"{d:.1e}" for d in diff])


def _run_and_stall(tmp_path, role: str, settings: list[str], timeout_s: float) -> tuple[str, float]:
    """Train the tiny config, SIGSTOP one `role` actor after step 2; the output and how long after the
    stall the driver took to exit."""
    import psutil

    run = tmp_path / "run"
    proc = _start_tiny(run, 50, settings)
    stalled: list[psutil.Process] = []
    try:
        stalled = _actors_after_step(run, proc, 2, role)
        stalled[-1].suspend()  # SIGSTOP: alive, holding its connections, doing nothing
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=timeout_s + 240)
        return out.decode(errors="replace"), time.monotonic() - t0
    finally:
        for p in stalled:
            with contextlib.suppress(psutil.Error):
                p.resume()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_stalled_learner_fails_the_step_after_its_timeout_naming_the_learners(tmp_path):
    out, took = _run_and_stall(tmp_path, "Learner", ["learner.collective_timeout_s=15"], 15)
    assert "did not finish within 15 s (learner.collective_timeout_s)" in out, out[-3000:]
    assert re.search(r"Learner \d(, Learner \d)* did not finish", out), out[-3000:]
    assert took < 15 + 90, took  # the timeout, the engines' shutdown, the exit: never a hang


def test_a_stalled_rollout_engine_fails_the_step_after_its_timeout_naming_it(tmp_path):
    settings = ["rollout.generate_timeout_s=15", "learner.weight_sync_timeout_s=15"]
    out, took = _run_and_stall(tmp_path, "RolloutEngine", settings, 15)
    # stalled while generating or while loading weights: either way the engine is named
    assert re.search(r"rollout engine 0 .*did not finish .*within 15 s", out), out[-3000:]
    assert took < 15 + 90, took


def test_a_full_disk_while_checkpointing_fails_clearly_and_the_previous_checkpoint_resumes(tmp_path):
    """The run's checkpoints on a 150 MB tmpfs: the step-2 checkpoint (about 100 MB) fits, the step-4 one
    fills the disk. The job fails naming the error; the half-written step-4 directory is never picked;
    a resume from a copy of the run continues from step 2 to the end."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(run / "checkpoints")],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"a small tmpfs is how this test fills a disk, and mounting one needs root: {mounted.stderr}")
    try:
        args = [
            sys.executable, "-m", "actors.train", "--config", "examples/tiny.yaml",
            "--set", "trainer.steps=4", "--set", "trainer.save_every=2", "--set", "trainer.export_hf=false",
            "--set", 'reward.verifiers=[{type: plugin, function: "tests.toy_rewards:lowercase_fraction"}]',
        ]  # fmt: skip
        full = subprocess.run([*args, "--set", f"trainer.output_dir={run}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert full.returncode != 0
        assert re.search(
            r"CheckpointError: checkpoint of step 4 not saved to .*step_00000004: the disk is full "
            r"\(\d+\.\d MiB free there\); the previous checkpoint stays the newest",
            full.stderr,
        ), full.stderr[-3000:]
        ckpts = RunDir(run)
        assert (ckpts.checkpoint(4)).is_dir() and any(ckpts.checkpoint(4).iterdir())  # half-written, no marker
        assert [p.name for p in ckpts.complete_checkpoints()] == ["step_00000002"]
        copy = tmp_path / "copy"
        shutil.copytree(run, copy)
    finally:
        subprocess.run(["umount", str(run / "checkpoints")], capture_output=True)
    done = subprocess.run([*args, "--set", f"trainer.output_dir={copy}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {copy / 'checkpoints' / 'step_00000002'} at step 2" in done.stderr
    last = {r["step"]: r for r in _rows(copy)}  # the resumed attempt appended steps 3 and 4 again
    assert sorted(last) == [1, 2, 3, 4]
    assert [p.name for p in RunDir(copy).complete_checkpoints()] == ["step_00000002", "step_00000004"]
