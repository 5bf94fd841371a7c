"""Data preparation: documents -> tokenized shards + manifest (`prepare`), and ``n data``.

Pipeline: a source (`nmoe_train.data.sources`) yields documents in a fixed order; they are
tokenized with ``encode_ordinary`` (special-token text such as ``<|endoftext|>`` inside a document
is encoded as ordinary text), EOS is appended to each, and each document goes to ``val`` when
``sha256(doc_id)``, read as a fraction of 2**64, is below ``val_fraction`` (else ``train``), or all
of a separate ``val_source`` goes to ``val``. Shards are written by `shards.ShardWriter`; the
manifest comes last. With ``workers > 1`` batches of documents are tokenized in worker processes
and their results consumed in submission order, so the output is byte-identical for any
``workers``. Empty or whitespace-only documents are skipped (and counted in the manifest).

The command line (wired to ``n data`` by nmoe-train's CLI)::

    n data prep SOURCE [SOURCE ...] --out DIR [--tokenizer gpt2] [--text-field text]
                [--split train] [--val-fraction 0.01 | --val-source SRC] [--shard-tokens 50M]
                [--max-tokens N] [--doc-sep file|blank|line] [--workers N] [--name NAME]
                [--overwrite] [--no-progress]
    n data verify DIR [--no-checksums]
    n data info DIR [--json]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import math
import multiprocessing
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nmoe_train.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    DataError,
    ShardWriter,
    read_manifest,
    token_dtype,
    verify,
    write_json_atomic,
)
from nmoe_train.data.sources import DOC_SEPS, Document, Source, open_source

__all__ = ["data_main", "data_prep_main", "is_val_document", "parse_count", "prep_args",
           "prepare", "unigram_entropy"]

_BATCH_DOCS = 512
_BATCH_CHARS = 1 << 21
_COUNT_SUFFIXES = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def is_val_document(doc_id: str, val_fraction: float) -> bool:
    """Whether document ``doc_id`` belongs to the val split: ``sha256(id) / 2**64 < fraction``.

    Args:
        doc_id: the document's stable id.
        val_fraction: in ``[0, 1)``.
    """
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h < int(val_fraction * 2**64)


def unigram_entropy(counts_V: np.ndarray) -> float:
    """Entropy in nats of the empirical unigram distribution with token counts ``counts_V``.

    This is the cross-entropy loss (nats/token) of the best model that ignores context, a
    ceiling a trained model must beat.
    """
    counts = counts_V[counts_V > 0].astype(np.float64)
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def parse_count(text: str | int) -> int:
    """``"50M"`` -> 50_000_000; accepts ints, ``1e9``, ``2.5B``, ``500k``, ``100_000``."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?(?:[eE][0-9]+)?)\s*([kKMBGT]?)\s*", str(text))
    if not m:
        raise ValueError(f"not a count: {text!r} (examples: 1000000, 50M, 2.5B, 1e9)")
    value = float(m.group(1).replace("_", "")) * _COUNT_SUFFIXES[m.group(2)]
    if value != int(value):
        raise ValueError(f"not a whole count: {text!r}")
    return int(value)


def prep_args(source: Any, tokenizer: str, *, text_field: str = "text", split: str = "train",
              val_fraction: float = 0.01, val_source: Any = None,
              shard_tokens: int = 50_000_000, max_tokens: int | None = None,
              doc_sep: str = "file") -> dict[str, Any]:
    """The manifest's ``prep_args``: the `prepare` arguments that determine the output bytes."""
    def spec(s: Any) -> Any:
        if isinstance(s, (list, tuple)):
            return str(s[0]) if len(s) == 1 else [str(x) for x in s]
        return None if s is None else str(s)

    return {"source": spec(source), "tokenizer": tokenizer, "text_field": text_field,
            "split": split, "val_fraction": None if val_source is not None else float(val_fraction),
            "val_source": spec(val_source), "shard_tokens": int(shard_tokens),
            "max_tokens": None if max_tokens is None else int(max_tokens), "doc_sep": doc_sep}


# -- tokenization ----------------------------------------------------------------------------------


def _tokenize(tokenizer: str, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``texts``; return (all tokens with EOS after each doc as uint32, doc lengths)."""
    from nmoe_core.tokenizer import get_tokenizer

    enc = get_tokenizer(tokenizer)
    flat: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        ids = enc.encode_ordinary(text)
        flat.extend(ids)
        flat.append(enc.eot_token)
        lengths[i] = len(ids) + 1
    return np.array(flat, dtype=np.uint32), lengths


def _batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenized(tokenizer: str, batches: Iterator[list[Document]], workers: int, pool: Any
               ) -> Iterator[tuple[list[Document], np.ndarray, np.ndarray]]:
    """Yield ``(batch, tokens, lengths)`` in input order; at most 2 * workers batches in flight."""
    if pool is None:
        for batch in batches:
            yield batch, *_tokenize(tokenizer, [d.text for d in batch])
        return
    pending: collections.deque = collections.deque()
    for batch in batches:
        pending.append((batch, pool.apply_async(_tokenize, (tokenizer, [d.text for d in batch]))))
        if len(pending) >= 2 * workers:
            done, result = pending.popleft()
            yield done, *result.get()
    while pending:
        done, result = pending.popleft()
        yield done, *result.get()


# -- prepare ---------------------------------------------------------------------------------------


_STAGING = "prep.tmp"  # inside --out: where a prep writes until it has finished


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is not a directory, holds anything that is not ours, or holds a
    dataset without ``overwrite``; nothing is deleted here."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a directory")
    entries = list(out.iterdir()) if out.exists() else []
    ours = {MANIFEST_NAME, *SPLITS}
    foreign = [e.name for e in entries if e.name not in ours and not e.name.endswith(".tmp")]
    if foreign:
        raise DataError(f"--out {out}: directory holds files that are not an nmoe dataset "
                        f"({', '.join(sorted(foreign)[:3])}); choose an empty or new directory")
    if (out / MANIFEST_NAME).exists() and not overwrite:
        raise DataError(f"--out {out}: already holds a prepared dataset; pass --overwrite "
                        f"(overwrite=True) to replace it")


def _remove(entry: Path) -> None:
    if entry.is_dir():
        shutil.rmtree(entry)
    elif entry.exists():
        entry.unlink()


def _install(staging: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Replace what ``out`` holds (an old dataset, leftovers) by the finished prep in
    ``staging``: the old manifest goes first and the new one comes last, so no manifest ever
    points at files that are not its own."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for entry in out.iterdir():
        if entry != staging:
            _remove(entry)
    for entry in staging.iterdir():
        entry.rename(out / entry.name)
    staging.rmdir()
    write_json_atomic(out / MANIFEST_NAME, manifest)


class _Progress:
    """Progress of one source: input MB / docs, or tokens when ``max_tokens`` bounds the work."""

    def __init__(self, source: Source, name: str, max_tokens: int | None, enabled: bool):
        self.source, self.max_tokens, self.bar, self.shown = source, max_tokens, None, 0
        if enabled:
            from nmoe_core.progress import Progress

            if max_tokens is not None:
                self.bar = Progress(max_tokens, f"prep {name}", "tok")
            else:
                self.bar = Progress(source.progress_total, f"prep {name}", source.progress_unit)

    def update(self, num_tokens: int, num_docs: int) -> None:
        if self.bar is None:
            return
        from nmoe_core.progress import format_count

        done = num_tokens if self.max_tokens is not None else int(self.source.progress_done)
        if self.bar.total is not None:
            done = min(done, self.bar.total)
        self.bar.update(max(done - self.shown, 0), tokens=format_count(num_tokens),
                        docs=format_count(num_docs))
        self.shown = max(done, self.shown)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _consume(source: Source, name: str, *, tokenizer: str, writers: dict[str, ShardWriter],
             val_fraction: float | None, max_tokens: int | None, workers: int,
             counts_V: np.ndarray, progress: bool) -> dict[str, int]:
    """Tokenize ``source`` into ``writers``; ``val_fraction=None`` sends everything to val."""
    stats = {"num_documents": 0, "num_tokens": 0, "num_skipped_empty": 0}

    def nonempty() -> Iterator[Document]:
        for doc in source.documents():
            if doc.text.strip():
                yield doc
            else:
                stats["num_skipped_empty"] += 1

    bar = _Progress(source, name, max_tokens, progress)
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(workers) if workers > 1 else None
    try:
        for batch, tokens, lengths in _tokenized(tokenizer, _batches(nonempty()), workers, pool):
            is_train = np.array([val_fraction is not None and
                                 not is_val_document(d.doc_id, val_fraction) for d in batch])
            ends = np.cumsum(lengths)
            stop = len(batch)
            if max_tokens is not None:  # keep whole documents up to the first that reaches it
                over = np.flatnonzero(stats["num_tokens"] + ends >= max_tokens)
                stop = int(over[0]) + 1 if len(over) else stop
            for i in range(stop):
                writers["train" if is_train[i] else "val"].add(tokens[ends[i] - lengths[i]:ends[i]])
            train_mask = np.repeat(is_train[:stop], lengths[:stop])
            counts_V += np.bincount(tokens[:ends[stop - 1]][train_mask], minlength=len(counts_V))
            stats["num_documents"] += stop
            stats["num_tokens"] += int(ends[stop - 1])
            bar.update(stats["num_tokens"], stats["num_documents"])
            if stop < len(batch) or (max_tokens is not None and stats["num_tokens"] >= max_tokens):
                break
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    if stats["num_documents"] == 0:
        raise DataError(f"source {source.spec!r} yielded no non-empty documents"
                        + (f" (check text_field={source.text_field!r})"
                           if hasattr(source, "text_field") else ""))
    return stats


def prepare(source: Any, out_dir: Path | str, tokenizer: str = "gpt2", *,
            text_field: str = "text", split: str = "train", val_fraction: float = 0.01,
            val_source: Any = None, shard_tokens: int = 50_000_000,
            max_tokens: int | None = None, name: str | None = None, doc_sep: str = "file",
            workers: int = 1, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Tokenize a document source into a prepared dataset directory; return its manifest.

    Args:
        source: a path or list of paths (``.txt``/``.md``/``.jsonl``/``.jsonl.gz``/``.parquet``
            files or directories), ``hf:owner/name[:subset][@split]`` or ``builtin:shakespeare``
            (`nmoe_train.data.sources`).
        out_dir: the dataset directory to write (created; must be empty or a previous dataset).
        tokenizer: a name from `nmoe_core.tokenizer.TOKENIZER_NAMES`.
        text_field: JSONL field / Parquet or HF column holding the text.
        split: Hugging Face split to read.
        val_fraction: in ``[0, 1)``: fraction of documents (by id hash) held out as ``val``.
            Ignored when ``val_source`` is given.
        val_source: optional separate source (same forms as ``source``) that becomes the whole
            ``val`` split; ``source`` then goes entirely to ``train``.
        shard_tokens: close a shard once it holds at least this many tokens (> 0).
        max_tokens: stop reading each source after the document that brings its token count to
            at least this (EOS included); None reads everything.
        name: dataset name for the manifest (default: the directory name).
        doc_sep: how ``.txt``/``.md`` files split into documents: ``"file"`` (each file is one
            document, the default), ``"blank"`` (blank-line runs separate documents) or
            ``"line"`` (one document per line).
        workers: tokenizer processes (>= 1); the output does not depend on it.
        progress: show progress on stderr (a bar on a terminal, log lines otherwise).
        overwrite: replace a dataset already in ``out_dir``.

    Raises:
        DataError: bad source, unreachable hub, non-empty foreign ``out_dir``, no documents.
        ValueError: an argument out of range.
    """
    from nmoe_core.tokenizer import tokenizer_info

    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be > 0, got {shard_tokens}")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0 or None, got {max_tokens}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if doc_sep not in DOC_SEPS:
        raise ValueError(f"doc_sep must be one of {', '.join(DOC_SEPS)}, got {doc_sep!r}")
    info = tokenizer_info(tokenizer)
    out = Path(out_dir)
    name = name or out.resolve().name
    opened = open_source(source, text_field=text_field, split=split, doc_sep=doc_sep)
    opened_val = None if val_source is None else open_source(
        val_source, text_field=text_field, split=split, doc_sep=doc_sep)
    _check_out_dir(out, overwrite)
    created = not out.exists()
    # Written into a staging directory and moved into place once finished: a prep that fails
    # or is interrupted leaves the dataset already in ``out`` as it was.
    staging = out / _STAGING
    if staging.exists():  # left by an earlier prep that did not finish
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        manifest = _prepare_into(staging, opened, opened_val, name, info, tokenizer,
                                 val_fraction, max_tokens, workers, progress, shard_tokens)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)  # empty: we made it a moment ago
        raise
    manifest["prep_args"] = prep_args(source, tokenizer, text_field=text_field, split=split,
                                      val_fraction=val_fraction, val_source=val_source,
                                      shard_tokens=shard_tokens, max_tokens=max_tokens,
                                      doc_sep=doc_sep)
    _install(staging, out, manifest)
    return manifest


def _prepare_into(out: Path, opened: Source, opened_val: Source | None, name: str, info: Any,
                  tokenizer: str, val_fraction: float, max_tokens: int | None, workers: int,
                  progress: bool, shard_tokens: int) -> dict[str, Any]:
    """`prepare`'s work once its arguments are checked: shards into ``out`` (a fresh
    directory) and the manifest, less ``prep_args``, returned, not written."""
    dtype = token_dtype(info.n_vocab)
    writers = {s: ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    counts_V = np.zeros(info.n_vocab, dtype=np.int64)
    common = dict(tokenizer=tokenizer, writers=writers, max_tokens=max_tokens, workers=workers,
                  counts_V=counts_V, progress=progress)
    if opened_val is None:
        src_stats = _consume(opened, name, val_fraction=val_fraction, **common)
    else:
        src_stats = _consume(opened, name, val_fraction=0.0, **common)
        val_stats = _consume(opened_val, f"{name} (val)", val_fraction=None, **common)

    splits = {s: ShardWriter.split_entry(w.close()) for s, w in writers.items()}
    entropy = unigram_entropy(counts_V)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "name": name,
        "tokenizer": tokenizer,
        "tokenizer_hash": info.hash,
        "n_vocab": info.n_vocab,
        "padded_vocab_size": info.padded_vocab_size,
        "eos_id": info.eos_id,
        "dtype": dtype.name,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "splits": splits,
        "stats": {"train": {
            "num_tokens": splits["train"]["num_tokens"],
            "num_documents": splits["train"]["num_documents"],
            "num_distinct_tokens": int(np.count_nonzero(counts_V)),
            "unigram_entropy_nats": round(entropy, 6),
            "unigram_entropy_bits": round(entropy / math.log(2), 6),
        }},
        "source": {**opened.describe(), **src_stats},
        "val_source": None if opened_val is None else {**opened_val.describe(), **val_stats},
    }
    return manifest


# -- command line ----------------------------------------------------------------------------------


def _summary(path: Path, manifest: dict[str, Any]) -> str:
    from nmoe_core.progress import format_count

    lines = [f"{path}: {manifest['name']} ({manifest['tokenizer']}, {manifest['dtype']}, "
             f"eos {manifest['eos_id']}, created {manifest.get('created_at', '?')})"]
    for split, entry in manifest["splits"].items():
        lines.append(f"  {split:5s} {format_count(entry['num_tokens']):>7s} tokens  "
                     f"{format_count(entry['num_documents']):>7s} docs  "
                     f"{len(entry['shards'])} shard(s)")
    train = manifest.get("stats", {}).get("train")
    if train:
        lines.append(f"  unigram entropy (train): {train['unigram_entropy_nats']:.4f} nats/token, "
                     f"{train['num_distinct_tokens']} distinct tokens")
    src = manifest.get("source") or {}
    lines.append(f"  source: {src.get('spec', '?')}")
    if manifest.get("val_source"):
        lines.append(f"  val source: {manifest['val_source'].get('spec', '?')}")
    return "\n".join(lines)


def _prep_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("source", nargs="+", metavar="SOURCE",
                        help="text/JSONL/Parquet files or directories, hf:owner/name[:subset]"
                             "[@split], or builtin:shakespeare")
    parser.add_argument("--out", required=True, type=Path, help="dataset directory to write")
    parser.add_argument("--tokenizer", default="gpt2",
                        help="gpt2 | o200k_base | o200k_harmony (default: gpt2)")
    parser.add_argument("--text-field", default="text",
                        help="JSONL field / Parquet or HF column with the text (default: text)")
    parser.add_argument("--split", default="train", help="Hugging Face split (default: train)")
    val = parser.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=0.01,
                     help="fraction of documents held out as val, by id hash (default: 0.01)")
    val.add_argument("--val-source", default=None,
                     help="a separate source that becomes the whole val split")
    parser.add_argument("--shard-tokens", type=parse_count, default=50_000_000,
                        help="tokens per shard, e.g. 50M (default: 50M)")
    parser.add_argument("--max-tokens", type=parse_count, default=None,
                        help="stop each source after about this many tokens, e.g. 100M")
    parser.add_argument("--doc-sep", choices=DOC_SEPS, default="file",
                        help="text files: one document per file (default), per blank-line-"
                             "separated block, or per line")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    parser.add_argument("--name", default=None, help="dataset name (default: the --out name)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress output")
    return parser


def _run_prep(args: argparse.Namespace) -> int:
    manifest = prepare(args.source, args.out, args.tokenizer, text_field=args.text_field,
                       split=args.split, val_fraction=args.val_fraction,
                       val_source=args.val_source, shard_tokens=args.shard_tokens,
                       max_tokens=args.max_tokens, name=args.name, doc_sep=args.doc_sep,
                       workers=args.workers, progress=not args.no_progress,
                       overwrite=args.overwrite)
    print(_summary(args.out, manifest))
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    manifest = verify(args.dir, checksums=not args.no_checksums)
    num_shards = sum(len(e["shards"]) for e in manifest["splits"].values())
    what = "checksums, indexes and sizes" if not args.no_checksums else "indexes and sizes"
    print(f"{args.dir}: OK ({num_shards} shard(s); {what} match the manifest)")
    return 0


def _run_info(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.dir)
    print(json.dumps(manifest, indent=2) if args.json else _summary(args.dir, manifest))
    return 0


def _main(parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    try:
        args = parser.parse_args(list(argv))
        return args.run(args)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 1
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the output directory is as it was before", file=sys.stderr)
        return 130


def data_prep_main(argv: Sequence[str]) -> int:
    """``n data prep``: parse ``argv`` (the arguments after ``prep``), run `prepare`, print a
    summary. Returns the exit code (0 ok, 1 bad input with a one-line ``error:`` message)."""
    parser = _prep_parser(argparse.ArgumentParser(
        prog="n data prep", description="Tokenize documents into nmoe token shards."))
    parser.set_defaults(run=_run_prep)
    return _main(parser, argv)


def data_main(argv: Sequence[str]) -> int:
    """``n data``: dispatch ``prep`` / ``verify`` / ``info`` (``n data --help`` lists them).

    Returns the exit code: 0 ok, 1 bad input or a failed verification (message on stderr),
    2 usage error.
    """
    parser = argparse.ArgumentParser(
        prog="n data", description="Prepare, check and describe token datasets.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    prep = sub.add_parser("prep", help="tokenize documents into token shards + manifest",
                          description="Tokenize documents into nmoe token shards.")
    _prep_parser(prep).set_defaults(run=_run_prep)
    check = sub.add_parser("verify", help="check a dataset's files against its manifest",
                           description="Check shards, indexes and checksums against the "
                                       "manifest; names the first bad file.")
    check.add_argument("dir", type=Path, help="dataset directory")
    check.add_argument("--no-checksums", action="store_true",
                       help="skip SHA-256 (fast; sizes and indexes only)")
    check.set_defaults(run=_run_verify)
    show = sub.add_parser("info", help="summarize a dataset's manifest",
                          description="Print a dataset's manifest summary.")
    show.add_argument("dir", type=Path, help="dataset directory")
    show.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    show.set_defaults(run=_run_info)
    return _main(parser, argv)
