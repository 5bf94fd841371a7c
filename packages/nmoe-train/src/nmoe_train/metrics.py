"""Training metrics in one SQLite file per run directory, readable with plain SQL.

Schema (``RUN_DIR/metrics.db``, WAL journal so readers such as ``n mon`` never block the trainer):

    runs(run_id TEXT PRIMARY KEY, name, started_at, ended_at, status, host, world_size,
         results_json)
    configs(run_id TEXT PRIMARY KEY, config_json, fingerprint)
    metrics(run_id, step, key, value, wall_time)    -- unique index on (run_id, key, step)

Times are Unix seconds (``datetime(started_at, 'unixepoch')`` in SQL). ``status`` is ``running``
while a run trains, then whatever `MetricsDB.finish` was given (``completed``, ``failed``, ...).
A resumed run calls `MetricsDB.start_run` with the same ``run_id`` and appends to it; logging
the same ``(step, key)`` again keeps the latest value. NaN values are stored as NULL (SQLite has
no NaN) and read back as NaN.

    sqlite3 RUN_DIR/metrics.db "select step, value from metrics where key='train/loss'"

Metric keys the trainer logs (``n mon`` and ``n viz`` are built on these): ``train/loss``,
``train/lm_loss``, ``train/mtp_loss``, ``train/aux_loss``, ``train/grad_norm``, ``val/loss``,
``throughput/tokens_per_s``, ``throughput/tokens_per_s_per_gpu``, ``throughput/ms_per_step``,
``tokens_seen``, ``lr/{dense,expert,router,muon}``, ``memory/peak_gib``, ``efficiency/mfu``, and
per MoE layer ``router/layer_{ii}/{cv,max_load,dead,bias_range}``.

Writing (`MetricsDB`) happens on rank 0 only; on other ranks every method is a no-op. Rows are
buffered and written in one transaction every ``flush_rows`` rows or ``flush_seconds`` seconds,
and at `MetricsDB.finish` / `MetricsDB.close`. Reading (`list_runs`, `read_run`, `read_series`,
`latest_values`) opens the file read-only and tolerates a writer at work.

When the ``tensorboard`` package is installed, `MetricsDB` also writes TensorBoard event files to
``RUN_DIR/tensorboard/`` through `TensorBoardSink` (install ``nmoe-train[tensorboard]``).
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

__all__ = [
    "DB_NAME",
    "MetricsDB",
    "TensorBoardSink",
    "connect_readonly",
    "latest_values",
    "list_runs",
    "read_run",
    "read_series",
    "resolve_db_path",
]

log = logging.getLogger(__name__)

DB_NAME = "metrics.db"
"""File name of the metrics database inside a run directory."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    name TEXT,
    started_at REAL,
    ended_at REAL,
    status TEXT,
    host TEXT,
    world_size INTEGER,
    results_json TEXT
);
CREATE TABLE IF NOT EXISTS configs (
    run_id TEXT PRIMARY KEY,
    config_json TEXT,
    fingerprint TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    key TEXT NOT NULL,
    value REAL,
    wall_time REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS metrics_run_key_step ON metrics (run_id, key, step);
"""

_INSERT_METRIC = """
INSERT INTO metrics (run_id, step, key, value, wall_time) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (run_id, key, step) DO UPDATE SET value = excluded.value,
                                              wall_time = excluded.wall_time
"""


def resolve_db_path(path: str | os.PathLike[str]) -> Path:
    """The database file for ``path``: ``path`` itself if it is a file (or a missing ``*.db``),
    else ``path/metrics.db`` (``path`` is a run directory)."""
    path = Path(path)
    if path.is_file() or (not path.is_dir() and path.suffix == ".db"):
        return path
    return path / DB_NAME


# -- TensorBoard ------------------------------------------------------------------------------

_tensorboard_missing_reported = False


class TensorBoardSink:
    """Mirrors scalar metrics into TensorBoard event files, when TensorBoard is installed.

    Args:
        log_dir: directory for the event files (created on first write).

    `available` is False when ``torch.utils.tensorboard`` cannot be imported (the ``tensorboard``
    package is missing); every method is then a no-op, and that is said once at debug level.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        global _tensorboard_missing_reported
        self.log_dir = Path(log_dir)
        self._writer: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            if not _tensorboard_missing_reported:
                log.debug("TensorBoard event files disabled: %s (pip install tensorboard)", e)
                _tensorboard_missing_reported = True
            return
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    @property
    def available(self) -> bool:
        return self._writer is not None

    def add(self, step: int, values: Mapping[str, float]) -> None:
        """Record ``{key: value}`` at ``step``."""
        if self._writer is None:
            return
        for key, value in values.items():
            self._writer.add_scalar(key, value, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# -- writing ----------------------------------------------------------------------------------


def _connect_writer(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=busy_timeout_ms / 1000, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    except sqlite3.OperationalError as e:
        if "locking protocol" in str(e):
            raise RuntimeError(
                f"SQLite cannot lock {path} ({e}); this filesystem (NFS, FUSE) does not support "
                "SQLite locking: put the run directory on a local disk"
            ) from e
        raise
    if mode.lower() != "wal":
        log.warning("%s: WAL journal unavailable on this filesystem (got %r); readers such as "
                    "`n mon` may briefly block the writer", path, mode)
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.executescript(_SCHEMA)
    return conn


class MetricsDB:
    """Writes one run's metrics (rank 0 only) into the SQLite file at ``path``.

    Args:
        path: the database file (conventionally ``RUN_DIR/metrics.db``); its directory is
            created. Several runs may share one file.
        rank: this process's rank; on ranks other than 0 nothing is opened or written.
        flush_rows: write the buffer once it holds this many rows (>= 1).
        flush_seconds: write the buffer at the first `log` at least this long after the last
            write (>= 0).
        busy_timeout_ms: how long a write waits for a reader's lock before giving up.
        tensorboard: also write TensorBoard event files to ``<path's dir>/tensorboard`` when the
            ``tensorboard`` package is installed.
        clock: wall clock in Unix seconds (tests pass a fake one).

    Usage: `start_run`, then `log` every step, then `finish`; `close` (or a ``with`` block).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        rank: int = 0,
        flush_rows: int = 1000,
        flush_seconds: float = 5.0,
        busy_timeout_ms: int = 5000,
        tensorboard: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if flush_rows < 1:
            raise ValueError(f"flush_rows must be >= 1, got {flush_rows}")
        if flush_seconds < 0:
            raise ValueError(f"flush_seconds must be >= 0, got {flush_seconds}")
        self.path = Path(path)
        self.rank = rank
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.run_id: str | None = None
        self._clock = clock
        self._buffer: list[tuple[str, int, str, float | None, float]] = []
        self._last_flush = clock()
        self._conn: sqlite3.Connection | None = None
        self._tb: TensorBoardSink | None = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = _connect_writer(self.path, busy_timeout_ms)
        if tensorboard:
            self._tb = TensorBoardSink(self.path.parent / "tensorboard")

    @property
    def enabled(self) -> bool:
        """True on rank 0 while open."""
        return self._conn is not None

    def start_run(
        self,
        run_id: str,
        name: str,
        config: Mapping[str, Any],
        fingerprint: str,
        world_size: int,
        resume_step: int | None = None,
    ) -> None:
        """Register (or, for a resumed run with the same ``run_id``, reopen) a run.

        Args:
            run_id: unique id of the run; a resumed run passes its original id.
            name: human-readable name (preset, experiment).
            config: the full config as a JSON-serializable dict.
            fingerprint: the config fingerprint (stored as given).
            world_size: number of ranks training.
            resume_step: the step of the checkpoint a resumed run restarts from. Rows of this
                run logged after it (by the attempt that stopped) are deleted: the resumed run
                logs those steps again, and steps it may never reach must not linger.
        """
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run_id must be a non-empty str, got {run_id!r}")
        try:
            config_json = json.dumps(config, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise TypeError(f"config for run {run_id!r} is not JSON-serializable: {e}") from e
        self.run_id = run_id
        conn = self._conn
        if conn is None:
            return
        now = self._clock()
        with _transaction(conn):
            conn.execute(
                "INSERT INTO runs (run_id, name, started_at, ended_at, status, host, world_size, "
                "results_json) VALUES (?, ?, ?, NULL, 'running', ?, ?, NULL) "
                "ON CONFLICT (run_id) DO UPDATE SET name = excluded.name, ended_at = NULL, "
                "status = 'running', host = excluded.host, world_size = excluded.world_size",
                (run_id, name, now, socket.gethostname(), int(world_size)),
            )
            old = conn.execute("SELECT fingerprint FROM configs WHERE run_id = ?",
                               (run_id,)).fetchone()
            if old is not None and old[0] != fingerprint:
                log.warning("run %s resumed with config fingerprint %s (was %s)", run_id,
                            fingerprint, old[0])
            if resume_step is not None:
                conn.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?",
                             (run_id, int(resume_step)))
            conn.execute(
                "INSERT INTO configs (run_id, config_json, fingerprint) VALUES (?, ?, ?) "
                "ON CONFLICT (run_id) DO UPDATE SET config_json = excluded.config_json, "
                "fingerprint = excluded.fingerprint",
                (run_id, config_json, fingerprint),
            )

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Buffer ``{key: value}`` at ``step``; writes when the buffer is due (see class doc).

        Args:
            step: the training step (int >= 0).
            values: metric name -> number (anything ``float()`` accepts: Python numbers, numpy
                scalars, 0-d tensors). NaN is stored as NULL.
        """
        if self._conn is None:
            return
        if self.run_id is None:
            raise RuntimeError("MetricsDB.log called before start_run")
        try:
            step_index = operator.index(step)  # ints, numpy / torch integer scalars
        except TypeError:
            step_index = -1
        if isinstance(step, bool) or step_index < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        step = step_index
        now = self._clock()
        clean: dict[str, float] = {}
        for key, value in values.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"metric names must be non-empty str, got {key!r}")
            try:
                clean[key] = float(value)
            except (TypeError, ValueError) as e:
                raise TypeError(
                    f"metric {key!r} at step {step}: {value!r} is not a number"
                ) from e
        run_id = self.run_id
        self._buffer += [(run_id, step, k, None if math.isnan(v) else v, now)
                         for k, v in clean.items()]
        if self._tb is not None:
            self._tb.add(step, clean)
        if len(self._buffer) >= self.flush_rows or now - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows in one transaction.

        If another process holds the write lock beyond the busy timeout, the rows stay buffered
        for the next flush and a warning is logged; nothing is lost.
        """
        conn = self._conn
        self._last_flush = self._clock()
        if conn is None or not self._buffer:
            return
        try:
            with _transaction(conn):
                conn.executemany(_INSERT_METRIC, self._buffer)
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            log.warning("%s is locked by another process (%s); keeping %d rows for the next "
                        "flush", self.path, e, len(self._buffer))
            return
        self._buffer.clear()
        if self._tb is not None:
            self._tb.flush()

    def finish(self, status: str, results: Mapping[str, Any] | None = None) -> None:
        """Flush, then mark the run ended with ``status`` and its ``results`` (a JSON dict).

        Args:
            status: e.g. ``completed``, ``completed_target``, ``failed_nan``, ``failed``.
            results: final numbers (final loss, tokens, times, stop reason, ...).
        """
        if not isinstance(status, str) or not status or status == "running":
            raise ValueError(f"status must be a non-empty str other than 'running', got "
                             f"{status!r}")
        try:
            results_json = json.dumps({} if results is None else results, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise TypeError(f"results are not JSON-serializable: {e}") from e
        conn = self._conn
        if conn is None:
            return
        if self.run_id is None:
            raise RuntimeError("MetricsDB.finish called before start_run")
        self.flush()
        with _transaction(conn):
            conn.execute("UPDATE runs SET status = ?, ended_at = ?, results_json = ? "
                         "WHERE run_id = ?", (status, self._clock(), results_json, self.run_id))

    def close(self) -> None:
        """Flush and close (the run's status is left as is). Idempotent."""
        if self._conn is None:
            return
        try:
            self.flush()
        finally:
            self._conn.close()
            self._conn = None
            if self._tb is not None:
                self._tb.close()

    def __enter__(self) -> MetricsDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


# -- reading ----------------------------------------------------------------------------------


def connect_readonly(
    path: str | os.PathLike[str], busy_timeout_ms: int = 5000
) -> sqlite3.Connection:
    """A read-only connection to a metrics database (a file or a run directory).

    Raises:
        FileNotFoundError: no database at ``path``.
    """
    db = resolve_db_path(path)
    if not db.is_file():
        raise FileNotFoundError(f"no metrics database at {db} (is the run directory right, and "
                                "has the run started?)")
    conn = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True,
                           timeout=busy_timeout_ms / 1000)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    return conn


def _run_dict(row: tuple) -> dict[str, Any]:
    keys = ("run_id", "name", "started_at", "ended_at", "status", "host", "world_size",
            "results")
    out = dict(zip(keys, row[:8], strict=True))
    out["results"] = json.loads(out["results"]) if out["results"] else {}
    return out


_RUN_COLUMNS = "run_id, name, started_at, ended_at, status, host, world_size, results_json"


def list_runs(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every run in the database, oldest first: dicts with the ``runs`` columns (``results``
    decoded from ``results_json``)."""
    with closing(connect_readonly(path)) as conn:
        rows = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs "
                            "ORDER BY started_at, run_id").fetchall()
    return [_run_dict(r) for r in rows]


def _pick_run(conn: sqlite3.Connection, run_id: str | None) -> str | None:
    if run_id is not None:
        return run_id
    row = conn.execute("SELECT run_id FROM runs ORDER BY started_at DESC, run_id DESC "
                       "LIMIT 1").fetchone()
    return row[0] if row else None


def read_run(path: str | os.PathLike[str], run_id: str | None = None) -> dict[str, Any] | None:
    """One run's row plus ``config`` (decoded) and ``fingerprint``; None if there is no such run.

    Args:
        path: the database file or run directory.
        run_id: the run; default the most recently started one.
    """
    with closing(connect_readonly(path)) as conn:
        run_id = _pick_run(conn, run_id)
        if run_id is None:
            return None
        row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?",
                           (run_id,)).fetchone()
        if row is None:
            return None
        cfg = conn.execute("SELECT config_json, fingerprint FROM configs WHERE run_id = ?",
                           (run_id,)).fetchone()
    run = _run_dict(row)
    run["config"] = json.loads(cfg[0]) if cfg and cfg[0] else {}
    run["fingerprint"] = cfg[1] if cfg else None
    return run


def _key_filter(keys: Iterable[str] | None) -> tuple[str, list[str]]:
    """SQL condition and parameters for ``keys``: exact names or glob patterns (``*?[``)."""
    if keys is None:
        return "", []
    keys = list(keys)
    if not keys:
        return " AND 0", []
    exact = [k for k in keys if not any(c in k for c in "*?[")]
    globs = [k for k in keys if k not in exact]
    parts = []
    if exact:
        parts.append(f"key IN ({', '.join('?' * len(exact))})")
    parts += ["key GLOB ?"] * len(globs)
    return " AND (" + " OR ".join(parts) + ")", exact + globs


def _value(v: float | None) -> float:
    return math.nan if v is None else float(v)


def read_series(
    path: str | os.PathLike[str],
    run_id: str | None = None,
    keys: Iterable[str] | None = None,
    max_points: int | None = None,
) -> dict[str, list[tuple[int, float]]]:
    """Metric series of one run: ``{key: [(step, value), ...]}`` with steps ascending.

    Args:
        path: the database file or run directory.
        run_id: the run; default the most recently started one.
        keys: metric names to read (exact names, or glob patterns such as
            ``router/layer_*/cv``); default all.
        max_points: if given (>= 1), a series with more points is averaged over at most this
            many equal step ranges, each reported at its last step (computed in SQL, so long
            runs stay cheap to plot). NaN values are left out of the averages.
    """
    if max_points is not None and max_points < 1:
        raise ValueError(f"max_points must be >= 1 or None, got {max_points}")
    with closing(connect_readonly(path)) as conn:
        run_id = _pick_run(conn, run_id)
        if run_id is None:
            return {}
        cond, params = _key_filter(keys)
        if max_points is None:
            rows = conn.execute(f"SELECT key, step, value FROM metrics WHERE run_id = ?{cond} "
                                "ORDER BY key, step", [run_id, *params]).fetchall()
        else:
            rows = conn.execute(
                "WITH span AS (SELECT key, MIN(step) AS lo, MAX(step) AS hi, COUNT(*) AS n "
                f"  FROM metrics WHERE run_id = ?{cond} GROUP BY key) "
                "SELECT m.key, MAX(m.step) AS s, "
                "  CASE WHEN span.n <= ? THEN MAX(m.value) ELSE AVG(m.value) END "
                "FROM metrics m JOIN span ON m.key = span.key WHERE m.run_id = ? "
                "GROUP BY m.key, CASE WHEN span.n <= ? THEN m.step "
                "  ELSE (m.step - span.lo) * ? / (span.hi - span.lo + 1) END "
                "ORDER BY m.key, s",
                [run_id, *params, max_points, run_id, max_points, max_points],
            ).fetchall()
    out: dict[str, list[tuple[int, float]]] = {}
    for key, step, value in rows:
        out.setdefault(key, []).append((int(step), _value(value)))
    return out


def latest_values(
    path: str | os.PathLike[str], run_id: str | None = None, keys: Iterable[str] | None = None
) -> dict[str, tuple[int, float]]:
    """Each metric's value at its highest logged step: ``{key: (step, value)}``.

    Args:
        path: the database file or run directory.
        run_id: the run; default the most recently started one.
        keys: as in `read_series`; default all.
    """
    with closing(connect_readonly(path)) as conn:
        run_id = _pick_run(conn, run_id)
        if run_id is None:
            return {}
        cond, params = _key_filter(keys)
        rows = conn.execute(
            "SELECT m.key, m.step, m.value FROM metrics m JOIN ("
            f"  SELECT key, MAX(step) AS step FROM metrics WHERE run_id = ?{cond} GROUP BY key"
            ") last ON m.key = last.key AND m.step = last.step WHERE m.run_id = ?",
            [run_id, *params, run_id],
        ).fetchall()
    return {key: (int(step), _value(value)) for key, step, value in sorted(rows)}


