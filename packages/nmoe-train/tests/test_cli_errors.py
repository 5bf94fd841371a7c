"""What ``n train``, ``n speedrun``, ``n mon`` and ``n viz`` do with a user's mistakes: one
``error:`` line naming the field and the fix, found before training starts, and nothing already
written is lost (checkpoints refused rather than overwritten, a run stopped by Ctrl-C or an
error finalises its last checkpoint and says how it ended)."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

import pytest

from nmoe_train.cli import speedrun_main, train_main
from nmoe_train.config import preset_config
from nmoe_train.data import prepare
from nmoe_train.monitor import mon_main
from nmoe_train.report import viz_main
from nmoe_train.testing import SMALL, run_n, start_n_until


def _args(data_root: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return ["tiny", *SMALL, f"data.data_root={data_root}", f"runs_root={runs}",
            f"run_name={name}", *extra]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _files(directory: Path) -> dict[str, bytes]:
    return {str(f.relative_to(directory)): f.read_bytes()
            for f in sorted(directory.rglob("*")) if f.is_file()}


def _run_status(run_dir: Path) -> tuple[str, dict]:
    with sqlite3.connect(run_dir / "metrics.db") as conn:
        status, results = conn.execute("SELECT status, results_json FROM runs").fetchone()
    return status, json.loads(results or "{}")


def _words_doc(i: int) -> str:
    return " ".join(("the cat sat on the mat while a dog ran far " * 8).split()[i % 5:])


def test_data_problems_are_one_line_before_training(tmp_path, data_root, capsys):
    docs = "".join(json.dumps({"text": _words_doc(i)}) + "\n" for i in range(40))
    (tmp_path / "docs.jsonl").write_text(docs)
    prepare(tmp_path / "docs.jsonl", tmp_path / "no_val", val_fraction=0.0, progress=False)
    prepare(tmp_path / "docs.jsonl", tmp_path / "o200k", "o200k_base", progress=False)
    cases = [
        ('data.sources=[{"path": "%s"}]' % (tmp_path / "missing"),
         f"{tmp_path / 'missing'}/manifest.json: no manifest (the directory does not exist); "
         f"prepare it with `n data prep SOURCE --out {tmp_path / 'missing'}`"),
        ('data.sources=[{"path": "%s"}]' % (tmp_path / "docs.jsonl"),
         f"{tmp_path / 'docs.jsonl'} is a file, not a prepared dataset directory; tokenize it "
         f"with `n data prep {tmp_path / 'docs.jsonl'} --out DIR`"),
        # An empty val split used to fail at the first validation, after training had begun.
        ('data.sources=[{"path": "%s"}]' % (tmp_path / "no_val"),
         f"{tmp_path / 'no_val'}: split 'val' has 0 tokens"),
        (f"data.val_source={tmp_path / 'missing'}", "no manifest (the directory does not exist)"),
        # o200k ids in a gpt2 model used to be an IndexError in the embedding.
        ('data.sources=[{"path": "%s"}]' % (tmp_path / "o200k"),
         f"{tmp_path / 'o200k'} was prepared with tokenizer o200k_base (200019 ids) but the "
         f"model has model.tokenizer=gpt2"),
        ("micro_batch=3", "micro_batch=3 must divide the per-rank batch 8"),
        # Unwritable roots used to be raw OSError tracebacks.
        (f"data.data_root={tmp_path / 'docs.jsonl'}",
         f"cannot build the builtin dataset 'shakespeare' under data.data_root="
         f"{tmp_path / 'docs.jsonl'} (File exists"),
    ]
    for i, (override, message) in enumerate(cases):
        run = f"r{i}"
        assert train_main(_args(data_root, tmp_path, run, "steps=2", "val_every=1",
                                override)) == 2, override
        line = _error_line(capsys)
        assert message in line, (override, line)
        # Nothing started, and the failed setup left no empty run directory behind.
        assert not (tmp_path / run).exists(), f"{override}: {list((tmp_path / run).iterdir())}"
    blocked = tmp_path / "docs.jsonl" / "runs"
    assert train_main([*_args(data_root, tmp_path, "r", "steps=2"), f"runs_root={blocked}"]) == 2
    assert _error_line(capsys) == (
        f"error: cannot create the run directory {blocked / 'r'} (Not a directory): set "
        f"runs_root to a writable directory")


def test_runs_with_checkpoints_are_refused_not_overwritten(tmp_path, data_root, capsys):
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    base = _args(data_root, tmp_path, "run", "val_every=0", "checkpoint_every=2")
    assert train_main([*base, "steps=4"]) == 0
    capsys.readouterr()
    kept = _files(ckpts)
    assert {"step_0000002/manifest.json", "step_0000004/manifest.json"} <= set(kept)

    # A changed config names what changed (and no longer suggests resume=false).
    assert train_main([*base, "steps=6", "optim.lr_dense=1e-2", "seed=3"]) == 2
    line = _error_line(capsys)
    lr = preset_config("tiny").optim.lr_dense
    assert f"optim.lr_dense: {lr} -> 0.01; seed: 0 -> 3. Undo the change" in line, line
    assert "resume=false" not in line and _files(ckpts) == kept

    # resume=false would start at step 0 and replace step_0000002 / prune the rest.
    assert train_main([*base, "steps=6", "resume=false"]) == 2
    line = _error_line(capsys)
    assert "holds checkpoints (step_0000002, step_0000004) and resume=false would overwrite" in line
    assert _files(ckpts) == kept

    # Every checkpoint damaged: starting over would overwrite them; refuse and name each.
    for step in ("step_0000002", "step_0000004"):
        data = bytearray((ckpts / step / "shared.safetensors").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (ckpts / step / "shared.safetensors").write_bytes(bytes(data))
    damaged = _files(ckpts)
    assert train_main([*base, "steps=6"]) == 2
    line = _error_line(capsys)
    assert "no usable checkpoint in" in line and line.count("sha256 does not match") == 2, line
    assert _files(ckpts) == damaged
    assert _run_status(run_dir)[0] == "completed"  # the first run's record is untouched


@pytest.mark.parametrize("signum,code,said", [(signal.SIGINT, 130, "interrupted at step"),
                                               (signal.SIGTERM, 143, "terminated (SIGTERM) at")],
                         ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_finalises_the_last_checkpoint_and_resumes(tmp_path, data_root, signum,
                                                                 code, said):
    # Ctrl-C, and SIGTERM as a job scheduler sends it to stop or preempt a job.
    args = _args(data_root, tmp_path, "run", "val_every=0", "checkpoint_every=2")
    marker = tmp_path / "run" / "checkpoints" / "step_0000006" / "manifest.json"
    proc = start_n_until(["train", *args, "steps=100000"], tmp_path, marker)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err and said in err, err[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names  # the pending save was finalised
    newest = [n for n in names if n.startswith("step_")][-1]
    assert (ckpts / "latest").read_text().strip() == newest
    assert f"to resume from {ckpts / newest}, rerun with the same config and run_name=run" in err
    status, results = _run_status(tmp_path / "run")
    assert status == "interrupted" and results["steps"] >= int(newest[5:]), (status, results)
    steps = int(newest[5:]) + 1
    resumed = run_n(["train", *args, f"steps={steps}"], tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpts / newest} at step {steps - 1}" in resumed.stderr
    assert _run_status(tmp_path / "run")[0] == "completed"


def test_options_may_come_between_overrides(capsys):
    assert train_main(["tiny", "steps=3", "--print-config", "seed=5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 3 and printed["seed"] == 5


def test_speedrun_checks_the_leaderboard_first_and_reports_no_val_loss(tmp_path, data_root,
                                                                      capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "LEADERBOARD.json").write_text("{not json")
    assert speedrun_main(["--leaderboard", "--runs-root", str(runs)]) == 2
    assert "LEADERBOARD.json is not valid JSON" in _error_line(capsys)
    # The runs_root= override names the board as --runs-root does (it used to read ./runs).
    assert speedrun_main(["--leaderboard", f"runs_root={runs}"]) == 2
    assert "LEADERBOARD.json is not valid JSON" in _error_line(capsys)
    args = ["tiny", *SMALL, f"data.data_root={data_root}", "--runs-root", str(runs), "steps=3"]
    assert speedrun_main(args) == 2  # before any training: no run directory appears
    assert "LEADERBOARD.json is not valid JSON" in _error_line(capsys)
    assert sorted(p.name for p in runs.iterdir()) == ["LEADERBOARD.json"]
    # Stopped by max_time_s before its first validation: no val loss to print (was a TypeError).
    (runs / "LEADERBOARD.json").unlink()
    assert speedrun_main([*args, "val_every=100", "max_time_s=1e-9"]) == 1
    assert "did NOT reach target 4.9 (val loss none) in 1 steps" in capsys.readouterr().err
    entry = json.loads((runs / "LEADERBOARD.json").read_text())["runs"][0]
    assert entry["final_loss"] is None and entry["steps"] == 1


def test_mon_and_viz_on_a_file_that_is_not_a_metrics_db(tmp_path, capsys):
    (tmp_path / "metrics.db").write_text("not a database\n" * 100)
    assert viz_main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"n viz: cannot read {tmp_path / 'metrics.db'} (file is not a "
                          "database); pass a run directory") and "Traceback" not in err, err
    assert mon_main(["--once", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == f"n mon: cannot read {tmp_path / 'metrics.db'} (file is not a database)\n"
