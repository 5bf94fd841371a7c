"""Document sources for data prep: local text / JSONL / Parquet files, Hugging Face datasets and
the built-in corpora. Each yields `Document` (id, text) in a deterministic order.

Source specs (`open_source`):

- a path, or a list of paths, to files or directories. Directories are walked recursively in
  sorted order; files are read by suffix:
  ``.txt`` / ``.md``: UTF-8 text, split into documents by ``doc_sep``: ``"file"`` (default: the
  whole file is one document), ``"blank"`` (runs of blank lines separate documents) or ``"line"``
  (every line is a document);
  ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, the document is field ``text_field``;
  ``.parquet``: column ``text_field`` (read with pyarrow, in row groups).
  Other files inside a directory are ignored (hidden files too); naming one directly is an error.
- ``hf:owner/name[:subset][@split]``: a Hugging Face dataset through ``datasets.load_dataset``
  (streaming), field ``text_field``, split ``split`` unless ``@split`` is given. Offline
  (``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``, or the hub does not answer within 3 s) only
  the local cache is used (not streamed), and a dataset not in it is a `DataError` saying so.
- ``builtin:NAME``: a corpus shipped with nmoe (`nmoe_train.data.corpus.BUILTIN_CORPORA`).

Document ids (they decide the train/val split, so they are stable across runs and machines):
``NAME`` for a whole text file, ``NAME#k`` for its k-th document under ``blank`` / ``line``,
``NAME:LINE`` for JSONL (1-based line number), ``NAME:ROW`` for Parquet (0-based row), where NAME
is the file's name, or ``DIR/relative/path`` for a file found in directory DIR;
``hf:owner/name:subset@split#ROW`` for Hugging Face rows. Null texts are skipped.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from nmoe_train.data.shards import DataError

__all__ = ["DOC_SEPS", "Document", "Source", "open_source"]

DOC_SEPS = ("file", "blank", "line")
"""How a ``.txt`` / ``.md`` file is split into documents (see the module docstring)."""

_TEXT_SUFFIXES = (".txt", ".md")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
_PARQUET_SUFFIXES = (".parquet",)
_ALL_SUFFIXES = _TEXT_SUFFIXES + _JSONL_SUFFIXES + _PARQUET_SUFFIXES
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class Document:
    """One document: a stable id (decides its split) and its text."""

    doc_id: str
    text: str


class Source:
    """A deterministic stream of documents plus what progress reporting needs.

    Attributes:
        spec: the source as given (for messages and the manifest).
        progress_unit: ``"MB"`` (input bytes) or ``"doc"``.
        progress_total: total in ``progress_unit``, or None when unknown.
        progress_done: amount consumed so far, updated while `documents` is iterated.
    """

    spec: str
    progress_unit: str = "MB"
    progress_total: int | None = None
    progress_done: float = 0.0

    def documents(self) -> Iterator[Document]:
        """Yield the documents in their fixed order."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for the manifest."""
        raise NotImplementedError


# -- local files -----------------------------------------------------------------------------------


def _suffix_kind(path: Path) -> str | None:
    name = path.name.lower()
    for kind, suffixes in (("text", _TEXT_SUFFIXES), ("jsonl", _JSONL_SUFFIXES),
                           ("parquet", _PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


class FileSource(Source):
    """Documents from local files (see the module docstring for suffixes and ids)."""

    def __init__(self, paths: Sequence[Path], text_field: str, doc_sep: str) -> None:
        if doc_sep not in DOC_SEPS:
            raise DataError(f"doc_sep must be one of {', '.join(DOC_SEPS)}, got {doc_sep!r}")
        self.spec = " ".join(str(p) for p in paths)
        self.text_field = text_field
        self.doc_sep = doc_sep
        self.files: list[tuple[Path, str]] = []  # (path, name used in document ids)
        for path in paths:
            self.files.extend(self._expand(Path(path)))
        names = [name for _, name in self.files]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise DataError(f"source files share the name(s) {', '.join(dup[:3])}, so their "
                            f"document ids would collide; pass their parent directories instead")
        self.progress_unit = "MB"
        self.total_bytes = sum(p.stat().st_size for p, _ in self.files)
        self.progress_total = -(-self.total_bytes // (1 << 20))

    @staticmethod
    def _expand(path: Path) -> list[tuple[Path, str]]:
        if not path.exists():
            raise DataError(f"source {str(path)!r} does not exist; pass a file, a directory, "
                            f"hf:owner/name or builtin:NAME")
        if path.is_file():
            if _suffix_kind(path) is None:
                raise DataError(f"source {str(path)!r}: unknown file type; expected one of "
                                f"{', '.join(_ALL_SUFFIXES)}")
            return [(path, path.name)]
        found = []
        files = [(p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file()]
        for rel, file in sorted(files):  # sorted by relative path string: same on every OS
            if any(part.startswith(".") for part in rel.split("/")) or _suffix_kind(file) is None:
                continue
            found.append((file, f"{path.resolve().name}/{rel}"))
        if not found:
            raise DataError(f"source directory {str(path)!r} holds no files ending in "
                            f"{', '.join(_ALL_SUFFIXES)}")
        return found

    def describe(self) -> dict[str, Any]:
        return {"kind": "files", "spec": self.spec, "num_files": len(self.files),
                "num_bytes": self.total_bytes, "text_field": self.text_field,
                "doc_sep": self.doc_sep}

    def documents(self) -> Iterator[Document]:
        done_bytes = 0
        for path, name in self.files:
            kind = _suffix_kind(path)
            size = path.stat().st_size
            reader = {"text": self._text, "jsonl": self._jsonl, "parquet": self._parquet}[kind]
            for doc, file_done in reader(path, name):
                self.progress_done = (done_bytes + file_done) / (1 << 20)
                if doc is not None:
                    yield doc
            done_bytes += size
            self.progress_done = done_bytes / (1 << 20)

    def _text(self, path: Path, name: str) -> Iterator[tuple[Document | None, int]]:
        if self.doc_sep == "file":
            yield Document(name, _decode(path.read_bytes(), path, 0)), path.stat().st_size
            return
        done, k, para, lineno = 0, 0, [], 0
        with open(path, "rb") as f:
            for raw in f:
                lineno += 1
                done += len(raw)
                line = _decode(raw, path, lineno)
                if self.doc_sep == "line":
                    yield Document(f"{name}#{k}", line.rstrip("\r\n")), done
                    k += 1
                elif line.strip():
                    para.append(line)
                elif para:
                    yield Document(f"{name}#{k}", "".join(para).rstrip("\r\n")), done
                    k, para = k + 1, []
        if para:
            yield Document(f"{name}#{k}", "".join(para).rstrip("\r\n")), done

    def _jsonl(self, path: Path, name: str) -> Iterator[tuple[Document | None, int]]:
        with open(path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw) if path.name.lower().endswith(".gz") else raw
            try:
                for lineno, line in enumerate(stream, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise DataError(f"{path}:{lineno}: invalid JSON ({e})") from None
                    text = _field(record, self.text_field, f"{path}:{lineno}")
                    yield (None if text is None else Document(f"{name}:{lineno}", text)), raw.tell()
            except (OSError, EOFError) as e:
                raise DataError(f"{path}: cannot read ({e})") from None

    def _parquet(self, path: Path, name: str) -> Iterator[tuple[Document | None, int]]:
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for bad files
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        columns = table.schema_arrow.names
        if self.text_field not in columns:
            raise DataError(f"{path}: no column {self.text_field!r} (columns: "
                            f"{', '.join(columns)}); pass --text-field / text_field=")
        size, num_rows, row = path.stat().st_size, max(table.metadata.num_rows, 1), 0
        for batch in table.iter_batches(batch_size=1024, columns=[self.text_field]):
            for text in batch.column(0).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise DataError(f"{path}: row {row} column {self.text_field!r} is a "
                                    f"{type(text).__name__}, not a string")
                doc = None if text is None else Document(f"{name}:{row}", text)
                row += 1
                yield doc, size * row // num_rows


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{path}:{lineno}" if lineno else str(path)
        raise DataError(f"{where}: not UTF-8 ({e}); convert the file to UTF-8") from None


def _field(record: Any, field: str, where: str) -> str | None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        keys = ", ".join(list(record)[:10])
        raise DataError(f"{where}: no field {field!r} (fields: {keys}); pass --text-field / "
                        f"text_field=")
    text = record[field]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is a {type(text).__name__}, not a string")
    return text


# -- Hugging Face ----------------------------------------------------------------------------------


def _env_offline() -> bool:
    return any(os.environ.get(k, "").upper() in _TRUE
               for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_mode(offline: bool) -> Iterator[None]:
    """Make ``datasets`` use only its local cache while active.

    ``datasets`` reads its offline switch once, at import; setting it here honours an environment
    that changed since, and skips its long retry loop when the hub is unreachable.
    """
    import datasets.config

    saved = datasets.config.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


class HFSource(Source):
    """Rows of a Hugging Face dataset, streamed in the dataset's order."""

    def __init__(self, spec: str, text_field: str, split: str) -> None:
        body = spec.removeprefix("hf:")
        body, _, at_split = body.partition("@")
        name, _, subset = body.partition(":")
        if not name or name.count("/") > 1:
            raise DataError(f"source {spec!r}: expected hf:owner/name[:subset][@split]")
        self.spec, self.name, self.subset = spec, name, subset or None
        self.split, self.text_field = at_split or split, text_field
        self.progress_unit, self.progress_total = "doc", None
        self._dataset = self._load()
        info = getattr(self._dataset, "info", None)
        splits = getattr(info, "splits", None) or {}
        if self.split in splits and splits[self.split].num_examples:
            self.progress_total = int(splits[self.split].num_examples)

    def _load(self) -> Any:
        import datasets

        self._offline = _env_offline() or not _hub_reachable()
        label = f"{self.name}" + (f" (subset {self.subset})" if self.subset else "")
        try:
            with _offline_mode(self._offline):  # offline: the cached Arrow files, memory-mapped
                return datasets.load_dataset(self.name, self.subset, split=self.split,
                                             streaming=not self._offline)
        except Exception as e:
            if self._offline:
                why = ("offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)"
                       if _env_offline() else "the hub does not answer (no network)")
                raise DataError(
                    f"cannot load Hugging Face dataset {label}: the hub is unreachable ({why}) "
                    f"and the dataset is not in the local cache. Pass local files (.jsonl, "
                    f".parquet, .txt) instead, or download it on a connected machine and point "
                    f"HF_HOME / HF_DATASETS_CACHE at that cache") from None
            raise DataError(f"cannot load Hugging Face dataset {label} split {self.split!r}: "
                            f"{type(e).__name__}: {e}") from None

    def describe(self) -> dict[str, Any]:
        return {"kind": "huggingface", "spec": self.spec, "name": self.name,
                "subset": self.subset, "split": self.split, "text_field": self.text_field}

    def documents(self) -> Iterator[Document]:
        prefix = f"hf:{self.name}:{self.subset or ''}@{self.split}"
        with _offline_mode(self._offline):
            for row, record in enumerate(self._dataset):
                text = _field(record, self.text_field, f"{self.spec} row {row}")
                self.progress_done = row + 1
                if text is not None:
                    yield Document(f"{prefix}#{row}", text)


# -- built-in corpora ------------------------------------------------------------------------------


class BuiltinSource(Source):
    """A corpus shipped with nmoe (`nmoe_train.data.corpus`)."""

    def __init__(self, spec: str) -> None:
        from nmoe_train.data import corpus

        self.spec = spec
        self.name = spec.removeprefix("builtin:")
        if self.name not in corpus.BUILTIN_CORPORA:
            raise DataError(f"unknown built-in source {spec!r}; known: "
                            f"{', '.join('builtin:' + n for n in corpus.BUILTIN_CORPORA)}")
        self._corpus = corpus.BUILTIN_CORPORA[self.name]
        self._docs = self._corpus.documents()
        self.progress_unit, self.progress_total = "doc", len(self._docs)

    def describe(self) -> dict[str, Any]:
        return {"kind": "builtin", "spec": self.spec, **self._corpus.describe()}

    def documents(self) -> Iterator[Document]:
        for i, (doc_id, text) in enumerate(self._docs):
            self.progress_done = i + 1
            yield Document(doc_id, text)


def open_source(spec: str | Path | Sequence[str | Path], *, text_field: str = "text",
                split: str = "train", doc_sep: str = "file") -> Source:
    """Open a document source.

    Args:
        spec: a path or list of paths (files / directories), ``hf:owner/name[:subset][@split]``,
            or ``builtin:NAME`` (see the module docstring).
        text_field: JSONL field / Parquet column / HF column holding the text.
        split: Hugging Face split to read (ignored for local files).
        doc_sep: how text files split into documents: ``"file"``, ``"blank"`` or ``"line"``.

    Raises:
        DataError: a missing path, an unknown file type or builtin, an unreachable hub.
    """
    if isinstance(spec, (list, tuple)):
        specs = [str(s) for s in spec]
        if len(specs) == 1:
            return open_source(specs[0], text_field=text_field, split=split, doc_sep=doc_sep)
        if not specs or any(s.startswith(("hf:", "builtin:")) for s in specs):
            raise DataError("a list of sources may only hold local paths; prepare "
                            "hf:/builtin: sources one at a time")
        return FileSource([Path(s) for s in specs], text_field, doc_sep)
    spec = str(spec)
    if spec.startswith("hf:"):
        return HFSource(spec, text_field, split)
    if spec.startswith("builtin:"):
        return BuiltinSource(spec)
    return FileSource([Path(spec)], text_field, doc_sep)
