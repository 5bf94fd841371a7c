"""The on-disk format of a prepared token dataset: shards, document indexes and the manifest.

A prepared dataset is a directory::

    DIR/manifest.json
    DIR/train/shard-00000.npy   DIR/train/shard-00000.idx   ...
    DIR/val/shard-00000.npy     DIR/val/shard-00000.idx     ...

- A shard (``.npy``) is a 1-D array of token ids: uint16 when the tokenizer's ``n_vocab`` is at most
  65536, else uint32. Every document is followed by the tokenizer's EOS id, so the concatenation of
  a split's shards is ``doc_0 EOS doc_1 EOS ...``. Documents never straddle shards.
- An index (``.idx``) locates the documents of its shard: a 32-byte little-endian header
  ``<8sQQQ`` = (magic ``b"NMOEIDX\\x00"``, version 1, num_docs, reserved 0), then ``num_docs``
  uint64 ``(start, end)`` pairs; ``shard[start:end]`` is one document including its EOS.
- ``manifest.json`` (see `Manifest fields` below) names every shard with its token and document
  counts and SHA-256 checksums.

Every file is written to ``NAME.tmp`` and renamed into place once complete, and the manifest is
written last, so an interrupted prep never leaves a manifest that points at partial files.

Manifest fields: ``format``, ``format_version``, ``name``, ``tokenizer``, ``tokenizer_hash``,
``n_vocab``, ``padded_vocab_size``, ``eos_id``, ``dtype``, ``created_at``, ``splits`` (``{split:
{num_tokens, num_documents, shards: [{path, index_path, num_tokens, num_documents, sha256,
index_sha256}]}}``; paths relative to DIR), ``stats``, ``source``, ``val_source``, ``prep_args``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_MAGIC",
    "MANIFEST_NAME",
    "SPLITS",
    "DataError",
    "ShardRecord",
    "ShardWriter",
    "open_split",
    "read_index",
    "read_manifest",
    "sha256_file",
    "split_fingerprint",
    "token_dtype",
    "verify",
    "write_index",
    "write_json_atomic",
]

FORMAT_NAME = "nmoe-tokens"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
INDEX_MAGIC = b"NMOEIDX\x00"
INDEX_VERSION = 1
_INDEX_HEADER = struct.Struct("<8sQQQ")  # magic, version, num_docs, reserved


class DataError(Exception):
    """Bad or inconsistent data input: a source, a prepared dataset, or a loader state.

    The message names the offending file, field or argument and says how to fix it.
    """


def token_dtype(n_vocab: int) -> np.dtype:
    """The shard dtype for a vocabulary of ``n_vocab`` ids: uint16 if ``n_vocab <= 65536``."""
    return np.dtype(np.uint16) if n_vocab <= 1 << 16 else np.dtype(np.uint32)


def sha256_file(path: Path, chunk_bytes: int = 1 << 23) -> str:
    """Hex SHA-256 of the file at ``path``, read in chunks of ``chunk_bytes``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _replace_atomically(tmp: Path, final: Path) -> None:
    """fsync ``tmp`` and rename it to ``final`` (atomic on POSIX)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` through ``path.tmp`` + rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    _replace_atomically(tmp, path)


def write_index(path: Path, bounds_N2: np.ndarray) -> None:
    """Write a document index to ``path`` (atomically).

    Args:
        path: destination ``.idx`` file.
        bounds_N2: integer array of shape ``(num_docs, 2)``: ``(start, end)`` token offsets of each
            document in its shard, end exclusive.
    """
    bounds_N2 = np.ascontiguousarray(bounds_N2, dtype="<u8").reshape(-1, 2)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_INDEX_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, len(bounds_N2), 0))
        f.write(bounds_N2.tobytes())
    _replace_atomically(tmp, path)


def read_index(path: Path) -> np.ndarray:
    """Read the document index at ``path``: uint64 array of shape ``(num_docs, 2)``.

    Raises:
        DataError: missing file, wrong magic/version, or a size that disagrees with the header.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: index file is missing; re-run `n data prep`")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read index file ({e.strerror}); "
                        f"re-run `n data prep`") from None
    if len(raw) < _INDEX_HEADER.size:
        raise DataError(f"{path}: index file is truncated ({len(raw)} bytes < 32-byte header)")
    magic, version, num_docs, _ = _INDEX_HEADER.unpack_from(raw)
    if magic != INDEX_MAGIC:
        raise DataError(f"{path}: not an nmoe index (magic {magic!r}, expected {INDEX_MAGIC!r})")
    if version != INDEX_VERSION:
        raise DataError(f"{path}: index version {version} is not supported (expected "
                        f"{INDEX_VERSION}); re-run `n data prep` with this nmoe-train")
    expected = _INDEX_HEADER.size + 16 * num_docs
    if len(raw) != expected:
        raise DataError(f"{path}: index holds {len(raw)} bytes but its header says {num_docs} "
                        f"documents ({expected} bytes); the file is corrupt")
    return np.frombuffer(raw, dtype="<u8", offset=_INDEX_HEADER.size).reshape(num_docs, 2)


@dataclass(frozen=True)
class ShardRecord:
    """One shard's manifest entry (paths relative to the dataset directory)."""

    path: str
    index_path: str
    num_tokens: int
    num_documents: int
    sha256: str
    index_sha256: str


class ShardWriter:
    """Collects the documents of one split and writes them as shards of about ``shard_tokens``.

    A shard is closed as soon as it holds at least ``shard_tokens`` tokens, so a shard exceeds
    ``shard_tokens`` by less than one document, and a document longer than ``shard_tokens`` gets a
    shard of its own. Memory use is bounded by one shard.

    Args:
        dataset_dir: the dataset directory (shard paths in records are relative to it).
        split: split name; shards go to ``dataset_dir/split/``.
        dtype: shard dtype (`token_dtype`).
        shard_tokens: target tokens per shard (> 0).
    """

    def __init__(self, dataset_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be > 0, got {shard_tokens}")
        self.dataset_dir = Path(dataset_dir)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.records: list[ShardRecord] = []
        self._docs: list[np.ndarray] = []
        self._num_tokens = 0

    @property
    def num_tokens(self) -> int:
        """Tokens written so far, including the open shard."""
        return sum(r.num_tokens for r in self.records) + self._num_tokens

    def add(self, doc_tokens: np.ndarray) -> None:
        """Append one document (a 1-D integer array that already ends with EOS)."""
        # A copy in the shard dtype: never a view that would keep a larger buffer alive.
        self._docs.append(np.array(doc_tokens, dtype=self.dtype))
        self._num_tokens += len(doc_tokens)
        if self._num_tokens >= self.shard_tokens:
            self._flush()

    def close(self) -> list[ShardRecord]:
        """Write the open shard (if any) and return the records of every shard written."""
        if self._docs:
            self._flush()
        return list(self.records)

    def _flush(self) -> None:
        split_dir = self.dataset_dir / self.split
        split_dir.mkdir(parents=True, exist_ok=True)
        stem = f"shard-{len(self.records):05d}"
        shard_path, index_path = split_dir / f"{stem}.npy", split_dir / f"{stem}.idx"
        lengths = np.fromiter((len(d) for d in self._docs), dtype=np.int64, count=len(self._docs))
        ends = np.cumsum(lengths)
        tokens = np.concatenate(self._docs)
        tmp = shard_path.with_name(shard_path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, tokens, allow_pickle=False)
        _replace_atomically(tmp, shard_path)
        write_index(index_path, np.stack([ends - lengths, ends], axis=1))
        self.records.append(ShardRecord(
            path=shard_path.relative_to(self.dataset_dir).as_posix(),
            index_path=index_path.relative_to(self.dataset_dir).as_posix(),
            num_tokens=int(len(tokens)),
            num_documents=len(self._docs),
            sha256=sha256_file(shard_path),
            index_sha256=sha256_file(index_path),
        ))
        self._docs, self._num_tokens = [], 0

    @staticmethod
    def split_entry(records: list[ShardRecord]) -> dict[str, Any]:
        """The manifest's ``splits[split]`` entry for ``records``."""
        return {
            "num_tokens": sum(r.num_tokens for r in records),
            "num_documents": sum(r.num_documents for r in records),
            "shards": [asdict(r) for r in records],
        }


_REQUIRED_FIELDS = ("format", "format_version", "name", "tokenizer", "tokenizer_hash", "n_vocab",
                    "eos_id", "dtype", "splits")


def read_manifest(dataset_dir: Path) -> dict[str, Any]:
    """Read and sanity-check ``dataset_dir/manifest.json``.

    Raises:
        DataError: no manifest (not a prepared dataset, or its prep was interrupted), invalid JSON,
            missing fields, or an unsupported format version.
    """
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / MANIFEST_NAME
    if dataset_dir.is_file():
        raise DataError(f"{dataset_dir} is a file, not a prepared dataset directory; tokenize it "
                        f"with `n data prep {dataset_dir} --out DIR` and use DIR")
    if not path.is_file():
        why = ("the directory does not exist" if not dataset_dir.exists() else
               "it is not a prepared dataset, or its prep was interrupted before finishing")
        raise DataError(f"{path}: no manifest ({why}); prepare it with "
                        f"`n data prep SOURCE --out {dataset_dir}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); re-run `n data prep`") from None
    missing = [k for k in _REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise DataError(f"{path}: manifest lacks field(s) {', '.join(missing)}; "
                        f"re-run `n data prep`")
    if manifest["format"] != FORMAT_NAME or manifest["format_version"] != FORMAT_VERSION:
        raise DataError(f"{path}: format {manifest['format']!r} version "
                        f"{manifest['format_version']} is not supported (expected {FORMAT_NAME!r} "
                        f"version {FORMAT_VERSION}); re-run `n data prep` with this nmoe-train")
    return manifest


def split_fingerprint(manifest: dict[str, Any], split: str) -> str:
    """A short hash identifying the token content of ``split`` (shard checksums + tokenizer)."""
    shards = manifest["splits"].get(split, {}).get("shards", [])
    key = json.dumps([manifest["tokenizer_hash"], manifest["dtype"],
                      [(s["sha256"], s["num_tokens"]) for s in shards]])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _open_shard(dataset_dir: Path, entry: dict[str, Any], dtype: np.dtype) -> np.ndarray:
    path = dataset_dir / entry["path"]
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: shard file is missing; re-run `n data prep`") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npy shard ({e}); re-run `n data prep`") from None
    if tokens.dtype != dtype or tokens.ndim != 1:
        raise DataError(f"{path}: shard is {tokens.dtype}{list(tokens.shape)}, the manifest says "
                        f"1-D {dtype}; re-run `n data prep`")
    if len(tokens) != entry["num_tokens"]:
        raise DataError(f"{path}: shard holds {len(tokens)} tokens, the manifest says "
                        f"{entry['num_tokens']}; the file is truncated or was replaced")
    return tokens


def open_split(dataset_dir: Path, split: str,
               manifest: dict[str, Any] | None = None) -> list[np.ndarray]:
    """Memory-map the shards of ``split`` (read-only ``np.memmap`` arrays, in manifest order).

    Checks each shard's dtype and length against the manifest, not its checksum (see `verify`).
    """
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir) if manifest is None else manifest
    if split not in manifest["splits"]:
        raise DataError(f"{dataset_dir / MANIFEST_NAME}: no split {split!r} (has "
                        f"{', '.join(manifest['splits'])})")
    dtype = np.dtype(manifest["dtype"])
    return [_open_shard(dataset_dir, e, dtype) for e in manifest["splits"][split]["shards"]]


def _verify_shard(dataset_dir: Path, manifest: dict[str, Any], entry: dict[str, Any],
                  checksums: bool) -> None:
    dtype = np.dtype(manifest["dtype"])
    shard_path, index_path = dataset_dir / entry["path"], dataset_dir / entry["index_path"]
    if checksums:  # before parsing, so that a flipped byte anywhere is reported as such
        for path, key in ((shard_path, "sha256"), (index_path, "index_sha256")):
            if not path.is_file():
                raise DataError(f"{path}: file is missing; re-run `n data prep`")
            actual = sha256_file(path)
            if actual != entry[key]:
                raise DataError(f"{path}: SHA-256 {actual[:16]}... does not match the manifest's "
                                f"{entry[key][:16]}...; the file is corrupt, re-run `n data prep`")
    tokens = _open_shard(dataset_dir, entry, dtype)
    bounds = read_index(index_path)
    if len(bounds) != entry["num_documents"]:
        raise DataError(f"{index_path}: {len(bounds)} documents, the manifest says "
                        f"{entry['num_documents']}")
    starts, ends = bounds[:, 0].astype(np.int64), bounds[:, 1].astype(np.int64)
    if len(bounds) and (starts[0] != 0 or ends[-1] != len(tokens)
                        or np.any(starts[1:] != ends[:-1]) or np.any(ends <= starts)):
        raise DataError(f"{index_path}: document bounds do not tile its shard "
                        f"({shard_path.name}, {len(tokens)} tokens)")
    if len(bounds) and np.any(tokens[ends - 1] != manifest["eos_id"]):
        bad = int(np.flatnonzero(tokens[ends - 1] != manifest["eos_id"])[0])
        raise DataError(f"{shard_path}: document {bad} does not end with EOS id "
                        f"{manifest['eos_id']}; the shard and its index disagree")
    if checksums:
        for i in range(0, len(tokens), 1 << 24):
            top = int(tokens[i:i + (1 << 24)].max())
            if top >= manifest["n_vocab"]:
                raise DataError(f"{shard_path}: token id {top} >= n_vocab {manifest['n_vocab']}")


def verify(dataset_dir: Path, checksums: bool = True) -> dict[str, Any]:
    """Check that a prepared dataset is complete and consistent; return its manifest.

    Checks the manifest fields and per-split totals, every shard's dtype and length, every index
    (header, bounds tiling the shard, each document ending with EOS) and, when ``checksums``, the
    SHA-256 of every shard and index and that all token ids are below ``n_vocab`` (reads all data).

    Args:
        dataset_dir: directory holding ``manifest.json``.
        checksums: also hash every file (slow for big datasets: reads everything once).

    Raises:
        DataError: naming the first bad file and what is wrong with it.
    """
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    expected_dtype = token_dtype(manifest["n_vocab"])
    if np.dtype(manifest["dtype"]) != expected_dtype:
        raise DataError(f"{dataset_dir / MANIFEST_NAME}: dtype {manifest['dtype']} does not fit "
                        f"n_vocab {manifest['n_vocab']} (expected {expected_dtype})")
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            _verify_shard(dataset_dir, manifest, shard, checksums)
        for key in ("num_tokens", "num_documents"):
            total = sum(s[key] for s in entry["shards"])
            if total != entry[key]:
                raise DataError(f"{dataset_dir / MANIFEST_NAME}: splits.{split}.{key} is "
                                f"{entry[key]} but its shards sum to {total}")
    return manifest
