"""The code verifier runs model output in a real bubblewrap sandbox (Debian's bubblewrap, installed
by make setup): hostile programs score 0 and leave the worker and the machine as they were."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time

import psutil
import pytest

from actors.common.config import RewardConfig
from actors.common.verifier_config import CodeVerifier
from actors.reward import sandbox
from actors.reward.pool import RewardWorker
from actors.reward.sandbox import UID_BASE, SandboxLimits, SandboxUnavailable, check_sandbox, run_python
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


# Fills each directory given with 1 MiB files (each under the default max_file_bytes) and prints how many
# it wrote there and what stopped it: RLIMIT_FSIZE bounds one file, only the mount's size bounds them all.
FILLER = """
import os, sys
for where in sys.argv[1:]:
    written, error = 0, "-"
    try:
        for i in range(64):
            with open(os.path.join(where, f"forkrl-fill-{i}"), "wb") as f:
                f.write(b"x" * (1 << 20))
            written += 1
    except OSError as e:
        error = e.strerror
    print(f"{where}|{written}|{error}")
"""


def _fill(*where: str) -> dict[str, tuple[int, str]]:
    """MiB written and the error that stopped the writer, per directory, in one sandboxed program."""
    result = run_python(f"import sys\nsys.argv[1:] = {list(where)!r}\n{FILLER}", SandboxLimits())
    assert result.ok, result.output
    rows = [line.split("|") for line in result.output.splitlines()]
    return {path: (int(mib), error) for path, mib, error in rows}


@pytest.mark.parametrize("where", ["/dev/shm", "/dev", "/tmp", "/scratch"])
def test_writable_mounts_are_bounded(where):
    # the review's attack: /dev and /dev/shm were tmpfs mounts of half the host's RAM (a GiB in under a second)
    mib, error = _fill(where)[where]
    limit = SandboxLimits().scratch_mb
    assert mib < limit, f"{where}: the program wrote {mib} MiB (the sandbox's writable total is {limit} MiB)"
    assert error in ("No space left on device", "Read-only file system", "No such file or directory"), error
    assert not os.path.exists(os.path.join(where, "forkrl-fill-0")), f"{where}: the program's file is on the host"


def test_the_writable_total_is_the_scratch_limit():
    # /dev/shm and /scratch share scratch_mb: filling one and then the other stops at it, not at twice it
    filled = _fill("/dev/shm", "/scratch")
    assert filled["/dev/shm"][0] >= 1, filled  # multiprocessing's semaphores still have room
    assert sum(mib for mib, _ in filled.values()) < SandboxLimits().scratch_mb, filled


ATTACK = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def call(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(nr, *args)
    if r == 0 and nr == 56:  # the child of a raw clone(2) without CLONE_VM: a copy of this process
        os._exit(0)
    print(errno.errorcode.get(ctypes.get_errno(), "?") if r == -1 else f"allowed ({r})")


"""
# x86_64 syscall numbers (asm/unistd_64.h); each call would succeed, or fail with another errno, unfiltered
SYSCALLS = {
    "ptrace": "call(101, 0, 0, 0, 0)",  # PTRACE_TRACEME
    "process_vm_readv": "call(310, os.getpid(), None, 0, None, 0, 0)",
    "keyctl": "call(250, 1, None)",  # KEYCTL_JOIN_SESSION_KEYRING: a new anonymous session keyring
    "add_key": "call(248, b'user', b'k', b'v', 1, -3)",  # into the session keyring
    "unshare": "call(272, 0x10000000 | 0x20000)",  # CLONE_NEWUSER | CLONE_NEWNS: caps in a new user namespace
    "clone(CLONE_NEWUSER)": "call(56, 0x10000000 | 17, 0, 0, 0, 0)",  # | SIGCHLD
    "setns": "call(308, -1, 0)",  # EBADF unfiltered
    # the nested user namespace's way to an unbounded tmpfs: both steps must fail
    "mount": "call(272, 0x10000000 | 0x20000)\ncall(165, b'none', b'/scratch', b'tmpfs', 0, b'size=1g')",
    "bpf": "call(321, 0, ctypes.create_string_buffer(72), 72)",  # BPF_MAP_CREATE
    "io_uring_setup": "call(425, 1, ctypes.create_string_buffer(120))",
    "shmget": "call(29, 0, 256 << 20, 0o1600)",  # SysV shared memory: RAM outside every bounded mount
    "socket(AF_NETLINK)": "call(41, 16, 3, 0)",  # SOCK_RAW, NETLINK_ROUTE
}


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 syscall numbers")
@pytest.mark.parametrize("name", list(SYSCALLS))
def test_the_seccomp_filter_denies_what_a_verifier_never_needs(name):
    result = run_python(ATTACK + SYSCALLS[name], SandboxLimits())
    errnos = result.output.split()
    assert result.ok and errnos and set(errnos) <= {"EPERM", "EAFNOSUPPORT"}, (name, result.output)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 machine code")
def test_a_syscall_of_the_32_bit_abi_kills_the_program():
    # int 0x80 takes syscall numbers from the i386 table, which the x86_64 rules do not name
    program = """
import ctypes, mmap
buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(b"\\xb8\\x14\\x00\\x00\\x00\\xcd\\x80\\xc3")  # mov eax, 20 (i386 getpid); int 0x80; ret
print(ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))(), flush=True)
"""
    result = run_python(program, SandboxLimits())
    assert result.exit_code == 128 + signal.SIGSYS and result.output == "", result


def test_without_python3_seccomp_the_sandbox_fails_closed(monkeypatch):
    # the venv's interpreter is a real python3 without libseccomp's bindings
    monkeypatch.setattr(sandbox, "SECCOMP_PYTHON", sys.executable)
    sandbox.seccomp_filter.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="python3-seccomp"):
            check_sandbox()
        with pytest.raises(SandboxUnavailable, match="No module named 'seccomp'"):
            run_python("print(1)", SandboxLimits())  # no filter, no program run
    finally:
        sandbox.seccomp_filter.cache_clear()


NORMAL = """
import multiprocessing, os, socket, subprocess, sys, tempfile, threading
results = []
threads = [threading.Thread(target=results.append, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert sorted(results) == [0, 1, 2, 3]
out = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True, check=True)
assert out.stdout.strip() == "42"
pid = os.fork()
if pid == 0:
    os._exit(7)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7
with multiprocessing.Pool(2) as pool:  # its locks are POSIX semaphores in /dev/shm
    assert pool.map(abs, [-1, -2]) == [1, 2]
with tempfile.NamedTemporaryFile("w") as f:
    f.write("x")
with open("/scratch/note", "w") as f:
    f.write("y")
a, b = socket.socketpair()
a.sendall(b"z")
assert b.recv(1) == b"z"
status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
assert status["Seccomp"].strip() == "2", status["Seccomp"]  # the filter is on
"""


def test_a_normal_program_still_runs_under_the_filter():
    result = run_python(NORMAL, SandboxLimits())
    assert result.ok, result.output
    assert _code_score(f"```python\n{NORMAL}\ndef add(a, b):\n    return a + b\n```") == 1.0
