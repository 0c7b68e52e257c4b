"""Run untrusted Python (a model's program) in a bubblewrap sandbox with resource limits.

The `code` verifier runs what the model wrote, so it is treated as hostile:
- bubblewrap (Debian's `bubblewrap`, the sandbox Flatpak uses) gives it new user, PID, network,
  IPC and UTS namespaces: no network but its own loopback, no view of other processes, and a
  root file system holding only /usr read-only (the interpreter and its standard library), and
  no view of the host (the run directory, data, tokens, /etc); the environment is empty (bwrap
  itself starts with none of the worker's, since the program can read its init's /proc/1/environ).
- Every writable mount is a size-limited tmpfs that vanishes with the run, and together they hold
  `scratch_mb`: /scratch (its working directory, 7/8 of it) and /dev/shm (1/8; multiprocessing's
  semaphores live there). bwrap's /dev and root tmpfs (each sized at half the host's RAM) are
  read-only, and there is no /tmp (tempfile falls back to the working directory). RLIMIT_FSIZE
  bounds one file, the mounts' sizes bound them all: many programs at once cannot fill the host's RAM.
- A seccomp filter (libseccomp's, built by Debian's python3-seccomp for the system python3 and
  loaded by bwrap's --seccomp) allows everything but what a verifier program never needs, which
  fails with EPERM: debugging other processes (ptrace, process_vm_readv/writev, pidfd_getfd),
  the kernel keyring, namespaces and mounts (unshare, setns, clone with a CLONE_NEW* flag, mount,
  the new mount API, pivot_root, chroot; bwrap's --disable-userns also stops nested user
  namespaces, the way to a tmpfs of any size), bpf, perf_event_open, userfaultfd, io_uring,
  kernel modules, kexec, file handles, NUMA placement, SysV shared memory and message queues,
  POSIX message queues and memfd_create (RAM outside the bounded mounts), and sockets other than
  AF_UNIX/INET/INET6 (EAFNOSUPPORT: netlink, packet, ...). clone3 fails with ENOSYS (its flags
  sit in memory the filter cannot read), so the C library falls back to clone, whose flags it can.
  Threads, fork, subprocess and multiprocessing work as usual. Syscalls of another ABI (32-bit
  int 0x80, x32) kill the process.
- prlimit (util-linux) sets CPU seconds, address space, file size, open files and the number of
  processes. When the worker runs as root, the program runs as an otherwise unused uid (setpriv),
  so the process limit counts its processes alone and a fork bomb stops at it.
- The wall-clock limit kills the sandbox (bwrap --die-with-parent takes every process of its PID
  namespace with it); output beyond `max_output_bytes` kills it too.
What the program does is a result (`ok=False` on any failure or limit), never an exception that
could stop the worker; only a sandbox that cannot start at all (no bubblewrap, no user namespaces,
no python3-seccomp to build the filter with) raises SandboxUnavailable, which the reward worker
checks once when it starts (`check_sandbox`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import selectors
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

__all__ = ["SandboxLimits", "SandboxResult", "run_python", "check_sandbox", "seccomp_filter", "SandboxUnavailable"]

UID_BASE = 200_000  # sandbox uids when the worker is root: UID_BASE + 16 * (pid % 4096) + slot
INTERPRETER = "python3"  # found on the sandbox's PATH, /usr/local/bin:/usr/bin (the system Python)
SECCOMP_PYTHON = "/usr/bin/python3"  # Debian's, which imports its python3-seccomp (the venv's cannot)
_slots = itertools.count()
_slot_lock = threading.Lock()


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot run here (not installed, no user namespaces, no seccomp filter)."""


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0
    cpu_s: float = 5.0
    memory_mb: int = 512
    max_processes: int = 32
    max_output_bytes: int = 65536
    max_file_bytes: int = 1 << 20
    scratch_mb: int = 16  # all the writable mounts together: /scratch 7/8 of it, /dev/shm 1/8


# Syscalls a verifier program never needs, denied with EPERM (names as libseccomp 2.5 knows them).
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",  # other processes' memory
    "keyctl", "add_key", "request_key",  # the kernel keyring (shared across the uid, not namespaced)
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot",  # namespaces and mounts
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",  # new mount API
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "open_by_handle_at", "name_to_handle_at", "personality", "acct", "swapon", "swapoff", "syslog",
    "iopl", "ioperm", "quotactl", "quotactl_fd", "lookup_dcookie", "uselib", "ustat", "sysfs",
    "mbind", "set_mempolicy", "migrate_pages", "move_pages",  # NUMA placement
    "shmget", "msgget", "mq_open", "memfd_create",  # RAM outside the size-limited mounts
)  # fmt: skip
# clone(2)'s flags (its first argument on x86_64 and arm64) that make a namespace: CLONE_NEWUSER, NEWPID,
# NEWNET, NEWIPC, NEWUTS, NEWCGROUP, NEWNS; each one denies the clone
CLONE_NAMESPACES = (0x10000000, 0x20000000, 0x40000000, 0x08000000, 0x04000000, 0x02000000, 0x00020000)
SOCKET_FAMILIES = (1, 2, 10)  # AF_UNIX, AF_INET, AF_INET6; any other fails with EAFNOSUPPORT
# Run by SECCOMP_PYTHON with the rules as JSON; writes the filter as BPF to stdout, for bwrap's --seccomp.
_BUILD_FILTER = """
import errno, json, sys
import seccomp as s
rules = json.loads(sys.argv[1])
f = s.SyscallFilter(defaction=s.ALLOW)
f.set_attr(s.Attr.ACT_BADARCH, s.KILL_PROCESS)  # 32-bit int 0x80 and x32 calls would dodge the rules
for name in rules["denied"]:
    f.add_rule(s.ERRNO(errno.EPERM), name)
for flag in rules["clone_namespaces"]:
    f.add_rule(s.ERRNO(errno.EPERM), "clone", s.Arg(0, s.MASKED_EQ, flag, flag))
f.add_rule(s.ERRNO(errno.ENOSYS), "clone3")  # glibc then falls back to clone, whose flags are checked
allowed = rules["socket_families"]
for family in range(max(allowed)):
    if family not in allowed:
        f.add_rule(s.ERRNO(errno.EAFNOSUPPORT), "socket", s.Arg(0, s.EQ, family))
f.add_rule(s.ERRNO(errno.EAFNOSUPPORT), "socket", s.Arg(0, s.GT, max(allowed)))
f.export_bpf(sys.stdout)
"""


@functools.cache
def seccomp_filter() -> bytes:
    """The sandbox's seccomp filter as BPF (built once per process; the system python3 has libseccomp's
    bindings, the worker's venv does not). Raises SandboxUnavailable when it cannot be built."""
    rules = {"denied": DENIED_SYSCALLS, "clone_namespaces": CLONE_NAMESPACES, "socket_families": SOCKET_FAMILIES}
    command = [SECCOMP_PYTHON, "-I", "-c", _BUILD_FILTER, json.dumps(rules)]
    try:
        built = subprocess.run(command, capture_output=True, timeout=60, env={"PATH": "/usr/bin:/bin"}, check=False)
        errors = built.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = errors[-1] if errors else f"exit {built.returncode}, {len(built.stdout)} bytes written"
        if built.returncode == 0 and built.stdout and len(built.stdout) % 8 == 0:  # struct sock_filter: 8 bytes
            return built.stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        reason = str(e)
    raise SandboxUnavailable(
        f"the code verifier's seccomp filter cannot be built by {SECCOMP_PYTHON} ({reason[:300]}): it needs "
        "libseccomp's Python bindings, the Debian package python3-seccomp (make setup installs it)"
    )


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


def _command(limits: SandboxLimits, program_fd: int, seccomp_fd: int, args: list[str]) -> list[str]:
    prefix, nproc = _uid_and_nproc(limits)
    writable = limits.scratch_mb << 20
    shm = writable // 8
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
        "bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
        "--cap-drop", "ALL", "--seccomp", str(seccomp_fd), "--clearenv",
        "--setenv", "PATH", "/usr/local/bin:/usr/bin", "--setenv", "HOME", "/scratch",
        "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
        "--ro-bind", "/usr", "/usr", *system, "--proc", "/proc",
        # bwrap's /dev is a tmpfs of half the host's RAM: read-only, but for its own bounded /dev/shm
        "--dev", "/dev", "--size", str(shm), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
        "--size", str(writable - shm), "--tmpfs", "/scratch",
        "--file", str(program_fd), "/scratch/main.py", "--chdir", "/scratch", "--remount-ro", "/",
        "--", INTERPRETER, "-I", "-S", "/scratch/main.py", *args,
    ]  # fmt: skip


def run_python(program: str, limits: SandboxLimits, stdin: str = "") -> SandboxResult:
    """Run `program` (Python source) in the sandbox, feeding it `stdin`."""
    bpf = seccomp_filter()  # before anything runs: no filter, no sandbox
    fd, seccomp_fd = os.memfd_create("main.py"), os.memfd_create("seccomp.bpf")
    try:
        for f, data in ((fd, program.encode("utf-8", "replace")), (seccomp_fd, bpf)):
            os.write(f, data)
            os.lseek(f, 0, os.SEEK_SET)
        try:
            proc = subprocess.Popen(
                _command(limits, fd, seccomp_fd, []), pass_fds=(fd, seccomp_fd),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                # bwrap's own init (PID 1 of the sandbox) keeps the environment it was started with, and the
                # program can read /proc/1/environ: start it with nothing of the worker's environment
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )  # fmt: skip
        except OSError as e:
            raise SandboxUnavailable(f"cannot start the sandbox: {e}") from e
    finally:
        os.close(fd)
        os.close(seccomp_fd)
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
    seccomp_filter()  # raises, naming python3-seccomp, when the filter cannot be built
    result = run_python("print(6 * 7)", SandboxLimits(wall_s=30))
    if not result.ok or result.output.strip() != "42":
        raise SandboxUnavailable(
            f"the bubblewrap sandbox does not run here (exit {result.exit_code}): {result.output.strip()[:500]} "
            "- it needs unprivileged user namespaces, or a worker running as root, and the system python3"
        )
