"""The training loop end to end on CPU: data parallel equals one process, exact resume after a
real kill, corrupted checkpoints refused, the tiny speedrun writes its leaderboard entry."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

import pytest

from nmoe_train.testing import SMALL, run_n, start_n_until


def _losses(run_dir: Path) -> dict[int, float]:
    with sqlite3.connect(run_dir / "metrics.db") as conn:
        rows = conn.execute(
            "SELECT step, value FROM metrics WHERE key = 'train/loss' ORDER BY step"
        ).fetchall()
    return dict(rows)


def _args(data_root: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return ["train", "tiny", *SMALL, f"data.data_root={data_root}", f"runs_root={runs}",
            f"run_name={name}", *extra]


def test_data_parallel_matches_single_process(tmp_path, data_root):
    """2 gloo ranks x 4 sequences == 1 process x 8 sequences: same objective, same losses."""
    common = ["steps=5", "val_every=5", "optim.use_muon=true"]
    single = run_n(_args(data_root, tmp_path, "single", *common), tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = run_n(_args(data_root, tmp_path, "multi", *common), tmp_path, torchrun=2)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "multi")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        # Same sequences and the same global normalisation; only the float32 summation order of
        # gradients differs between the two layouts.
        assert abs(a[step] - b[step]) <= 2e-4 * abs(a[step]), (step, a[step], b[step])
    assert a[5] < a[1]


def test_expert_parallel_matches_single_process(tmp_path, data_root):
    """Experts split over 2 gloo ranks (nccl backend over gloo) == all experts in one process."""
    common = ["steps=4", "val_every=4"]
    single = run_n(_args(data_root, tmp_path, "single", *common), tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ep = run_n(_args(data_root, tmp_path, "ep", *common, "parallel.expert_parallel=all",
                     "parallel.dispatcher=nccl"), tmp_path, torchrun=2)
    assert ep.returncode == 0, ep.stderr[-3000:]
    assert "dispatcher nccl" in ep.stderr
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "ep")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 2e-4 * abs(a[step]), (step, a[step], b[step])


@pytest.mark.multigpu
@pytest.mark.parametrize("dispatcher", ["ipc", "nccl", "ipc+per-slot"])
def test_expert_parallel_on_two_gpus_tracks_one_gpu(tmp_path, data_root, dispatcher):
    """`n train` with the experts split over 2 GPUs (one dispatcher shared by the MoE layers)
    against 1 GPU. In bf16 autocast a changed summation order moves the losses by more than
    float32 rounding, so the bound is calibrated in the same test: 2-GPU data parallel (no
    expert parallelism) against the same 1-GPU run, and expert parallel may differ by at most
    4x that gap plus 1e-4 of the loss. ``ipc`` runs the defaults (``parallel.reduce_on_owner``:
    its bf16 partial sums must stay inside the same bound); ``ipc+per-slot`` one row per slot
    both ways (``reduce_on_owner=false dedup_rows=false``); nccl ignores both options."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        pytest.skip(f"needs 2 GPUs, {count} visible")
    common = ["steps=4", "val_every=4", "model.n_layers=3"]
    env = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1",
           "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    single = run_n(_args(data_root, tmp_path, "single", *common), tmp_path, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    dp = run_n(_args(data_root, tmp_path, "dp", *common), tmp_path, env=env, torchrun=2)
    assert dp.returncode == 0, dp.stderr[-3000:]
    backend, _, per_slot = dispatcher.partition("+")
    options = ["parallel.reduce_on_owner=false", "parallel.dedup_rows=false"] if per_slot else []
    owner = backend == "ipc" and not per_slot
    ep = run_n(_args(data_root, tmp_path, "ep", *common, "parallel.expert_parallel=all",
                     f"parallel.dispatcher={backend}", *options), tmp_path, env=env, torchrun=2)
    assert ep.returncode == 0, ep.stderr[-3000:]
    assert f"dispatcher {backend}" in ep.stderr
    assert ("(sums on owners)" in ep.stderr) == bool(owner)
    a, b, c = (_losses(tmp_path / name) for name in ("single", "dp", "ep"))
    assert sorted(a) == sorted(b) == sorted(c) == [1, 2, 3, 4]
    for step in a:
        gap = abs(a[step] - b[step])
        assert abs(a[step] - c[step]) <= 4 * gap + 1e-4 * abs(a[step]), (
            step, a[step], b[step], c[step])


def test_exact_resume_after_kill(tmp_path, data_root):
    """Kill a run (SIGKILL) after its step-3 checkpoint; the resumed run's per-step losses equal
    an uninterrupted run's bitwise."""
    steps = ["steps=8", "val_every=0", "checkpoint_every=3"]
    full = run_n(_args(data_root, tmp_path, "full", *steps), tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]

    marker = tmp_path / "killed" / "checkpoints" / "step_0000006" / "manifest.json"
    proc = start_n_until(_args(data_root, tmp_path, "killed", *steps, "steps=1000"), tmp_path,
                         marker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_n(_args(data_root, tmp_path, "killed", *steps), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    want, got = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 9))
    assert got == want, {s: (got[s], want[s]) for s in got if got[s] != want[s]}


def test_corrupted_checkpoint_is_refused_by_name(tmp_path, data_root):
    args = _args(data_root, tmp_path, "run", "steps=4", "val_every=0", "checkpoint_every=2")
    first = run_n(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    newest = ckpts / "step_0000004" / "shared.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    again = run_n(args[:-3] + ["steps=5", "val_every=0", "checkpoint_every=2"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step_0000004" in again.stderr and "shared.safetensors" in again.stderr
    assert "resumed from" in again.stderr and "step_0000002" in again.stderr


def test_eval_every_logs_eval_metrics(tmp_path, data_root):
    """Evaluations run in-process on schedule through nmoe-eval's hook; results reach the DB."""
    args = _args(data_root, tmp_path, "ev", "steps=4", "val_every=0", "eval_every=2",
                 "eval_tasks=arc_easy", "eval_max_examples=6")
    result = run_n(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with sqlite3.connect(tmp_path / "ev" / "metrics.db") as conn:
        rows = conn.execute(
            "SELECT step, value FROM metrics WHERE key = 'eval/arc_easy/acc' ORDER BY step"
        ).fetchall()
    assert [step for step, _ in rows] == [2, 4]
    assert all(0.0 <= value <= 1.0 for _, value in rows)


def test_bad_override_is_a_clear_error(tmp_path):
    bad = run_n(["train", "tiny", "stepz=3"], tmp_path)
    assert bad.returncode == 2 and "did you mean steps" in bad.stderr


@pytest.mark.slow
def test_speedrun_tiny_shortened_writes_leaderboard(tmp_path, data_root):
    """The README's first command, shortened: 40 steps of the tiny preset."""
    result = run_n(["speedrun", "tiny", f"data.data_root={data_root}", "steps=40",
                    "val_every=20", "target_loss=6.3", "cpu_threads=2", "eval_max_examples=10"],
                   tmp_path,
                   env={"OMP_NUM_THREADS": "2"}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    board = json.loads((tmp_path / "runs" / "LEADERBOARD.json").read_text())
    entry = board["runs"][-1]
    assert entry["config"] == "tiny" and entry["target_reached"] is True
    # 6.3 is below the corpus's unigram entropy (6.43 nats/token).
    assert entry["final_loss"] <= 6.3 and entry["hardware"] == "cpu"
    # The end-of-speedrun CORE run (offline subset through nmoe-eval's training hook).
    assert entry["core_score"] is not None and entry["core_tasks"] >= 10
    assert {"config", "hardware", "n_gpus", "dtype", "final_loss", "tokens", "steps",
            "wall_time_s", "target_reached", "date", "run_id"} <= set(entry)
    run_dir = tmp_path / "runs" / entry["run_id"]
    losses = _losses(run_dir)
    assert losses[max(losses)] < losses[1] - 2.0
    printed = run_n(["speedrun", "--leaderboard", "--runs-root", str(tmp_path / "runs")],
                    tmp_path)
    assert entry["run_id"] in printed.stdout
