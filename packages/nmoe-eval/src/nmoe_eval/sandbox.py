"""Run untrusted Python (model-written code) in a separate, limited process.

What `run_python` enforces, for every program:

- its own session and process group (``setsid``); the whole group is killed with SIGKILL when
  the program ends or the wall-clock limit passes, so children it forked die with it;
- a wall-clock limit (``timeout_s``), a CPU-time limit per process (``RLIMIT_CPU``), an
  address-space limit per process (``RLIMIT_AS``, ``memory_mb``), a file-size limit
  (``RLIMIT_FSIZE``, which also caps what it can print), no core dumps, at most 256 open files;
- a fresh temporary directory as working directory, ``HOME`` and ``TMPDIR``, deleted afterwards;
- an environment of only ``PATH``, ``LANG``, ``HOME``, ``TMPDIR``, ``PYTHONHASHSEED`` and
  ``PYTHONDONTWRITEBYTECODE``: nothing is inherited, so no tokens or keys leak in; Python runs
  with ``-I -S`` (isolated mode, no site-packages).

Enforced only where the operating system allows it (`SandboxResult.enforced` says which held for
a run; `capabilities` says which hold on this machine):

- ``network``: a new, empty network namespace (``unshare(CLONE_NEWNET)``): needs root, or
  unprivileged user namespaces (then a user namespace is created too);
- ``user``: when started as root, the program runs as ``nobody`` (uid/gid 65534), which makes
  ``RLIMIT_NPROC`` effective and keeps it from writing outside its directory and world-writable
  places; this needs a Python interpreter that ``nobody`` can run (found automatically);
- ``processes``: ``RLIMIT_NPROC`` (``max_processes``) against fork bombs. Linux counts every
  process of the user, and ignores the limit for root, so it holds only with ``user`` or when
  not root (then the limit is set to the user's current process count plus ``max_processes``).

Not enforced: reading world-readable files; a process that calls ``setsid`` itself leaves the
process group and survives the group kill (each process is still bound by its CPU and memory
limits); no seccomp filter or cgroup. Treat this as containment of accidents and of typical
model-written code, not as a security boundary against an adversary.

Statuses: ``passed`` (exit 0), ``failed`` (non-zero exit), ``timeout`` (wall clock),
``cpu_limit`` (SIGXCPU/SIGKILL after the CPU limit), ``memory_limit`` (MemoryError or an
allocation failure), ``output_limit`` (a write past the file-size limit: stdout or stderr full,
EFBIG, or SIGXFSZ), ``killed`` (another signal).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SandboxResult", "capabilities", "run_python"]

NOBODY = 65534
OUTPUT_LIMIT = 1 << 20  # bytes of stdout / stderr kept (and RLIMIT_FSIZE)

# Runs as the parent's user in the new session, applies the limits, then execs the program.
_BOOTSTRAP = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
done = []
libc = ctypes.CDLL(None, use_errno=True)
if cfg["network"]:
    flags = 0x40000000  # CLONE_NEWNET
    if os.geteuid() != 0:
        flags |= 0x10000000  # CLONE_NEWUSER
    if libc.unshare(flags) == 0:
        done.append("network")
for name, value in cfg["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if cfg["uid"] is not None:
    done.append("user")
if cfg["nproc_effective"] or cfg["uid"] is not None:
    done.append("processes")
with open(cfg["report"], "w") as f:  # before dropping to nobody, who cannot write there
    json.dump(done, f)
if cfg["uid"] is not None:  # a failure here raises: the run fails, nothing runs unconfined
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
os.execv(cfg["python"], [cfg["python"], "-I", "-S", "-B", cfg["program"]])
"""


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one program.

    Attributes:
        status: see the module docstring.
        returncode: the exit code, or ``-signal`` when a signal ended it (None on timeout).
        stdout, stderr: the first `OUTPUT_LIMIT` bytes of each, decoded (errors replaced).
        elapsed_s: wall-clock seconds.
        enforced: which of ``network``, ``user``, ``processes`` held for this run.
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    elapsed_s: float
    enforced: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _world_runnable(python: str) -> bool:
    """Whether ``nobody`` can run ``python`` (probed by running it as nobody)."""
    try:
        proc = subprocess.run([python, "-I", "-S", "-c", "pass"], user=NOBODY, group=NOBODY,
                              extra_groups=[], env={"PATH": "/usr/bin:/bin"}, cwd="/",
                              capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


@functools.cache
def _interpreter() -> tuple[str, int | None]:
    """``(python, uid)``: the interpreter for programs and the uid to run them as (None: keep
    the current user)."""
    current = os.path.realpath(sys.executable)
    if os.geteuid() != 0:
        return current, None
    candidates = [current, getattr(sys, "_base_executable", current),
                  shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or ""]
    for python in dict.fromkeys(c for c in candidates if c):
        if _world_runnable(python):
            return python, NOBODY
    return current, None


def _user_process_count(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.stat(entry.path).st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def capabilities() -> dict[str, bool]:
    """Which OS-dependent protections `run_python` can apply here (probed with a tiny program)."""
    result = run_python("pass", timeout_s=20)
    return {name: name in result.enforced for name in ("network", "user", "processes")}


def _classify(returncode: int | None, timed_out: bool, stderr: str, output_full: bool) -> str:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "passed"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory_limit"
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "cpu_limit"
    # Python ignores SIGXFSZ: a write past RLIMIT_FSIZE raises OSError(EFBIG) instead, whose
    # traceback may itself not fit when stderr is what filled up.
    if (returncode == -signal.SIGXFSZ or output_full
            or f"[Errno {errno.EFBIG}]" in stderr):
        return "output_limit"
    if returncode is not None and returncode < 0:
        return "memory_limit" if returncode in (-signal.SIGSEGV, -signal.SIGABRT) else "killed"
    return "failed"


def _group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still running (zombies do not count)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"{entry.path}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def _kill_group(pgid: int, rounds: int = 200) -> None:
    """SIGKILL every process of group ``pgid``, again and again: a process forked while the
    signal was being delivered escapes one round (fork bombs)."""
    for _ in range(rounds):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        if not _group_alive(pgid):
            return
        time.sleep(0.005)


def _read(path: Path) -> str:
    with path.open("rb") as f:
        return f.read(OUTPUT_LIMIT).decode("utf-8", errors="replace")


def run_python(
    code: str,
    *,
    timeout_s: float = 10.0,
    cpu_s: int | None = None,
    memory_mb: int = 1024,
    max_processes: int = 32,
    network: bool = False,
) -> SandboxResult:
    """Run ``code`` as a Python program under the limits of the module docstring.

    Args:
        code: the program's source.
        timeout_s: wall-clock limit in seconds (> 0).
        cpu_s: CPU seconds per process; default ``ceil(timeout_s) + 1``.
        memory_mb: address-space limit per process in MiB.
        max_processes: processes the program may add (fork-bomb guard, where enforceable).
        network: leave the network reachable (default: cut it where the OS allows).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    python, uid = _interpreter()
    outer = Path(tempfile.mkdtemp(prefix="nmoe-sandbox-"))  # parent-only: output files, report
    work = outer / "work"
    work.mkdir()
    try:
        program = work / "program.py"
        program.write_text(code, encoding="utf-8")
        if uid is not None:
            os.chmod(outer, 0o711)
            os.chown(work, uid, uid)
            os.chown(program, uid, uid)
        nproc = max_processes if uid is not None else (
            _user_process_count(os.geteuid()) + max_processes if os.geteuid() != 0 else None)
        limits = {
            "RLIMIT_CPU": int(cpu_s if cpu_s is not None else int(timeout_s + 0.999) + 1),
            "RLIMIT_AS": memory_mb << 20,
            "RLIMIT_FSIZE": OUTPUT_LIMIT,
            "RLIMIT_CORE": 0,
            "RLIMIT_NOFILE": 256,
        }
        if nproc is not None:
            limits["RLIMIT_NPROC"] = nproc
        cfg = {"network": not network, "limits": limits, "uid": uid, "python": python,
               "program": str(program), "report": str(outer / "report.json"),
               "nproc_effective": nproc is not None and os.geteuid() != 0}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work),
               "TMPDIR": str(work), "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.monotonic()
        with (outer / "stdout").open("wb") as out, (outer / "stderr").open("wb") as err:
            proc = subprocess.Popen(
                [python, "-I", "-S", "-c", _BOOTSTRAP, json.dumps(cfg)], cwd=work, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                close_fds=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # the program and everything it forked
                proc.wait()
        elapsed = time.monotonic() - start
        report = outer / "report.json"
        enforced = tuple(json.loads(report.read_text())) if report.is_file() else ()
        stdout, stderr = _read(outer / "stdout"), _read(outer / "stderr")
        output_full = any((outer / name).stat().st_size >= OUTPUT_LIMIT
                          for name in ("stdout", "stderr"))
        returncode = None if timed_out else proc.returncode
        return SandboxResult(_classify(returncode, timed_out, stderr, output_full), returncode,
                             stdout, stderr, elapsed, enforced)
    finally:
        shutil.rmtree(outer, ignore_errors=True)



if __name__ == "__main__":  # python -m nmoe_eval.sandbox: what this machine enforces
    print(json.dumps(capabilities()))
