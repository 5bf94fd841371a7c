"""Data prep round trips on fresh random documents: text / JSONL / Parquet -> shards -> decode
equals the documents; shards, indexes and manifest agree; verify names a corrupted file; output is
identical for any worker count; the val split is a stable function of document ids; dtype follows
the vocabulary; an unreachable hub gives one clear error; writes are atomic.

Each test draws its data from a seed printed in failure messages (``seed=...``).
"""

from __future__ import annotations

import gzip
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nmoe_core.tokenizer import get_tokenizer, tokenizer_info
from nmoe_train.data import DataError, data_main, prepare, read_index, read_manifest, verify
from nmoe_train.data.prep import is_val_document, parse_count, unigram_entropy

# Long-assigned code point ranges: ASCII, Latin-1/Extended, Greek, Cyrillic, CJK, emoji.
_BLOCKS = [(0x21, 0x7E), (0xC0, 0x24F), (0x391, 0x3C9), (0x410, 0x44F), (0x4E00, 0x4FFF),
           (0x1F600, 0x1F64F)]
_SNIPPETS = [" the", " and", " of", "<|endoftext|>", "'s", "123", "\t", ", ", ". "]


@pytest.fixture
def seed() -> int:
    return time.time_ns() % 2**32


def _random_doc(rng: random.Random, *, allow_newlines: bool = True) -> str:
    out: list[str] = []
    for _ in range(rng.randint(1, 60)):
        r = rng.random()
        if r < 0.5:
            lo, hi = rng.choice(_BLOCKS)
            out.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))))
        elif r < 0.8:
            out.append(rng.choice(_SNIPPETS))
        elif r < 0.9 and allow_newlines:
            out.append(rng.choice(["\n", "\n\n", "\r\n"]))
        else:
            out.append(" ")
    text = "".join(out)
    return text if text.strip() else text + "x"


def _split_docs(out: Path, manifest: dict, split: str) -> list[list[int]]:
    """Every document of ``split`` as a token list (EOS included), via the index files."""
    docs = []
    for shard in manifest["splits"][split]["shards"]:
        tokens = np.load(out / shard["path"])
        for start, end in read_index(out / shard["index_path"]):
            docs.append(tokens[start:end].tolist())
    return docs


def _check_round_trip(out: Path, manifest: dict, docs: list[tuple[str, str]], seed: int,
                      tokenizer: str = "gpt2") -> None:
    """The dataset at ``out`` holds exactly ``docs`` ((id, text), in order) split by id hash."""
    enc = get_tokenizer(tokenizer)
    eos = tokenizer_info(tokenizer).eos_id
    frac = manifest["prep_args"]["val_fraction"]
    for split in ("train", "val"):
        want = [text for doc_id, text in docs if is_val_document(doc_id, frac) == (split == "val")]
        got = _split_docs(out, manifest, split)
        assert len(got) == len(want), (seed, split, len(got), len(want))
        for i, (tokens, text) in enumerate(zip(got, want)):
            assert tokens[-1] == eos and eos not in tokens[:-1], (seed, split, i)
            assert tokens[:-1] == enc.encode_ordinary(text), (seed, split, i)
            assert enc.decode(tokens[:-1]) == text, (seed, split, i)
        entry = manifest["splits"][split]
        assert entry["num_documents"] == len(want), seed
        assert entry["num_tokens"] == sum(len(t) for t in got), seed
    verify(out, checksums=True)


def test_text_directory_round_trip(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    docs = []
    for i in range(rng.randint(20, 40)):
        rel = f"sub/d{i:03d}.md" if i % 3 == 0 else f"d{i:03d}.txt"
        text = _random_doc(rng)
        (src / rel).write_text(text, encoding="utf-8", newline="")
        docs.append((f"corpus/{rel}", text))
    (src / "notes.json").write_text("{}")  # ignored: unknown suffix inside a directory
    (src / ".hidden.txt").write_text("ignored")
    docs.sort()  # directories are walked in sorted path order
    manifest = prepare(src, tmp_path / "out", val_fraction=0.3, shard_tokens=rng.randint(5, 200),
                       progress=False)
    _check_round_trip(tmp_path / "out", manifest, docs, seed)
    assert manifest["source"]["num_files"] == len(docs), seed
    shard_tokens = manifest["prep_args"]["shard_tokens"]
    for split in ("train", "val"):  # every shard but the last closes as soon as it is full
        for shard in manifest["splits"][split]["shards"][:-1]:
            last_start, last_end = read_index(tmp_path / "out" / shard["index_path"])[-1]
            assert shard["num_tokens"] >= shard_tokens > last_start, (seed, shard)


@pytest.mark.parametrize("doc_sep", ["blank", "line"])
def test_text_file_split_into_documents(tmp_path: Path, seed: int, doc_sep: str):
    rng = random.Random(seed)
    texts = []
    for _ in range(rng.randint(10, 30)):
        words = [_random_doc(rng, allow_newlines=False).strip() or "x"
                 for _ in range(rng.randint(1, 3) if doc_sep == "blank" else 1)]
        texts.append("\n".join(words))
    sep = "\n" + "\n" * rng.randint(1, 3) if doc_sep == "blank" else "\n"
    (tmp_path / "big.txt").write_text(sep.join(texts) + "\n", encoding="utf-8", newline="")
    manifest = prepare(tmp_path / "big.txt", tmp_path / "out", doc_sep=doc_sep,
                       val_fraction=0.2, progress=False)
    _check_round_trip(tmp_path / "out", manifest,
                      [(f"big.txt#{k}", t) for k, t in enumerate(texts)], seed)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_jsonl_round_trip(tmp_path: Path, seed: int, suffix: str):
    rng = random.Random(seed)
    lines, docs = [], []
    for lineno in range(1, rng.randint(30, 60)):
        kind = rng.random()
        if kind < 0.05:
            lines.append("")  # blank line: skipped, still counted in line numbers
            continue
        text = None if kind < 0.1 else "  \n " if kind < 0.15 else _random_doc(rng)
        lines.append(json.dumps({"id": lineno, "body": text, "other": "x"}))
        if text is not None and text.strip():
            docs.append((f"data{suffix}:{lineno}", text))
    raw = ("\n".join(lines) + "\n").encode()
    (tmp_path / f"data{suffix}").write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
    manifest = prepare(tmp_path / f"data{suffix}", tmp_path / "out", text_field="body",
                       val_fraction=0.25, progress=False)
    _check_round_trip(tmp_path / "out", manifest, docs, seed)
    skipped_empty = sum(1 for x in lines if x and json.loads(x)["body"] == "  \n ")
    assert manifest["source"]["num_skipped_empty"] == skipped_empty, seed
    with pytest.raises(DataError, match=r"no field 'text'.*--text-field"):
        prepare(tmp_path / f"data{suffix}", tmp_path / "out2", progress=False)


def test_parquet_round_trip(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    texts = [_random_doc(rng) for _ in range(rng.randint(1500, 2500))]  # > 1 parquet batch
    texts[rng.randrange(len(texts))] = None
    pq.write_table(pa.table({"content": texts, "n": list(range(len(texts)))}),
                   tmp_path / "part.parquet", row_group_size=rng.randint(100, 900))
    manifest = prepare(tmp_path / "part.parquet", tmp_path / "out", text_field="content",
                       val_fraction=0.1, shard_tokens=20_000, progress=False)
    docs = [(f"part.parquet:{row}", t) for row, t in enumerate(texts) if t is not None]
    _check_round_trip(tmp_path / "out", manifest, docs, seed)
    with pytest.raises(DataError, match=r"no column 'text' \(columns: content, n\)"):
        prepare(tmp_path / "part.parquet", tmp_path / "out2", progress=False)


def test_workers_give_identical_output(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    with open(tmp_path / "a.jsonl", "w") as f:
        for _ in range(1500):  # several tokenizer batches
            f.write(json.dumps({"text": _random_doc(rng)}) + "\n")
    kw = dict(val_fraction=0.1, shard_tokens=rng.randint(2000, 20000), progress=False)
    m1 = prepare(tmp_path / "a.jsonl", tmp_path / "w1", workers=1, name="same", **kw)
    m2 = prepare(tmp_path / "a.jsonl", tmp_path / "w2", workers=2, name="same", **kw)
    for m in (m1, m2):
        m.pop("created_at")
    assert m1 == m2, seed
    files = sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1").rglob("*.*"))
    assert len(files) >= 5, (seed, files)
    for rel in files:
        if rel.name != "manifest.json":
            assert (tmp_path / "w1" / rel).read_bytes() == (tmp_path / "w2" / rel).read_bytes(), \
                (seed, rel)


def test_val_split_is_stable_and_disjoint(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    ids = [f"doc{i}-{rng.getrandbits(32):08x}.txt" for i in range(300)]
    src = tmp_path / "src"
    src.mkdir()
    for name in ids:
        (src / name).write_text(f"{name} {_random_doc(rng)}")
    frac = rng.uniform(0.1, 0.5)

    def val_ids(out: Path, manifest: dict) -> set[str]:
        enc = get_tokenizer("gpt2")
        return {enc.decode(d[:-1]).split(" ")[0] for d in _split_docs(out, manifest, "val")}

    m1 = prepare(src, tmp_path / "o1", val_fraction=frac, progress=False)
    # Rewrite every document's text (same ids) and re-run with other shard sizes and workers.
    for name in ids:
        (src / name).write_text(f"{name} {_random_doc(rng)}")
    m2 = prepare(src, tmp_path / "o2", val_fraction=frac, shard_tokens=500, workers=2,
                 progress=False)
    expected = {n for n in ids if is_val_document(f"src/{n}", frac)}
    assert val_ids(tmp_path / "o1", m1) == expected == val_ids(tmp_path / "o2", m2), seed
    n_val = m1["splits"]["val"]["num_documents"]
    assert n_val + m1["splits"]["train"]["num_documents"] == len(ids), seed
    # 300 Bernoulli(frac) draws: within 5 standard deviations.
    assert abs(n_val - frac * len(ids)) < 5 * (len(ids) * frac * (1 - frac)) ** 0.5, (seed, n_val)


def test_explicit_val_source(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    train = [_random_doc(rng) for _ in range(20)]
    val = [_random_doc(rng) for _ in range(7)]
    for name, texts in (("t.jsonl", train), ("v.jsonl", val)):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    m = prepare(tmp_path / "t.jsonl", tmp_path / "out", val_source=tmp_path / "v.jsonl",
                progress=False)
    enc = get_tokenizer("gpt2")
    assert [enc.decode(d[:-1]) for d in _split_docs(tmp_path / "out", m, "train")] == train, seed
    assert [enc.decode(d[:-1]) for d in _split_docs(tmp_path / "out", m, "val")] == val, seed
    assert m["prep_args"]["val_fraction"] is None and m["val_source"]["num_documents"] == 7


def test_max_tokens_keeps_whole_documents(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    texts = [_random_doc(rng) for _ in range(200)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    enc = get_tokenizer("gpt2")
    lengths = np.array([len(enc.encode_ordinary(t)) + 1 for t in texts])
    max_tokens = rng.randint(1, int(lengths.sum()) - 1)
    m = prepare(tmp_path / "a.jsonl", tmp_path / "out", max_tokens=max_tokens, progress=False)
    # Naive: documents up to and including the first whose running total reaches max_tokens.
    n_docs = int(np.flatnonzero(np.cumsum(lengths) >= max_tokens)[0]) + 1
    assert m["source"]["num_documents"] == n_docs, (seed, max_tokens)
    assert m["source"]["num_tokens"] == int(lengths[:n_docs].sum()), seed


@pytest.mark.parametrize("tokenizer,dtype", [("gpt2", "uint16"), ("o200k_base", "uint32")])
def test_dtype_follows_vocab(tmp_path: Path, seed: int, tokenizer: str, dtype: str):
    rng = random.Random(seed)
    texts = [_random_doc(rng) for _ in range(30)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    m = prepare(tmp_path / "a.jsonl", tmp_path / "out", tokenizer, progress=False)
    assert m["dtype"] == dtype and m["n_vocab"] == tokenizer_info(tokenizer).n_vocab
    for shard in m["splits"]["train"]["shards"]:
        assert np.load(tmp_path / "out" / shard["path"]).dtype == np.dtype(dtype)
    _check_round_trip(tmp_path / "out", m, [(f"a.jsonl:{i + 1}", t) for i, t in enumerate(texts)],
                      seed, tokenizer)


def test_verify_names_a_corrupted_file(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"text": _random_doc(rng)}) + "\n" for _ in range(100)))
    m = prepare(tmp_path / "a.jsonl", tmp_path / "out", shard_tokens=1000, val_fraction=0.2,
                progress=False)
    verify(tmp_path / "out")
    shards = [s for split in m["splits"].values() for s in split["shards"]]
    target = tmp_path / "out" / rng.choice([rng.choice(shards)["path"],
                                            rng.choice(shards)["index_path"]])
    data = bytearray(target.read_bytes())
    pos = rng.randrange(len(data))
    data[pos] ^= 1 << rng.randrange(8)
    target.write_bytes(bytes(data))
    with pytest.raises(DataError, match=re.escape(str(target))):
        verify(tmp_path / "out")
    target.unlink()
    with pytest.raises(DataError, match=re.escape(str(target)) + ": .*missing"):
        verify(tmp_path / "out", checksums=False)


def _files(directory: Path) -> dict[str, bytes]:
    return {str(f.relative_to(directory)): f.read_bytes()
            for f in sorted(directory.rglob("*")) if f.is_file()}


def test_failed_prep_keeps_the_existing_dataset(tmp_path: Path, monkeypatch, seed: int):
    rng = random.Random(seed)
    # 1200 documents: three tokenizer batches, so shards are written before line 1201 fails.
    good = "".join(json.dumps({"text": _random_doc(rng)}) + "\n" for _ in range(1200))
    (tmp_path / "a.jsonl").write_text(good)
    out = tmp_path / "out"
    prepare(tmp_path / "a.jsonl", out, shard_tokens=500, progress=False)
    before = _files(out)
    with pytest.raises(DataError, match="already holds a prepared dataset"):
        prepare(tmp_path / "a.jsonl", out, progress=False)
    # --overwrite with a source that breaks after several shards were written, with one that
    # yields nothing, and Ctrl-C in the middle: the dataset already there stays, byte for byte.
    (tmp_path / "a.jsonl").write_text(good + "{not json\n")
    with pytest.raises(DataError, match=r"a\.jsonl:1201: invalid JSON"):
        prepare(tmp_path / "a.jsonl", out, shard_tokens=500, overwrite=True, progress=False)
    assert _files(out) == before, f"seed={seed}"
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare(tmp_path / "empty.jsonl", out, overwrite=True, progress=False)
    assert _files(out) == before, f"seed={seed}"
    from nmoe_train.data import prep

    (tmp_path / "a.jsonl").write_text(good)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(prep, "unigram_entropy", interrupt)  # after every shard is written
        with pytest.raises(KeyboardInterrupt):
            prepare(tmp_path / "a.jsonl", out, overwrite=True, progress=False)
    assert _files(out) == before, f"seed={seed}"
    verify(out)
    # A failed prep into a new directory leaves no directory behind.
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare(tmp_path / "empty.jsonl", tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()
    # A killed prep's leftovers (no manifest, partial shards, the staging directory) are
    # cleaned by a re-run without --overwrite; a foreign directory is refused.
    (out / "manifest.json").unlink()
    (out / "prep.tmp" / "train").mkdir(parents=True)
    (out / "prep.tmp" / "train" / "shard-00000.npy").write_bytes(b"partial")
    prepare(tmp_path / "a.jsonl", out, progress=False)
    verify(out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train", "val"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not an nmoe dataset"):
        prepare(tmp_path / "a.jsonl", tmp_path / "mine", overwrite=True, progress=False)
    assert _files(tmp_path / "mine") == {"thesis.tex": b"precious"}


def test_offline_hub_name_gives_clear_error(tmp_path: Path, monkeypatch, capsys, seed: int):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    name = f"hf:nmoe-test-nobody/made-up-{seed:08x}"
    with pytest.raises(DataError) as info:
        prepare(name, tmp_path / "out", progress=False)
    message = str(info.value)
    assert "hub is unreachable" in message and "local files" in message, message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not (tmp_path / "out").exists()  # nothing created before the source is open
    assert data_main(["prep", name, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load Hugging Face dataset") and "Traceback" not in err
    assert err.count("\n") == 1, err


def test_cli_prep_info_verify(tmp_path: Path, capsys, seed: int):
    rng = random.Random(seed)
    texts = [_random_doc(rng) for _ in range(50)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "ds"
    assert data_main(["prep", str(tmp_path / "a.jsonl"), "--out", str(out), "--shard-tokens",
                      "1k", "--val-fraction", "0.2", "--name", "tiny", "--no-progress"]) == 0
    m = read_manifest(out)
    assert m["name"] == "tiny" and m["prep_args"]["shard_tokens"] == 1000
    assert data_main(["verify", str(out)]) == 0
    assert data_main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny" in printed and "unigram entropy" in printed
    assert data_main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == m
    shard = out / m["splits"]["train"]["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes()[:-2])
    assert data_main(["verify", str(out)]) == 1
    assert str(shard) in capsys.readouterr().err
    assert data_main(["--help"]) == 0 and "prep" in capsys.readouterr().out
    assert data_main(["prep"]) == 2
    assert data_main(["prep", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_unigram_entropy_and_counts(seed: int):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 50, size=rng.integers(2, 500))
    counts[0] = max(counts[0], 1)
    p = counts[counts > 0] / counts.sum()
    assert unigram_entropy(counts) == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)
    assert unigram_entropy(np.array([0, 7, 0])) == 0.0
    assert [parse_count(x) for x in ("50M", "1e9", "2.5B", "1_000", "7k", 12)] == \
        [50_000_000, 10**9, 2_500_000_000, 1000, 7000, 12]
    with pytest.raises(ValueError):
        parse_count("1.5")
