"""The code verifier runs model output in a real bubblewrap sandbox (Debian's bubblewrap, installed
by make setup): hostile programs score 0 and leave the worker and the machine as they were."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import psutil
import pytest

from actors.common.config import CodeVerifier, RewardConfig
from actors.reward.pool import RewardWorker
from actors.reward.sandbox import UID_BASE, SandboxLimits, check_sandbox, run_python
from actors.reward.verifiers import build_verifier, extract_program, io_cases

GOOD = "```python\ndef add(a, b):\n    return a + b\n```"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


def _code_score(completion: str, answer: str = TESTS, **limits: object) -> float:
    _, _, score = build_verifier(CodeVerifier.model_validate(limits), timeout_s=5)
    return score(completion, answer, "")


def _sandbox_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real >= UID_BASE]


def test_the_sandbox_runs_here():
    check_sandbox()  # raises with the reason (bubblewrap missing, no user namespaces) when it cannot


def test_a_correct_program_scores_1_and_a_wrong_one_0():
    assert _code_score(GOOD) == 1.0
    assert _code_score(GOOD.replace("a + b", "a - b")) == 0.0
    assert _code_score("no code at all") == 0.0  # the whole completion is run: a syntax error


def test_input_output_cases_score_the_share_passed():
    cases = json.dumps([{"input": "abc\n", "output": "cba"}, {"input": "xy\n", "output": "yx"},
                        {"input": "q\n", "output": "no"}])  # fmt: skip
    assert io_cases(cases) == [("abc\n", "cba"), ("xy\n", "yx"), ("q\n", "no")]
    program = "```python\nprint(input()[::-1])\n```"
    assert _code_score(program, cases) == pytest.approx(2 / 3)  # the third expects "no", the program prints "q"
    assert io_cases(TESTS) is None  # test code, not cases
    # a Python literal (how a JSONL list answer reaches the verifier after str()) is read too
    assert io_cases(str([{"input": "1", "output": "1"}])) == [("1", "1")]


def test_extract_program_takes_the_last_fenced_block():
    text = "first\n```python\nx = 1\n```\nthen\n```py\nx = 2\n```\n"
    assert extract_program(text) == "x = 2\n"
    assert extract_program("print(1)") == "print(1)"


@pytest.mark.parametrize(
    "attack, limit",
    [
        ("while True:\n    pass", "cpu"),
        ("import time\ntime.sleep(60)", "wall clock"),
        ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", "processes"),
        ("import sys\nsys.stdout.write('x' * (100 * 1024 * 1024))", "output"),
        ("x = bytearray(4 * 1024 ** 3)", "memory"),
    ],
)
def test_resource_attacks_score_0_within_bounds(attack, limit):
    t0 = time.monotonic()
    assert _code_score(f"```python\n{attack}\n```\n", "", cpu_s=2) == 0.0, limit
    assert time.monotonic() - t0 < 20, f"the {limit} attack was not stopped in time"
    # nothing of it is left running, and the next program runs as usual
    deadline = time.monotonic() + 10
    while _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _sandbox_processes(), f"{limit}: sandbox processes outlived the run"
    assert _code_score(GOOD) == 1.0


def test_no_network_not_even_the_hosts_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.2)
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
        result = run_python(program, SandboxLimits())
        assert not result.ok and "Connection refused" in result.output, result
        with pytest.raises(TimeoutError):
            server.accept()  # nothing reached the host's listener
    assert _code_score(f"```python\n{program}```") == 0.0


def test_nothing_outside_the_scratch_dir_is_readable_or_writable(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("owner data")
    secret.chmod(0o644)
    reads = [str(secret), "/etc/passwd", "/etc/hostname", os.path.expanduser("~/.bashrc")]
    for path in reads:
        result = run_python(f"print(open({path!r}).read())", SandboxLimits())
        assert not result.ok and "owner data" not in result.output, (path, result)
    target = tmp_path / "planted"
    for path in [str(target), "/usr/planted", "/planted", "/tmp/planted"]:
        result = run_python(f"open({path!r}, 'w').write('x')", SandboxLimits())
        assert not result.ok, (path, result)
    assert not target.exists() and not os.path.exists("/usr/planted")
    # the scratch dir is writable, to a limit, and private to one run
    first = run_python("open('/scratch/note', 'w').write('hi'); print(open('/scratch/note').read())", SandboxLimits())
    assert first.ok and first.output.strip() == "hi"
    assert not run_python("open('/scratch/note').read()", SandboxLimits()).ok
    big = run_python("open('/scratch/big', 'wb').write(b'x' * (8 << 20))", SandboxLimits(max_file_bytes=1 << 20))
    assert not big.ok and "File too large" in big.output
    assert _code_score(f"```python\nprint(open({str(secret)!r}).read())\n```") == 0.0


def test_the_environment_is_empty():
    os.environ["FORKRL_TEST_SECRET"] = "leak-me"
    try:
        own = run_python("import os; print(sorted(os.environ))", SandboxLimits())
        # the sandbox's PID 1 is bwrap's init, which the program may read: it must hold nothing either
        init = run_python("print(open('/proc/1/environ').read())", SandboxLimits())
    finally:
        del os.environ["FORKRL_TEST_SECRET"]
    for result in (own, init):
        assert result.ok and "FORKRL_TEST_SECRET" not in result.output and "leak-me" not in result.output, result


def test_a_reward_worker_survives_a_batch_of_attacks():
    worker = RewardWorker(RewardConfig.model_validate({"verifiers": [{"type": "code", "cpu_s": 1}], "timeout_s": 4}))
    items = [
        ("```python\nwhile True: pass\n```", TESTS, ""),
        ("```python\nimport os\nwhile True:\n    os.fork()\n```", TESTS, ""),
        (GOOD, TESTS, ""),
        ("```python\nprint('x' * 10**8)\n```", TESTS, ""),
    ]
    threads_before = threading.active_count()
    rewards, metrics = worker.score(items)
    assert rewards == [0.0, 0.0, 1.0, 0.0]
    assert metrics["reward/errors"] == 0.0
    assert threading.active_count() <= threads_before + 4  # the verifier pool, nothing more
