"""Asynchronous, sharded, verifiable training checkpoints in safetensors + JSON (no pickle).

Layout of one checkpoint, ``root/step_0000100/``:

    shared.safetensors        replicated tensors (dense weights, router biases), written by rank 0
    meta.json                 the run's JSON metadata (step, tokens, RNG, config, ...), rank 0
    rank_00000.safetensors    rank 0's own tensors (its expert shard, its ZeRO optimizer shard)
    rank_00000.json           rank 0's own JSON state (its loader cursor, ...)
    rank_00001.safetensors    ... one pair per rank
    manifest.json             written last by rank 0: every file's size and sha256, the step,
                              the world size, the creation time and the versions that wrote it

plus ``root/latest``, a one-line text file naming the newest finalised checkpoint directory.

A save goes through three stages:

1. `Checkpointer.save` (main thread) copies the tensors to host memory -- into reused pinned
   buffers with non-blocking copies and one stream synchronisation per device for GPU tensors,
   plain clones for CPU tensors -- serialises the JSON, and returns. That copy is the only cost
   the training loop pays.
2. A background thread writes this rank's files into ``root/step_0000100.tmp/`` (each file
   written under a temporary name, fsync'd, then renamed), hashes them, and writes a small done
   marker (``rank_00000.done.json``) holding their sizes and sha256.
3. Finalisation, at the next `save`, `wait` or `close` on the main thread of every rank: join the
   writer, call ``barrier()``, then rank 0 checks that every rank's done marker is present, writes
   ``manifest.json``, renames ``step_0000100.tmp`` to ``step_0000100`` (atomic), points
   ``latest`` at it and prunes to the newest ``keep_last`` complete checkpoints; a second
   ``barrier()`` follows, so when `wait` returns on any rank the checkpoint is final.

A crash at any point leaves either a complete, verifiable checkpoint or a ``.tmp`` directory that
`latest` reports and skips. `latest` returns the newest checkpoint whose files all match the
manifest; anything else is named in a warning (``logging``) and in `Checkpointer.problems`.

Collective contract: with ``world_size > 1`` every rank must call `save`, `wait` and `close` in
the same order (each calls ``barrier()`` twice when a save is pending), from the main thread.
Errors (a failed write on any rank) are raised after both barriers, so no rank is left waiting.

Resharding (loading with a different world size) is not supported yet; `Checkpointer.load` says so.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "Checkpointer",
    "find_latest",
    "list_checkpoints",
    "step_dir_name",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

FORMAT = "nmoe-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
META = "meta.json"
SHARED = "shared.safetensors"
LATEST = "latest"
_DIR_RE = re.compile(r"step_(\d+)(\.tmp)?")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, finalised or loaded; the message says which and why."""


def step_dir_name(step: int) -> str:
    """The directory name of the checkpoint at ``step`` (``step_0000100``)."""
    return f"step_{step:07d}"


def rank_tensor_file(rank: int) -> str:
    """The safetensors file holding ``rank``'s own tensors (``rank_00003.safetensors``)."""
    return f"rank_{rank:05d}.safetensors"


def rank_meta_file(rank: int) -> str:
    """The JSON file holding ``rank``'s own state (``rank_00003.json``)."""
    return f"rank_{rank:05d}.json"


def _done_file(rank: int) -> str:
    return f"rank_{rank:05d}.done.json"


def expected_files(world_size: int) -> list[str]:
    """Every data file a complete checkpoint written by ``world_size`` ranks holds."""
    names = [SHARED, META]
    for r in range(world_size):
        names += [rank_tensor_file(r), rank_meta_file(r)]
    return names


# -- file helpers ---------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_atomic(path: Path, write: Callable[[Path], None], fsync: bool) -> dict[str, Any]:
    """Write ``path`` through ``write(tmp_path)`` + rename; returns ``{"size", "sha256"}``."""
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
        if fsync:
            with open(partial, "rb") as f:
                os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _write_text(path: Path, text: str, fsync: bool) -> dict[str, Any]:
    return _write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"), fsync)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _versions() -> dict[str, str]:
    """Versions of every installed nmoe distribution, torch and Python."""
    versions = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("nmoe-"):
            versions[name] = dist.version
    versions = dict(sorted(versions.items()))
    versions["torch"] = torch.__version__
    versions["python"] = platform.python_version()
    return versions


# -- verification -----------------------------------------------------------------------------


def list_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Every ``step_*`` directory under ``root`` (complete, partial and ``.tmp``), by step.

    Returns ``[(step, path), ...]`` sorted by step, then with ``.tmp`` after the finished name.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _DIR_RE.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), m.group(2) is not None, p))
    return [(step, p) for step, _, p in sorted(found)]


def verify_checkpoint(
    path: str | os.PathLike[str], checksums: bool = True, only: list[str] | None = None
) -> list[str]:
    """Check one checkpoint directory against its manifest.

    Args:
        path: a ``step_*`` directory.
        checksums: also recompute every file's sha256 (reads the whole checkpoint); otherwise
            only presence and sizes are checked.
        only: check just these file names (which must be in the manifest); default all.

    Returns:
        The problems found, each ``"<dir>: <file>: <what is wrong>"``; empty when it is complete.
    """
    path = Path(path)
    name = path.name
    if name.endswith(".tmp"):
        return [f"{name}: unfinished save (.tmp directory): it was never finalised"]
    if not path.is_dir():
        return [f"{name}: not a directory"]
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return [f"{name}: {MANIFEST} is missing: the save did not finish"]
    try:
        manifest = _read_json(manifest_path)
        files = manifest["files"]
        world_size = int(manifest["world_size"])
        if manifest.get("format") != FORMAT:
            return [f"{name}: {MANIFEST}: format is {manifest.get('format')!r}, not {FORMAT!r}"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"{name}: {MANIFEST} is unreadable ({type(e).__name__}: {e})"]
    problems = [f"{name}: {f}: not listed in {MANIFEST}"
                for f in expected_files(world_size) if f not in files]
    for fname in (only if only is not None else sorted(files)):
        if fname not in files:
            problems.append(f"{name}: {fname}: not listed in {MANIFEST}")
            continue
        entry, fpath = files[fname], path / fname
        if not fpath.is_file():
            problems.append(f"{name}: {fname}: missing")
            continue
        size = fpath.stat().st_size
        if size != entry["size"]:
            problems.append(f"{name}: {fname}: {size} bytes, {MANIFEST} says {entry['size']} "
                            "(truncated or overwritten)")
            continue
        if checksums and _sha256(fpath) != entry["sha256"]:
            problems.append(f"{name}: {fname}: sha256 does not match {MANIFEST} (corrupted)")
    return problems


def find_latest(
    root: str | os.PathLike[str], checksums: bool = True
) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under ``root`` and the problems met on the way.

    Checkpoints newer than the one named in ``root/latest`` were left by an earlier run that went
    further before the current run resumed from an older step; they are reported and skipped.

    Returns:
        ``(path or None, problems)``: problems name every skipped directory and why.
    """
    root = Path(root)
    problems: list[str] = []
    limit = None
    latest_file = root / LATEST
    if latest_file.is_file():
        m = _DIR_RE.fullmatch(latest_file.read_text(encoding="utf-8").strip())
        limit = int(m.group(1)) if m else None
    for step, path in reversed(list_checkpoints(root)):
        if limit is not None and step > limit and not path.name.endswith(".tmp"):
            problems.append(f"{path.name}: newer than {step_dir_name(limit)} named in "
                            f"{LATEST}: left by an earlier run that was resumed from an older "
                            "step; ignored")
            continue
        found = verify_checkpoint(path, checksums=checksums)
        if not found:
            return path, problems
        problems += found
    return None, problems


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _stop_signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver them to the handlers that were
    in place. Publishing a checkpoint renames its directory and then points ``latest`` at it; a
    KeyboardInterrupt between the two (the trainer turns SIGTERM into one) left ``latest`` naming
    the previous step, and a resume then skipped the newest checkpoint as "left by an earlier
    run". Only the main thread can set handlers; elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: caught.append(signum))
                for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


# -- the checkpointer -------------------------------------------------------------------------


@dataclass
class _Job:
    """One rank's part of one save, already in host memory."""

    step: int
    tmp_dir: Path
    shared: dict[str, torch.Tensor] | None  # None on ranks other than 0
    local: dict[str, torch.Tensor]
    meta_json: str | None  # None on ranks other than 0
    rank_meta_json: str
    written: dict[str, dict[str, Any]] = field(default_factory=dict)


def _check_tensors(arg: str, tensors: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(tensors, Mapping):
        raise TypeError(
            f"{arg} must be a dict of str -> torch.Tensor, got {type(tensors).__name__}"
        )
    for key, t in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"{arg}: tensor names must be str, got {key!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{arg}[{key!r}] is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided:
            raise ValueError(f"{arg}[{key!r}] has layout {t.layout}; convert it to dense first")


def _to_json(arg: str, value: Any) -> str:
    if not isinstance(value, Mapping):
        raise TypeError(f"{arg} must be a dict (JSON object), got {type(value).__name__}")
    try:
        return json.dumps(value, indent=1, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{arg} is not JSON-serializable ({e}); store tensors in `shared` / "
                        "`local` and convert RNG states to lists of ints") from e


class Checkpointer:
    """Writes checkpoints asynchronously under ``root`` and finds / verifies / loads them.

    Args:
        root: the checkpoint directory (created if missing); shared by every rank, so it must be
            on a filesystem all ranks see.
        keep_last: how many complete checkpoints to keep (>= 1), or None to keep all.
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of ranks writing each checkpoint.
        barrier: a collective barrier over all ranks (e.g. ``torch.distributed.barrier``),
            required when ``world_size > 1``; only ever called from the caller's thread.
        fsync: fsync every file and directory written (turn off only on filesystems where fsync
            is very slow and durability is guaranteed elsewhere).

    Use as a context manager or call `close` at the end; both finalise the last save.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        keep_last: int | None = 3,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] | None = None,
        fsync: bool = True,
    ) -> None:
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"keep_last must be an int >= 1 or None (keep all), got {keep_last!r}")
        if world_size > 1 and barrier is None:
            raise ValueError("world_size > 1 needs a barrier (e.g. torch.distributed.barrier) so "
                             "rank 0 finalises only after every rank has written its files")
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier
        self.fsync = fsync
        self.problems: list[str] = []
        """Problems found by the last `latest` call (each names the checkpoint and file)."""
        self._pending: _Job | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pinned: dict[tuple[str, str], torch.Tensor] = {}
        self._closed = False
        self._versions: dict[str, str] | None = None
        self._last_published: int | None = None  # rank 0: the step this object last finalised
        # Called in the writer thread with each destination path before it is written; tests use
        # it to slow the writer down or make it fail.
        self._before_write: Callable[[Path], None] | None = None
        self.root.mkdir(parents=True, exist_ok=True)

    # -- saving ---------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        shared: Mapping[str, torch.Tensor],
        local: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
        rank_meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Start writing the checkpoint of ``step``; returns once the tensors are in host memory.

        Finalises the previous save first (see the module docstring), re-raising its error if
        its writer failed. The tensors may be modified as soon as this returns.

        Args:
            step: the training step (int >= 0); names the directory ``step_{step:07d}``.
            shared: replicated tensors, identical on every rank; only rank 0's are written (other
                ranks' are not even copied). Any device, dtype and strided layout.
            local: this rank's own tensors (expert shard, optimizer shard).
            meta: JSON-serializable run state, written by rank 0 as ``meta.json``.
            rank_meta: JSON-serializable state of this rank (its loader cursor), written as
                ``rank_XXXXX.json``; default ``{}``.
        """
        self._check_open()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        _check_tensors("shared", shared)
        _check_tensors("local", local)
        meta_json = _to_json("meta", meta) if self.rank == 0 else None
        rank_meta_json = _to_json("rank_meta", {} if rank_meta is None else rank_meta)
        self._finalize_pending()  # before the copy: the pinned buffers are the writer's until then

        host_shared = self._host_copy("shared", shared) if self.rank == 0 else None
        host_local = self._host_copy("local", local)
        self._drop_unused_buffers(shared if self.rank == 0 else {}, local)

        tmp_dir = self.root / (step_dir_name(step) + ".tmp")
        tmp_dir.mkdir(parents=True, exist_ok=True)
        job = _Job(step, tmp_dir, host_shared, host_local, meta_json, rank_meta_json)
        self._pending = job
        self._error = None
        self._thread = threading.Thread(target=self._run_writer, args=(job,),
                                        name=f"nmoe-ckpt-{step}-r{self.rank}", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Block until the pending save (if any) is written and finalised; re-raise its error."""
        self._finalize_pending()

    def close(self) -> None:
        """Finalise the pending save and stop. Idempotent."""
        if self._closed:
            return
        try:
            self._finalize_pending()
        finally:
            self._closed = True
            self._pinned.clear()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None or self.world_size == 1:
            self.close()
            return
        # Unwinding an error with several ranks: the others may never reach the barrier, so
        # only wait for this rank's writer and leave the save unfinalised (a .tmp directory).
        if self._thread is not None:
            self._thread.join()
        if self._pending is not None:
            log.warning("checkpoint %s left unfinalised: rank %d is unwinding an error",
                        self._pending.tmp_dir, self.rank)
        self._pending, self._thread, self._closed = None, None, True

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"Checkpointer({self.root}) is closed")

    def _host_copy(self, kind: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Contiguous host copies; GPU tensors go through reused pinned buffers."""
        out: dict[str, torch.Tensor] = {}
        streams = {}
        for name, t in tensors.items():
            t = t.detach()
            if t.device.type == "cpu":
                out[name] = t.clone(memory_format=torch.contiguous_format)
                continue
            if t.device.type != "cuda":
                out[name] = t.to("cpu", copy=True).contiguous()
                continue
            buf = self._pinned.get((kind, name))
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
                self._pinned[(kind, name)] = buf
            buf.copy_(t, non_blocking=True)
            streams[t.device] = torch.cuda.current_stream(t.device)
            out[name] = buf
        for stream in streams.values():
            stream.synchronize()
        return out

    def _drop_unused_buffers(self, shared: Mapping[str, Any], local: Mapping[str, Any]) -> None:
        used = {("shared", k) for k in shared} | {("local", k) for k in local}
        for key in [k for k in self._pinned if k not in used]:
            del self._pinned[key]

    def _run_writer(self, job: _Job) -> None:
        try:
            self._write_job(job)
        except BaseException as e:  # re-raised on the main thread by _finalize_pending
            self._error = e

    def _write_one(self, job: _Job, name: str, write: Callable[[Path], None]) -> None:
        path = job.tmp_dir / name
        if self._before_write is not None:
            self._before_write(path)
        job.written[name] = _write_atomic(path, write, self.fsync)

    def _write_job(self, job: _Job) -> None:
        def tensors_writer(tensors: dict[str, torch.Tensor]) -> Callable[[Path], None]:
            return lambda p: save_file(tensors, str(p), metadata={"format": "pt"})

        def text_writer(text: str) -> Callable[[Path], None]:
            return lambda p: p.write_text(text, encoding="utf-8")

        if job.shared is not None:
            self._write_one(job, SHARED, tensors_writer(job.shared))
        if job.meta_json is not None:
            self._write_one(job, META, text_writer(job.meta_json))
        self._write_one(job, rank_tensor_file(self.rank), tensors_writer(job.local))
        self._write_one(job, rank_meta_file(self.rank), text_writer(job.rank_meta_json))
        done = {"rank": self.rank, "step": job.step, "files": job.written}
        _write_text(job.tmp_dir / _done_file(self.rank), json.dumps(done), self.fsync)
        if self.fsync:
            _fsync_dir(job.tmp_dir)
        # The host copies are no longer needed; pinned buffers stay in self._pinned for reuse.
        job.shared = None
        job.local = {}

    # -- finalisation ---------------------------------------------------------------------------

    def _finalize_pending(self) -> None:
        """Join the writer; barrier; rank 0 publishes; barrier; then raise any error.

        Every rank calls both barriers whatever failed, so an error on one rank cannot leave the
        others waiting. The second barrier means that once this returns on any rank, the
        checkpoint is final (or failed) and the next save cannot race rank 0's rename.
        """
        job = self._pending
        if job is None:
            return
        assert self._thread is not None
        self._thread.join()
        error, self._error = self._error, None
        self._pending, self._thread = None, None
        self._barrier()
        publish_error: BaseException | None = None
        if self.rank == 0 and error is None:
            try:
                with _stop_signals_deferred():
                    self._publish(job)
            except BaseException as e:  # raised below, after the second barrier
                publish_error = e
        self._barrier()
        if error is not None:
            raise CheckpointError(
                f"writing checkpoint {job.tmp_dir} failed on rank {self.rank}: "
                f"{type(error).__name__}: {error}"
            ) from error
        if publish_error is not None:
            raise publish_error

    def _barrier(self) -> None:
        if self.world_size > 1:
            assert self.barrier is not None
            self.barrier()

    def _publish(self, job: _Job) -> None:
        """Rank 0: manifest, atomic rename, ``latest`` pointer, pruning."""
        files: dict[str, dict[str, Any]] = {}
        missing = []
        for r in range(self.world_size):
            marker = job.tmp_dir / _done_file(r)
            if not marker.is_file():
                missing.append(r)
                continue
            files.update(_read_json(marker)["files"])
        if missing:
            raise CheckpointError(
                f"cannot finalise {job.tmp_dir}: ranks {missing} did not finish writing their "
                "files (no done marker); check their logs. The .tmp directory is left as is."
            )
        for name in expected_files(self.world_size):
            if name not in files or (job.tmp_dir / name).stat().st_size != files[name]["size"]:
                raise CheckpointError(f"cannot finalise {job.tmp_dir}: {name} is missing or has "
                                      "the wrong size; was the directory modified during the save?")
        keep = set(files) | {_done_file(r) for r in range(self.world_size)}
        for stale in job.tmp_dir.iterdir():  # left by an earlier, crashed save of this step
            if stale.name not in keep:
                log.info("removing stale %s from %s", stale.name, job.tmp_dir)
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        if self._versions is None:
            self._versions = _versions()
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": job.step,
            "world_size": self.world_size,
            "created_at": time.time(),
            "created_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": self._versions,
            "files": dict(sorted(files.items())),
        }
        _write_text(job.tmp_dir / MANIFEST, json.dumps(manifest, indent=1), self.fsync)
        for r in range(self.world_size):
            (job.tmp_dir / _done_file(r)).unlink()
        final = self.root / step_dir_name(job.step)
        if final.exists():
            # Saving the same step twice in one run (e.g. periodic save + final save) is routine;
            # overwriting a checkpoint left by an earlier run deserves a warning.
            log_level = logging.INFO if job.step == self._last_published else logging.WARNING
            log.log(log_level, "replacing existing checkpoint %s with the one just written", final)
            old = self.root / (final.name + ".replaced")
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
            os.rename(job.tmp_dir, final)
            shutil.rmtree(old)
        else:
            os.rename(job.tmp_dir, final)
        self._last_published = job.step
        _write_text(self.root / LATEST, final.name + "\n", self.fsync)
        if self.fsync:
            _fsync_dir(self.root)
        self._prune(job.step)

    def _prune(self, step: int) -> None:
        """Keep the newest ``keep_last`` complete checkpoints up to ``step``; drop stale .tmp."""
        complete = []
        for s, path in list_checkpoints(self.root):
            if path.name.endswith(".tmp"):
                if s < step:  # an abandoned save (saves only move forward)
                    log.info("removing abandoned unfinished checkpoint %s", path)
                    shutil.rmtree(path, ignore_errors=True)
            elif s <= step and (path / MANIFEST).is_file():
                complete.append(path)
        if self.keep_last is not None:
            for path in complete[: -self.keep_last]:
                log.info("pruning checkpoint %s (keep_last=%d)", path, self.keep_last)
                shutil.rmtree(path, ignore_errors=True)

    # -- finding and loading ---------------------------------------------------------------------

    def latest(self, checksums: bool = True) -> Path | None:
        """The newest complete checkpoint under ``root`` (see `find_latest`), or None.

        Every skipped checkpoint is logged as a warning and listed in `problems`.

        Args:
            checksums: recompute sha256 of every file of the candidate (reads it whole); with
                False only presence and sizes are checked.
        """
        path, self.problems = find_latest(self.root, checksums=checksums)
        for problem in self.problems:
            log.warning("skipping checkpoint: %s", problem)
        return path

    def verify(self, path: str | os.PathLike[str], checksums: bool = True) -> list[str]:
        """Problems of one checkpoint directory (empty when complete); see `verify_checkpoint`."""
        return verify_checkpoint(path, checksums=checksums)

    def load(
        self, path: str | os.PathLike[str], device: str | torch.device = "cpu", verify: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """Load what this rank needs from a complete checkpoint.

        Args:
            path: a ``step_*`` directory (e.g. from `latest`).
            device: where to place the tensors.
            verify: check size and sha256 of the files read against the manifest first.

        Returns:
            ``(shared, local, meta, rank_meta)``: the replicated tensors, this rank's tensors,
            the run metadata and this rank's metadata, exactly as saved.

        Raises:
            CheckpointError: the checkpoint is incomplete or corrupt, or was written by a
                different number of ranks (resharding is not supported yet).
        """
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise CheckpointError(f"{path} has no {MANIFEST}: not a complete checkpoint "
                                  f"(use Checkpointer.latest() to find one)")
        manifest = _read_json(manifest_path)
        saved_world = int(manifest["world_size"])
        if saved_world != self.world_size:
            raise CheckpointError(
                f"{path} was written by {saved_world} ranks but this run has world_size="
                f"{self.world_size}; resharding a checkpoint to another world size is not "
                f"supported yet: resume with {saved_world} ranks"
            )
        names = [SHARED, META, rank_tensor_file(self.rank), rank_meta_file(self.rank)]
        if verify:
            problems = verify_checkpoint(path, checksums=True, only=names)
            if problems:
                raise CheckpointError(f"cannot load {path}: " + "; ".join(problems))
        shared = self._load_tensors(path / SHARED, device)
        local = self._load_tensors(path / rank_tensor_file(self.rank), device)
        meta = _read_json(path / META)
        rank_meta = _read_json(path / rank_meta_file(self.rank))
        return shared, local, meta, rank_meta

    @staticmethod
    def _load_tensors(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                return {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from e
