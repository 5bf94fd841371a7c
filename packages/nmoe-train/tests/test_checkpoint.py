"""Checkpointer: bitwise round trips per dtype, asynchronous writes, atomic finalisation, detection
of corrupted / truncated / unfinished checkpoints with fallback to the previous good one, pruning,
two ranks with a real barrier, writer errors surfacing on the next call, and superseded steps."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from nmoe_train import checkpoint
from nmoe_train.checkpoint import (
    LATEST,
    MANIFEST,
    SHARED,
    Checkpointer,
    CheckpointError,
    rank_tensor_file,
    step_dir_name,
    verify_checkpoint,
)

DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.float8_e4m3fn, torch.float8_e5m2]


def _random(shape, dtype, gen):
    if not dtype.is_floating_point:
        return torch.randint(-(2**40), 2**40, shape, dtype=dtype, generator=gen)
    return (torch.randn(shape, generator=gen) * 10).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point and t.numel():
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
        return t.contiguous().view(bits)
    return t


def _assert_same(a: dict, b: dict, seed: int) -> None:
    assert a.keys() == b.keys(), (seed, sorted(a), sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (seed, k)
        assert torch.equal(_bits(a[k]), _bits(b[k])), (seed, k)


def _state(gen, n=3):
    return {f"w{i}.{str(dt).removeprefix('torch.')}": _random((n + i, 5), dt, gen)
            for i, dt in enumerate(DTYPES)}


@pytest.fixture
def gen():
    seed = torch.seed()
    g = torch.Generator().manual_seed(seed)
    return g


def test_round_trip_bitwise_all_dtypes(tmp_path, gen):
    seed = gen.initial_seed()
    shared = _state(gen)
    base = torch.randn(6, 8, generator=gen)
    shared["transposed_view"] = base.t()  # non-contiguous
    shared["empty"] = torch.empty(0, 4, dtype=torch.bfloat16)
    local = {"expert.w1": _random((4, 3, 2), torch.bfloat16, gen),
             "opt.step": torch.tensor(7, dtype=torch.int64)}
    meta = {"step": 5, "tokens": 123456, "rng": [1, 2, 3], "config": {"lr": 3e-4}}
    rank_meta = {"cursor": [4, 5], "epoch": 1}
    expected_shared = {k: v.clone() for k, v in shared.items()}
    expected_local = {k: v.clone() for k, v in local.items()}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, shared, local, meta, rank_meta)
        # The host copy is taken by save(): changing the originals now must not leak in.
        for t in list(shared.values()) + list(local.values()):
            if t.numel():
                t.zero_()
        base.zero_()
    path = ckpt.latest()
    assert path == tmp_path / step_dir_name(5) and ckpt.problems == []
    got_shared, got_local, got_meta, got_rank_meta = ckpt.load(path)
    _assert_same(got_shared, expected_shared, seed)
    _assert_same(got_local, expected_local, seed)
    assert got_meta == meta and got_rank_meta == rank_meta
    # Nothing but safetensors and JSON on disk (no pickle), and a complete manifest.
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted([MANIFEST, "meta.json", SHARED, "rank_00000.json",
                            "rank_00000.safetensors"])
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["step"] == 5 and manifest["world_size"] == 1
    assert "nmoe-train" in manifest["versions"] and "torch" in manifest["versions"]
    assert (tmp_path / LATEST).read_text().strip() == step_dir_name(5)


def test_empty_dicts_round_trip(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, {}, {}, {})
    shared, local, meta, rank_meta = ckpt.load(ckpt.latest())
    assert shared == {} and local == {} and meta == {} and rank_meta == {}


def test_save_is_asynchronous(tmp_path, gen):
    release, entered = threading.Event(), threading.Event()

    def slow(path: Path) -> None:
        entered.set()
        assert release.wait(30), "test never released the writer"

    ckpt = Checkpointer(tmp_path)
    ckpt._before_write = slow
    local = {"x": torch.randn(64, 64, generator=gen)}
    ckpt.save(100, {"s": torch.ones(3)}, local, {"step": 100})
    # save() returned while the writer is blocked inside its first file.
    assert entered.wait(30)
    assert ckpt._thread is not None and ckpt._thread.is_alive()
    assert (tmp_path / "step_0000100.tmp").is_dir()
    assert not (tmp_path / "step_0000100").exists()
    assert ckpt.latest() is None
    assert any("step_0000100.tmp" in p and "unfinished" in p for p in ckpt.problems)
    release.set()
    ckpt.wait()
    assert ckpt.latest() == tmp_path / "step_0000100"
    assert not (tmp_path / "step_0000100.tmp").exists()
    _assert_same(ckpt.load(tmp_path / "step_0000100")[1], local, gen.initial_seed())
    ckpt.close()


def _save_steps(root, steps, gen, keep_last=None):
    saved = {}
    with Checkpointer(root, keep_last=keep_last) as ckpt:
        for step in steps:
            shared = {"w": torch.randn(32, generator=gen)}
            local = {"e": torch.randn(16, generator=gen).to(torch.bfloat16)}
            ckpt.save(step, shared, local, {"step": step})
            saved[step] = ({k: v.clone() for k, v in shared.items()},
                           {k: v.clone() for k, v in local.items()})
    return ckpt, saved


def test_unfinished_tmp_and_missing_manifest_are_skipped(tmp_path, gen):
    ckpt, _ = _save_steps(tmp_path, [1], gen)
    # A save that crashed mid-way, and a directory whose manifest was lost.
    (tmp_path / "step_0000003.tmp").mkdir()
    (tmp_path / "step_0000003.tmp" / "shared.safetensors").write_bytes(b"partial")
    (tmp_path / "step_0000002").mkdir()
    (tmp_path / LATEST).unlink()  # no pointer: every directory is a candidate
    assert ckpt.latest() == tmp_path / "step_0000001"
    assert any(p.startswith("step_0000003.tmp: unfinished") for p in ckpt.problems), ckpt.problems
    assert any(p.startswith(f"step_0000002: {MANIFEST} is missing") for p in ckpt.problems)


def test_corrupted_and_truncated_files_fall_back(tmp_path, gen, caplog):
    ckpt, saved = _save_steps(tmp_path, [1, 2, 3], gen)
    # Flip one byte of step 3's rank file: same size, different sha256.
    bad = tmp_path / step_dir_name(3) / rank_tensor_file(0)
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0x40
    bad.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        assert ckpt.latest() == tmp_path / step_dir_name(2)
    assert ckpt.problems == [f"step_0000003: {rank_tensor_file(0)}: sha256 does not match "
                             f"{MANIFEST} (corrupted)"]
    assert "step_0000003" in caplog.text and rank_tensor_file(0) in caplog.text
    # Without checksums the flipped byte goes unnoticed, but load() verifies what it reads.
    assert verify_checkpoint(tmp_path / step_dir_name(3), checksums=False) == []
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        ckpt.load(tmp_path / step_dir_name(3))
    # Truncate step 2's shared file: reported by size, fall back to step 1.
    trunc = tmp_path / step_dir_name(2) / SHARED
    trunc.write_bytes(trunc.read_bytes()[:-7])
    assert ckpt.latest() == tmp_path / step_dir_name(1)
    assert any(p.startswith(f"step_0000002: {SHARED}: ") and "truncated" in p
               for p in ckpt.problems), ckpt.problems
    shared, local, meta, _ = ckpt.load(tmp_path / step_dir_name(1))
    _assert_same(shared, saved[1][0], gen.initial_seed())
    _assert_same(local, saved[1][1], gen.initial_seed())
    assert meta == {"step": 1}


def test_keep_last_prunes_oldest(tmp_path, gen):
    ckpt, saved = _save_steps(tmp_path, [10, 20, 30, 40, 50], gen, keep_last=2)
    dirs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert dirs == [step_dir_name(40), step_dir_name(50)]
    assert ckpt.latest() == tmp_path / step_dir_name(50)
    _assert_same(ckpt.load(tmp_path / step_dir_name(40))[0], saved[40][0], gen.initial_seed())


def test_two_ranks_with_barrier(tmp_path, gen):
    barrier = threading.Barrier(2, timeout=60)
    shared = {"dense": torch.randn(8, 8, generator=gen), "bias": torch.randn(4, generator=gen)}
    locals_ = [{"expert": torch.randn(r + 2, 3, generator=gen).to(torch.bfloat16)}
               for r in range(2)]
    errors = []

    def rank_main(rank: int) -> None:
        try:
            with Checkpointer(tmp_path, rank=rank, world_size=2, barrier=barrier.wait) as ckpt:
                for step in (7, 8, 8):  # step 8 twice: the re-save must not race the rename
                    # Rank 1 passes different "shared" tensors: only rank 0's may be written.
                    mine = shared if rank == 0 else {k: v + 1 for k, v in shared.items()}
                    ckpt.save(step, mine, locals_[rank], {"step": step}, {"cursor": rank * 10})
                    ckpt.wait()
                    # Once wait() returns on any rank, the checkpoint is final (rank 0 cannot
                    # replace it before this rank reaches the next save's first barrier).
                    assert (tmp_path / step_dir_name(step) / MANIFEST).is_file()
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    path = tmp_path / step_dir_name(8)
    assert Checkpointer(tmp_path, rank=0, world_size=2, barrier=lambda: None).latest() == path
    for rank in range(2):
        ckpt = Checkpointer(tmp_path, rank=rank, world_size=2, barrier=lambda: None)
        got_shared, got_local, meta, rank_meta = ckpt.load(path)
        _assert_same(got_shared, shared, gen.initial_seed())
        _assert_same(got_local, locals_[rank], gen.initial_seed())
        assert meta == {"step": 8} and rank_meta == {"cursor": rank * 10}
    with pytest.raises(CheckpointError, match="resharding .* not supported yet"):
        Checkpointer(tmp_path).load(path)


def test_one_rank_failing_raises_on_both_without_deadlock(tmp_path):
    barrier = threading.Barrier(2, timeout=60)
    results: dict[int, BaseException | None] = {}

    def rank_main(rank: int) -> None:
        ckpt = Checkpointer(tmp_path, rank=rank, world_size=2, barrier=barrier.wait)
        if rank == 1:
            def fail(path: Path) -> None:
                raise OSError(28, "No space left on device")
            ckpt._before_write = fail
        ckpt.save(3, {"a": torch.ones(2)}, {"b": torch.ones(2)}, {})
        try:
            ckpt.wait()
            results[rank] = None
        except CheckpointError as e:
            results[rank] = e

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert "No space left on device" in str(results[1])
    assert "ranks [1] did not finish" in str(results[0])
    assert (tmp_path / "step_0000003.tmp").is_dir() and not (tmp_path / "step_0000003").exists()


def test_writer_error_surfaces_on_next_call_and_recovers(tmp_path, gen):
    ckpt = Checkpointer(tmp_path)

    def fail(path: Path) -> None:
        raise OSError(28, f"No space left on device: {path.name}")

    ckpt._before_write = fail
    ckpt.save(1, {"a": torch.ones(2)}, {}, {})  # returns: the error is in the writer thread
    ckpt._before_write = None
    with pytest.raises(CheckpointError, match="No space left on device: shared.safetensors"):
        ckpt.save(2, {"a": torch.full((2,), 2.0)}, {}, {"step": 2})
    # The error was reported once; the next save and close work and step 1 is never listed.
    ckpt.save(2, {"a": torch.full((2,), 2.0)}, {}, {"step": 2})
    ckpt.close()
    assert ckpt.latest() == tmp_path / step_dir_name(2)
    assert torch.equal(ckpt.load(ckpt.latest())[0]["a"], torch.full((2,), 2.0))
    assert ckpt.problems == []  # step 1's .tmp was pruned as abandoned when step 2 finalised
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.save(3, {}, {}, {})


def test_resume_from_older_step_supersedes_newer_ones(tmp_path, gen):
    _, saved = _save_steps(tmp_path, [100, 200, 300], gen)
    # A run resumed from step 100 writes step 200 again: its step 200 replaces the old one and
    # the old step 300 (another timeline) is no longer `latest`.
    new_shared = {"w": torch.randn(32, generator=gen)}
    with Checkpointer(tmp_path, keep_last=None) as ckpt:
        ckpt.save(200, new_shared, {"e": torch.zeros(1)}, {"step": 200, "resumed": True})
    assert ckpt.latest() == tmp_path / step_dir_name(200)
    assert any(p.startswith("step_0000300: newer than step_0000200") for p in ckpt.problems)
    shared, _, meta, _ = ckpt.load(ckpt.latest())
    _assert_same(shared, new_shared, gen.initial_seed())
    assert meta["resumed"] is True


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="barrier"):
        Checkpointer(tmp_path, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        Checkpointer(tmp_path, rank=2, world_size=2, barrier=lambda: None)
    with pytest.raises(ValueError, match="keep_last"):
        Checkpointer(tmp_path, keep_last=0)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match=r"local\['x'\]"):
            ckpt.save(1, {}, {"x": [1, 2]}, {})
        with pytest.raises(TypeError, match="meta is not JSON-serializable"):
            ckpt.save(1, {}, {}, {"rng": torch.ones(1)})
        with pytest.raises(ValueError, match="step"):
            ckpt.save(-1, {}, {}, {})
    with pytest.raises(CheckpointError, match="no manifest.json"):
        ckpt.load(tmp_path / "nowhere")


@pytest.mark.gpu
def test_round_trip_from_cuda(tmp_path, gen):
    shared = {k: v.cuda() for k, v in _state(gen).items()}
    local = {"x": torch.randn(1000, 1000, generator=gen).cuda()[:, ::2]}  # non-contiguous
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):  # the second save reuses the pinned buffers
            ckpt.save(step, shared, local, {"step": step})
            torch.cuda.synchronize()
            expected = ({k: v.cpu() for k, v in shared.items()},
                        {k: v.cpu() for k, v in local.items()})
            for t in shared.values():
                if t.dtype in (torch.float32, torch.int64):
                    t.add_(1)  # the next step saves different values
    got_shared, got_local, _, _ = ckpt.load(ckpt.latest(), device="cuda")
    assert all(t.is_cuda for t in got_shared.values())
    _assert_same({k: v.cpu() for k, v in got_shared.items()}, expected[0], gen.initial_seed())
    _assert_same({k: v.cpu() for k, v in got_local.items()}, expected[1], gen.initial_seed())


def test_same_step_saved_twice_keeps_the_second(tmp_path, gen, caplog):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(10, {"w": torch.zeros(4)}, {}, {"n": 1})
        second = torch.randn(4, generator=gen)
        with caplog.at_level("INFO", logger="nmoe_train.checkpoint"):
            ckpt.save(10, {"w": second}, {}, {"n": 2})
            ckpt.wait()
    assert not any(r.levelname == "WARNING" for r in caplog.records)
    shared, _, meta, _ = ckpt.load(ckpt.latest())
    assert torch.equal(shared["w"], second) and meta == {"n": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, step_dir_name(10)]


def test_a_stop_signal_during_publish_is_held_until_latest_points_at_the_new_step(
        tmp_path, gen, monkeypatch):
    """Ctrl-C (or the trainer's SIGTERM, which raises the same way) right after the new
    directory is renamed into place used to skip the ``latest`` update: a resume then ignored the
    newest checkpoint. The signal now waits for the publish and is raised after it."""
    ckpt, _ = _save_steps(tmp_path, [2], gen)
    rename = os.rename

    def rename_then_interrupt(src, dst):
        rename(src, dst)
        if Path(dst).name == step_dir_name(4):
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(checkpoint.os, "rename", rename_then_interrupt)
    # Python's own SIGINT handler, also where pytest was started with SIGINT ignored (a
    # background job or nohup), where the held signal would rightly be ignored again.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ckpt = Checkpointer(tmp_path, keep_last=None)
        ckpt.save(4, {"w": torch.randn(32, generator=gen)}, {}, {"step": 4})
        with pytest.raises(KeyboardInterrupt):
            ckpt.wait()
        assert (tmp_path / LATEST).read_text().strip() == step_dir_name(4)
        assert ckpt.latest() == tmp_path / step_dir_name(4)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ckpt.close()
    finally:
        signal.signal(signal.SIGINT, outer)
