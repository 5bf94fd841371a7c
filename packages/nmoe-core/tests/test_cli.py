"""The `n` dispatcher: verb listing, dispatch, unknown and broken verbs, `n info`, the installed
console script, and that `n --help` does not import torch."""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import nmoe_core
from nmoe_core import cli
from nmoe_core.cli import Command, main


@pytest.fixture
def fake_verbs(monkeypatch):
    """Add verbs `echo` (returns 7, records its args), `broken` and `notacommand`."""
    calls = []
    module = types.ModuleType("nmoe_fake_verbs")
    module.echo = Command("echo", "repeat the arguments", lambda args: calls.append(args) or 7)
    module.not_a_command = object()
    monkeypatch.setitem(sys.modules, "nmoe_fake_verbs", module)
    extra = [
        importlib.metadata.EntryPoint("echo", "nmoe_fake_verbs:echo", cli.ENTRY_POINT_GROUP),
        importlib.metadata.EntryPoint("broken", "nmoe_fake_missing:cmd", cli.ENTRY_POINT_GROUP),
        importlib.metadata.EntryPoint("notacommand", "nmoe_fake_verbs:not_a_command",
                                      cli.ENTRY_POINT_GROUP),
    ]
    real = importlib.metadata.entry_points

    def entry_points(**kwargs):
        found = list(real(**kwargs))
        return found + extra if kwargs.get("group") == cli.ENTRY_POINT_GROUP else found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return calls


def test_help_lists_installed_verbs(capsys):
    for argv in ([], ["--help"], ["-h"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "usage: n VERB" in out
        line = next(x for x in out.splitlines() if x.strip().startswith("info "))
        assert cli.info_command.summary in line and "[nmoe-core]" in line


def test_dispatch_passes_arguments_and_exit_code(fake_verbs, capsys):
    assert main(["echo", "a", "--b=1"]) == 7
    assert fake_verbs == [["a", "--b=1"]]
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "repeat the arguments" in out
    assert "broken: cannot load nmoe_fake_missing:cmd" in out
    assert "not a nmoe_core.cli.Command" in out
    assert main(["broken"]) == 1
    assert "ModuleNotFoundError" in capsys.readouterr().err


def test_unknown_verb_suggests_nearest(capsys):
    assert main(["inof"]) == 2
    err = capsys.readouterr().err
    assert "unknown verb 'inof'" in err and "Did you mean `n info`?" in err
    assert main(["zzzzzzzz"]) == 2
    assert "Did you mean" not in capsys.readouterr().err


def test_info_reports_versions(capsys):
    import torch

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"nmoe-core {nmoe_core.__version__}" in out
    assert f"python: {platform.python_version()}" in out
    assert f"torch: {torch.__version__}" in out
    assert "nmoe_kernels._C:" in out and "cutlass (CuTeDSL):" in out and "comm backends:" in out
    assert main(["info", "--help"]) == 0
    assert main(["info", "extra"]) == 2


def test_installed_console_script():
    script = shutil.which("n") or str(Path(sys.executable).parent / "n")
    if not Path(script).exists():
        pytest.skip("the `n` console script is not installed (pip install -e packages/nmoe-core)")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "info" in result.stdout and "[nmoe-core]" in result.stdout


def test_help_does_not_import_torch():
    code = (
        "import sys, nmoe_kernels\n"
        "before = 'torch' in sys.modules\n"
        "from nmoe_core.cli import main\n"
        "main(['--help'])\n"
        "print('TORCH', before, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    before, after = result.stdout.strip().splitlines()[-1].split()[1:]
    if before == "True":
        pytest.skip("nmoe_kernels itself imports torch; nothing left for the dispatcher to avoid")
    assert after == "False", "`n --help` imported torch (a command module imports it eagerly)"
