"""The sandbox kills what it must within its limits and reports each case."""

from __future__ import annotations

import os
import socket

import pytest

from nmoe_eval.sandbox import OUTPUT_LIMIT, capabilities, run_python

CAPS = capabilities()


def _group_members(marker: str) -> list[int]:
    """Running processes whose command line holds ``marker`` (zombies excluded)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"{entry.path}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"{entry.path}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmd and state != b"Z":
            found.append(int(entry.name))
    return found


def test_passing_and_failing_programs():
    ok = run_python("print(sum(range(10)))", timeout_s=10)
    assert ok.status == "passed" and ok.stdout == "45\n" and ok.returncode == 0
    bad = run_python("assert 1 == 2", timeout_s=10)
    assert bad.status == "failed" and "AssertionError" in bad.stderr


def test_infinite_loop_hits_the_wall_clock():
    res = run_python("while True:\n    pass\n", timeout_s=1.0, cpu_s=30)
    assert res.status == "timeout" and res.returncode is None
    assert 1.0 <= res.elapsed_s < 3.0


def test_infinite_loop_hits_the_cpu_limit():
    res = run_python("while True:\n    pass\n", timeout_s=20, cpu_s=1)
    assert res.status == "cpu_limit" and res.elapsed_s < 5.0


def test_memory_hog_hits_the_memory_limit():
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))\n"
    res = run_python(code, timeout_s=10, memory_mb=256)
    assert res.status == "memory_limit" and res.elapsed_s < 5.0, res


@pytest.mark.parametrize("code", [
    "import sys\nwhile True:\n    sys.stdout.write('y' * 65536)\n",
    "import sys\nwhile True:\n    sys.stderr.write('e' * 65536)\n",
    "with open('big.bin', 'wb') as f:\n    for _ in range(64):\n        f.write(b'x' * 2**20)\n",
])
def test_writing_past_the_file_size_limit_is_output_limit(code):
    """Python ignores SIGXFSZ, so the write fails with EFBIG (before: reported as ``failed``)."""
    res = run_python(code, timeout_s=10)
    assert res.status == "output_limit" and res.elapsed_s < 5.0, res
    assert len(res.stdout.encode()) <= OUTPUT_LIMIT and len(res.stderr.encode()) <= OUTPUT_LIMIT
    plain = run_python("import sys\nsys.stdout.write('y' * 1000)\nsys.exit(1)\n", timeout_s=10)
    assert plain.status == "failed" and plain.stdout == "y" * 1000


def test_sleeping_children_die_with_the_group():
    code = ("import os, sys, time\n"
            "for _ in range(3):\n"
            "    if os.fork() == 0:\n"
            "        os.execv(sys.executable, [sys.executable, '-c', "
            "'import time; time.sleep(60)  # nmoe-sleeper'])\n"
            "print('forked', flush=True)\n")
    res = run_python(code, timeout_s=10)
    assert res.status == "passed" and res.stdout == "forked\n"
    assert _group_members("nmoe-sleeper") == []


@pytest.mark.skipif(not CAPS["processes"], reason="RLIMIT_NPROC cannot be enforced here "
                    "(root without a runnable unprivileged interpreter); a fork bomb would hurt")
def test_fork_bomb_is_contained():
    code = ("import os\nblocked = False\nwhile True:\n    try:\n        os.fork()\n"
            "    except OSError:\n        if not blocked:\n            blocked = True\n"
            "            print('blocked', flush=True)\n")
    res = run_python(code, timeout_s=2.0, max_processes=16)
    assert res.status in ("timeout", "cpu_limit") and res.elapsed_s < 5.0, res
    assert "blocked" in res.stdout  # the process limit stopped the forks
    assert "processes" in res.enforced


def test_no_inherited_secrets_and_a_private_directory(monkeypatch):
    monkeypatch.setenv("NMOE_TEST_SECRET_TOKEN", "hunter2")
    code = ("import os\nprint(sorted(os.environ))\nprint(os.getcwd() == os.environ['HOME'])\n"
            "open('scratch.txt', 'w').write('x')\nprint(os.listdir('.'))\n")
    res = run_python(code, timeout_s=10)
    assert res.status == "passed", res
    assert "hunter2" not in res.stdout and "NMOE_TEST_SECRET_TOKEN" not in res.stdout
    lines = res.stdout.splitlines()
    assert lines[1] == "True" and sorted(eval(lines[2])) == ["program.py", "scratch.txt"]


@pytest.mark.skipif(not CAPS["network"], reason="no network namespace can be created here")
def test_network_is_cut():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), "
                f"timeout=2)\n    print('connected')\nexcept OSError as e:\n    print('blocked')\n")
        res = run_python(code, timeout_s=10)
        assert res.stdout.strip() == "blocked", res
        allowed = run_python(code, timeout_s=10, network=True)
        assert allowed.stdout.strip() == "connected", allowed
    finally:
        server.close()
