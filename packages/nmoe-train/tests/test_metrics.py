"""MetricsDB: buffered writes against a dict reference, flush triggers, latest-value-wins, several
runs in one file, plain-SQL access, WAL readers alongside the writer, resume, rank gating and the
TensorBoard mirror."""

from __future__ import annotations

import math
import random
import sqlite3
import sys
import time
import types

import pytest

from nmoe_train.metrics import (
    MetricsDB,
    TensorBoardSink,
    latest_values,
    list_runs,
    read_run,
    read_series,
)

KEYS = ["train/loss", "val/loss", "throughput/tokens_per_s", "router/layer_01/cv",
        "router/layer_02/cv"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rng():
    seed = time.time_ns()
    r = random.Random(seed)
    r.seed_value = seed
    return r


def _fill(db: MetricsDB, rng: random.Random, steps: int) -> dict[str, dict[int, float]]:
    """Log random values (some keys only at some steps); return the reference {key: {step: v}}."""
    ref: dict[str, dict[int, float]] = {}
    for step in range(steps):
        values = {k: rng.uniform(-5, 5) for k in KEYS if rng.random() < 0.7}
        db.log(step, values)
        for k, v in values.items():
            ref.setdefault(k, {})[step] = v
    return ref


def _as_series(ref: dict[str, dict[int, float]]) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted(v.items()) for k, v in sorted(ref.items())}


def test_round_trip_buffered_until_flush(tmp_path, rng):
    clock = FakeClock()
    db = MetricsDB(tmp_path / "metrics.db", flush_rows=10**6, flush_seconds=3600, clock=clock,
                   tensorboard=False)
    db.start_run("run_a", "tiny", {"model": {"dim": 64}, "lr": 3e-4}, "fp123", world_size=2)
    ref = _fill(db, rng, 50)
    assert read_series(tmp_path) == {}, "rows must stay buffered until a flush is due"
    db.flush()
    assert read_series(tmp_path) == _as_series(ref), rng.seed_value
    assert read_series(tmp_path, keys=["router/layer_*/cv"]) == \
        {k: v for k, v in _as_series(ref).items() if k.startswith("router/")}
    expected_latest = {k: max(v.items()) for k, v in ref.items()}
    assert latest_values(tmp_path, "run_a") == dict(sorted(expected_latest.items()))
    assert latest_values(tmp_path, keys=["val/loss"]) == {"val/loss": expected_latest["val/loss"]}
    db.finish("completed", {"final_loss": 2.5, "stop_reason": "steps"})
    db.close()
    run = read_run(tmp_path)
    assert run["status"] == "completed" and run["results"]["final_loss"] == 2.5
    assert run["config"] == {"model": {"dim": 64}, "lr": 3e-4} and run["fingerprint"] == "fp123"
    assert run["world_size"] == 2 and run["started_at"] == clock.now


def test_flush_triggers_rows_and_seconds(tmp_path):
    clock = FakeClock()
    db = MetricsDB(tmp_path / "m.db", flush_rows=6, flush_seconds=10, clock=clock,
                   tensorboard=False)
    db.start_run("r", "r", {}, "f", 1)
    db.log(0, {"a": 1.0, "b": 2.0})
    db.log(1, {"a": 1.0, "b": 2.0})
    assert read_series(tmp_path / "m.db") == {}
    db.log(2, {"a": 1.0, "b": 2.0})  # 6 rows: flushed
    assert len(read_series(tmp_path / "m.db")["a"]) == 3
    db.log(3, {"a": 4.0})
    assert len(read_series(tmp_path / "m.db")["a"]) == 3
    clock.now += 10
    db.log(4, {"a": 5.0})  # 10 s since the last flush: flushed
    assert read_series(tmp_path / "m.db")["a"][-2:] == [(3, 4.0), (4, 5.0)]
    db.close()


def test_repeated_step_key_keeps_latest(tmp_path, rng):
    db = MetricsDB(tmp_path / "metrics.db", tensorboard=False)
    db.start_run("r", "r", {}, "f", 1)
    first, second, third = (rng.random() for _ in range(3))
    db.log(7, {"train/loss": first})
    db.log(7, {"train/loss": second})  # same buffer
    db.flush()
    assert read_series(tmp_path)["train/loss"] == [(7, second)]
    db.log(7, {"train/loss": third})  # across flushes
    db.close()
    assert read_series(tmp_path)["train/loss"] == [(7, third)]
    with sqlite3.connect(tmp_path / "metrics.db") as conn:
        assert conn.execute("select count(*) from metrics").fetchone()[0] == 1


def test_two_runs_one_db_and_plain_sql(tmp_path, rng):
    clock = FakeClock()
    refs = {}
    for run_id in ("run_1", "run_2"):
        with MetricsDB(tmp_path / "metrics.db", clock=clock, tensorboard=False) as db:
            db.start_run(run_id, f"name {run_id}", {"seed": run_id}, run_id + "fp", 1)
            refs[run_id] = _fill(db, rng, 20)
            db.finish("completed", {})
        clock.now += 100
    runs = list_runs(tmp_path)
    assert [r["run_id"] for r in runs] == ["run_1", "run_2"]
    assert [r["status"] for r in runs] == ["completed", "completed"]
    for run_id, ref in refs.items():
        assert read_series(tmp_path, run_id) == _as_series(ref), rng.seed_value
    assert read_series(tmp_path) == _as_series(refs["run_2"])  # default: most recent run
    # Plain SQL, no nmoe code: what a user would type into sqlite3.
    conn = sqlite3.connect(tmp_path / "metrics.db")
    rows = conn.execute("select step, value from metrics where run_id = 'run_1' and "
                        "key = 'train/loss' order by step").fetchall()
    assert rows == sorted(refs["run_1"]["train/loss"].items())
    names = {r[0] for r in conn.execute("select name from sqlite_master where type = 'index'")}
    assert "metrics_run_key_step" in names
    conn.close()


def test_wal_reader_does_not_block_writer(tmp_path):
    db = MetricsDB(tmp_path / "metrics.db", flush_rows=1, busy_timeout_ms=200,
                   tensorboard=False)
    db.start_run("r", "r", {}, "f", 1)
    db.log(0, {"x": 1.0})
    reader = sqlite3.connect(tmp_path / "metrics.db", isolation_level=None)
    assert reader.execute("pragma journal_mode").fetchone()[0] == "wal"
    reader.execute("begin")
    assert reader.execute("select count(*) from metrics").fetchone()[0] == 1
    # A reader holds an open read transaction; the writer commits without waiting for it.
    t0 = time.monotonic()
    db.log(1, {"x": 2.0})
    assert time.monotonic() - t0 < 0.2
    assert reader.execute("select count(*) from metrics").fetchone()[0] == 1  # its snapshot
    reader.execute("commit")
    assert reader.execute("select count(*) from metrics").fetchone()[0] == 2
    # The read-only API works while the writer is open.
    assert read_series(tmp_path)["x"] == [(0, 1.0), (1, 2.0)]
    reader.close()
    db.close()


def test_resume_appends_and_nan_round_trips(tmp_path):
    clock = FakeClock()
    with MetricsDB(tmp_path / "metrics.db", clock=clock, tensorboard=False) as db:
        db.start_run("r", "r", {}, "f", 1)
        db.log(1, {"loss": 3.0})
        db.log(2, {"loss": float("nan"), "inf": float("inf")})
    assert read_run(tmp_path)["status"] == "running"  # closed without finish: a crash
    started = read_run(tmp_path)["started_at"]
    clock.now += 50
    with MetricsDB(tmp_path / "metrics.db", clock=clock, tensorboard=False) as db:
        db.start_run("r", "r", {}, "f", 1)
        db.log(2, {"loss": 2.5})
        db.log(3, {"loss": 2.0})
        db.log(4, {"loss": 1.9, "extra": 1.0})
    clock.now += 50
    # Resumed again, from a checkpoint at step 2: steps 3 and 4 of the stopped attempt go.
    with MetricsDB(tmp_path / "metrics.db", clock=clock, tensorboard=False) as db:
        db.start_run("r", "r", {}, "f", 1, resume_step=2)
        assert read_series(tmp_path)["loss"] == [(1, 3.0), (2, 2.5)]
        assert "extra" not in read_series(tmp_path)
        db.log(3, {"loss": 2.0})
        db.finish("completed", {"final_loss": 2.0})
    series = read_series(tmp_path)
    assert series["loss"] == [(1, 3.0), (2, 2.5), (3, 2.0)]
    assert series["inf"] == [(2, math.inf)]
    run = read_run(tmp_path)
    assert run["started_at"] == started and run["ended_at"] == clock.now
    assert len(list_runs(tmp_path)) == 1
    with MetricsDB(tmp_path / "n.db", tensorboard=False) as db:
        db.start_run("n", "n", {}, "f", 1)
        db.log(0, {"nan": float("nan")})
    assert math.isnan(read_series(tmp_path / "n.db")["nan"][0][1])


def test_nonzero_rank_writes_nothing(tmp_path):
    db = MetricsDB(tmp_path / "metrics.db", rank=1)
    db.start_run("r", "r", {}, "f", 2)
    db.log(0, {"x": 1.0})
    db.finish("completed", {})
    db.close()
    assert not (tmp_path / "metrics.db").exists() and not db.enabled


def test_bad_input_is_named(tmp_path):
    with MetricsDB(tmp_path / "metrics.db", tensorboard=False) as db:
        with pytest.raises(RuntimeError, match="before start_run"):
            db.log(0, {"x": 1.0})
        db.start_run("r", "r", {}, "f", 1)
        with pytest.raises(TypeError, match="'x' at step 3"):
            db.log(3, {"x": "abc"})
        with pytest.raises(ValueError, match="step"):
            db.log(-1, {"x": 1.0})
        with pytest.raises(ValueError, match="status"):
            db.finish("running")
    with pytest.raises(FileNotFoundError, match="no metrics database"):
        read_series(tmp_path / "elsewhere")


def test_tensorboard_sink_absent_and_present(tmp_path, monkeypatch):
    sink = TensorBoardSink(tmp_path / "tb")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert not sink.available
        sink.add(0, {"x": 1.0})  # a no-op
    sink.close()

    calls = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def add_scalar(self, tag, value, global_step):
            calls.append((tag, value, global_step))

        def flush(self):
            calls.append(("flush",))

        def close(self):
            calls.append(("close",))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    with MetricsDB(tmp_path / "run" / "metrics.db", flush_rows=2) as db:
        db.start_run("r", "r", {}, "f", 1)
        db.log(5, {"train/loss": 1.5, "lr/dense": 0.01})
    assert calls == [("init", str(tmp_path / "run" / "tensorboard")),
                     ("train/loss", 1.5, 5), ("lr/dense", 0.01, 5), ("flush",), ("close",)]


def test_read_series_max_points_averages_step_ranges(tmp_path, rng):
    with MetricsDB(tmp_path / "metrics.db", tensorboard=False) as db:
        db.start_run("r", "r", {}, "f", 1)
        steps = sorted(rng.sample(range(10, 5000), 700))
        values = {s: rng.uniform(0, 10) for s in steps}
        for s in steps:
            db.log(s, {"a": values[s], "short": 1.0} if s == steps[0] else {"a": values[s]})
    max_points = 37
    got = read_series(tmp_path, keys=["a", "short"], max_points=max_points)
    assert got["short"] == [(steps[0], 1.0)]  # fewer points than max_points: unchanged
    lo, hi = steps[0], steps[-1]
    bins: dict[int, list[int]] = {}
    for s in steps:  # reference: the same equal step ranges, in Python
        bins.setdefault((s - lo) * max_points // (hi - lo + 1), []).append(s)
    expected = [(max(b), sum(values[s] for s in b) / len(b)) for _, b in sorted(bins.items())]
    assert len(got["a"]) == len(expected) <= max_points
    for (gs, gv), (es, ev) in zip(got["a"], expected, strict=True):
        # float64 sums of <= 700 values in [0, 10]: SQLite and Python may add in a different
        # order, so allow a few ulps of the bin sum.
        assert gs == es and abs(gv - ev) <= 1e-12 * max(1.0, abs(ev)), (rng.seed_value, gs)
    assert read_series(tmp_path, keys=["a"], max_points=10**6)["a"] == sorted(values.items())
