"""Run untrusted Python (a model's program) in a bubblewrap sandbox with resource limits.

The `code` verifier runs what the model wrote, so it is treated as hostile:
- bubblewrap (Debian's `bubblewrap`, the sandbox Flatpak uses) gives it new user, PID, network,
  IPC and UTS namespaces: no network but its own loopback, no view of other processes, and a
  root file system holding only /usr read-only (the interpreter and its standard library) and a
  size-limited tmpfs /scratch, its working directory, which vanishes with it. Nothing of the host
  (the run directory, data, tokens, /etc) is visible; the environment is empty (bwrap itself starts
  with none of the worker's, since the program can read its init's /proc/1/environ).
- prlimit (util-linux) sets CPU seconds, address space, file size, open files and the number of
  processes. When the worker runs as root, the program runs as an otherwise unused uid (setpriv),
  so the process limit counts its processes alone and a fork bomb stops at it.
- The wall-clock limit kills the sandbox (bwrap --die-with-parent takes every process of its PID
  namespace with it); output beyond `max_output_bytes` kills it too.
What the program does is a result (`ok=False` on any failure or limit), never an exception that
could stop the worker; only a sandbox that cannot start at all raises SandboxUnavailable, which
the reward worker checks once when it starts (`check_sandbox`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import selectors
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

__all__ = ["SandboxLimits", "SandboxResult", "run_python", "check_sandbox", "SandboxUnavailable"]

UID_BASE = 200_000  # sandbox uids when the worker is root: UID_BASE + 16 * (pid % 4096) + slot
INTERPRETER = "python3"  # found on the sandbox's PATH, /usr/local/bin:/usr/bin (the system Python)
_slots = itertools.count()
_slot_lock = threading.Lock()


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot run here (not installed, or no user namespaces)."""


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0
    cpu_s: float = 5.0
    memory_mb: int = 512
    max_processes: int = 32
    max_output_bytes: int = 65536
    max_file_bytes: int = 1 << 20
    scratch_mb: int = 16


@dataclass(frozen=True)
class SandboxResult:
    exit_code: int | None  # None: killed (wall clock or output limit)
    output: str  # stdout and stderr, at most max_output_bytes
    timed_out: bool = False
    output_exceeded: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.output_exceeded


def _uid_and_nproc(limits: SandboxLimits) -> tuple[list[str], int]:
    """setpriv prefix and RLIMIT_NPROC: as root, a fresh uid that owns nothing else; otherwise the
    worker's own uid, whose processes already count against the limit."""
    if os.geteuid() == 0:
        with _slot_lock:
            slot = next(_slots) % 16
        uid = UID_BASE + 16 * (os.getpid() % 4096) + slot
        return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"], limits.max_processes
    import psutil

    mine = sum(1 for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == os.getuid())
    return [], mine + limits.max_processes


def _command(limits: SandboxLimits, program_fd: int, args: list[str]) -> list[str]:
    prefix, nproc = _uid_and_nproc(limits)
    memory = limits.memory_mb << 20
    rlimits = [f"--cpu={max(1, int(limits.cpu_s + 0.999))}", f"--as={memory}", f"--nproc={nproc}",
               f"--fsize={limits.max_file_bytes}", "--nofile=64", "--core=0"]  # fmt: skip
    system = []
    for link in ("/bin", "/lib", "/lib64", "/sbin"):  # merged-/usr systems have them as symlinks
        if os.path.islink(link):
            system += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            system += ["--ro-bind", link, link]
    return [
        *prefix, "prlimit", *rlimits, "--",
        "bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv",
        "--setenv", "PATH", "/usr/local/bin:/usr/bin", "--setenv", "HOME", "/scratch",
        "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
        "--ro-bind", "/usr", "/usr", *system, "--proc", "/proc", "--dev", "/dev",
        "--size", str(limits.scratch_mb << 20), "--tmpfs", "/scratch",
        "--file", str(program_fd), "/scratch/main.py", "--chdir", "/scratch", "--remount-ro", "/",
        "--", INTERPRETER, "-I", "-S", "/scratch/main.py", *args,
    ]  # fmt: skip


def run_python(program: str, limits: SandboxLimits, stdin: str = "") -> SandboxResult:
    """Run `program` (Python source) in the sandbox, feeding it `stdin`."""
    fd = os.memfd_create("main.py")
    try:
        os.write(fd, program.encode("utf-8", "replace"))
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            proc = subprocess.Popen(
                _command(limits, fd, []), pass_fds=(fd,), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
                # bwrap's own init (PID 1 of the sandbox) keeps the environment it was started with, and the
                # program can read /proc/1/environ: start it with nothing of the worker's environment
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )  # fmt: skip
        except OSError as e:
            raise SandboxUnavailable(f"cannot start the sandbox: {e}") from e
    finally:
        os.close(fd)
    return _collect(proc, stdin.encode("utf-8", "replace"), limits)


def _collect(proc: subprocess.Popen[bytes], stdin: bytes, limits: SandboxLimits) -> SandboxResult:
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(stdin)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass  # the program exited (or ignores its input): its output still counts
    out = bytearray()
    deadline = time.monotonic() + limits.wall_s
    timed_out = exceeded = False
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if not sel.select(timeout=left):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
            if len(out) > limits.max_output_bytes:
                exceeded = True
                break
    if timed_out or exceeded:
        _kill(proc)
    try:
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # output closed but the process lingers
        timed_out = True
        _kill(proc)
        code = None
    proc.stdout.close()
    text = bytes(out[: limits.max_output_bytes]).decode("utf-8", "replace")
    return SandboxResult(None if (timed_out or exceeded) else code, text, timed_out, exceeded)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the sandbox's process group; bwrap's death takes its PID namespace with it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def check_sandbox() -> None:
    """Raise SandboxUnavailable with the reason when a trivial program cannot run in the sandbox."""
    missing = [tool for tool in ("bwrap", "prlimit") if shutil.which(tool) is None]
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        missing.append("setpriv")
    if missing:
        raise SandboxUnavailable(
            f"the code verifier needs {', '.join(missing)} (Debian packages bubblewrap and util-linux; "
            "make setup installs them)"
        )
    result = run_python("print(6 * 7)", SandboxLimits(wall_s=30))
    if not result.ok or result.output.strip() != "42":
        raise SandboxUnavailable(
            f"the bubblewrap sandbox does not run here (exit {result.exit_code}): {result.output.strip()[:500]} "
            "- it needs unprivileged user namespaces, or a worker running as root, and the system python3"
        )
