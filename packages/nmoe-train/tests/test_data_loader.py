"""TokenLoader against a naive reference on fresh random token datasets: exact windows (across
documents, shards and epochs), targets = inputs shifted, seeds, 1 rank == 2 ranks concatenated,
bitwise resume from a JSON round-tripped state, SWRR mixture proportions, epoch reshuffling, and
the errors for bad arguments and mismatched states.

Datasets are written with `ShardWriter` from random token ids (no tokenizer needed); sources of a
mixture use disjoint id ranges, so each sequence's source is visible in its tokens.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nmoe_core.tokenizer import tokenizer_info
from nmoe_train.data import DataError, TokenLoader
from nmoe_train.data.loader import FP_SCALE, WindowPermutation
from nmoe_train.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    ShardWriter,
    token_dtype,
    write_json_atomic,
)

EOS = tokenizer_info("gpt2").eos_id


@pytest.fixture
def seed() -> int:
    return time.time_ns() % 2**32


def _make_dataset(path: Path, rng: np.random.Generator, num_tokens: int, lo: int, hi: int,
                  shard_tokens: int) -> dict[str, np.ndarray]:
    """Random documents of ids in [lo, hi) + EOS, train and val; return each split's stream."""
    info = tokenizer_info("gpt2")
    streams, splits = {}, {}
    for split in ("train", "val"):
        writer = ShardWriter(path, split, token_dtype(info.n_vocab), shard_tokens)
        docs, total = [], 0
        while total < num_tokens:
            doc = np.append(rng.integers(lo, hi, size=int(rng.integers(1, 60))), EOS)
            docs.append(doc)
            total += len(doc)
            writer.add(doc)
        splits[split] = ShardWriter.split_entry(writer.close())
        streams[split] = np.concatenate(docs)
    write_json_atomic(path / MANIFEST_NAME, {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "name": path.name,
        "tokenizer": "gpt2", "tokenizer_hash": info.hash, "n_vocab": info.n_vocab,
        "eos_id": EOS, "dtype": token_dtype(info.n_vocab).name, "splits": splits})
    return streams


def _reference(streams: list[np.ndarray], weights: list[float], seq_len: int, seed: int,
               shuffle: bool, num_sequences: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``num_sequences`` global sequences (windows) and their sources, naively."""
    w = [round(x / sum(weights) * FP_SCALE) for x in weights]
    acc, cursors = [0] * len(w), [0] * len(w)
    num_windows = [len(s) // (seq_len + 1) for s in streams]
    out, picked = [], []
    for _ in range(num_sequences):
        acc = [a + x for a, x in zip(acc, w)]
        i = max(range(len(w)), key=lambda j: (acc[j], -j))  # largest, lowest index on ties
        acc[i] -= sum(w)
        epoch, pos = divmod(cursors[i], num_windows[i])
        cursors[i] += 1
        k = int(WindowPermutation(num_windows[i], (seed, i, epoch))(np.array([pos]))[0]) \
            if shuffle else pos
        out.append(streams[i][k * (seq_len + 1):(k + 1) * (seq_len + 1)])
        picked.append(i)
    return np.stack(out).astype(np.int64), np.array(picked)


def _take(loader: TokenLoader, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [loader.next_batch() for _ in range(steps)]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@pytest.mark.parametrize("shuffle", [True, False])
def test_windows_match_reference_across_shards_and_epochs(tmp_path: Path, seed: int,
                                                          shuffle: bool):
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(1, 40))
    num_tokens = int(rng.integers(300, 2000))
    streams = _make_dataset(tmp_path / "a", rng, num_tokens, 0, EOS,
                            shard_tokens=int(rng.integers(10, 400)))
    split = "val" if not shuffle else "train"
    g = int(rng.integers(1, 9))
    loader = TokenLoader(tmp_path / "a", split, seq_len, g, seed=seed, shuffle=shuffle)
    num_windows = len(streams[split]) // (seq_len + 1)
    assert loader.num_windows == num_windows and loader.tokens_per_epoch == num_windows * seq_len
    steps = 3 * num_windows // g + 2  # over three epochs
    inputs, targets = _take(loader, steps)
    ref, _ = _reference([streams[split]], [1.0], seq_len, seed, shuffle, steps * g)
    assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == (steps * g, seq_len)
    assert torch.equal(inputs, torch.from_numpy(ref[:, :-1])), (seed, seq_len, g)
    assert torch.equal(targets, torch.from_numpy(ref[:, 1:])), (seed, seq_len, g)
    assert torch.equal(inputs[:, 1:], targets[:, :-1]), seed
    assert loader.epoch == pytest.approx(steps * g / num_windows)


def test_seed_determinism(tmp_path: Path, seed: int):
    rng = np.random.default_rng(seed)
    _make_dataset(tmp_path / "a", rng, 5000, 0, EOS, shard_tokens=1000)
    a = _take(TokenLoader(tmp_path / "a", "train", 16, 4, seed=seed), 10)
    b = _take(TokenLoader(tmp_path / "a", "train", 16, 4, seed=seed), 10)
    c = _take(TokenLoader(tmp_path / "a", "train", 16, 4, seed=seed + 1), 10)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), seed
    assert not torch.equal(a[0], c[0]), seed


def _mixture(tmp_path: Path, rng: np.random.Generator, k: int) -> tuple[list, list]:
    """``k`` datasets with disjoint id ranges and random weights."""
    paths, streams = [], []
    bounds = np.linspace(0, EOS, k + 1).astype(int)
    for i in range(k):
        s = _make_dataset(tmp_path / f"s{i}", rng, int(rng.integers(200, 3000)), bounds[i],
                          bounds[i + 1], shard_tokens=int(rng.integers(50, 1000)))
        paths.append(tmp_path / f"s{i}")
        streams.append(s["train"])
    weights = [float(x) for x in rng.uniform(0.05, 1.0, size=k)]
    return list(zip(paths, weights)), streams


def test_one_rank_equals_two_ranks(tmp_path: Path, seed: int):
    rng = np.random.default_rng(seed)
    datasets, streams = _mixture(tmp_path, rng, int(rng.integers(2, 4)))
    seq_len, g = int(rng.integers(2, 24)), 2 * int(rng.integers(1, 6))
    one = TokenLoader(datasets, "train", seq_len, g, seed=seed)
    ranks = [TokenLoader(datasets, "train", seq_len, g, rank=r, world_size=2, seed=seed)
             for r in range(2)]
    assert ranks[1].local_batch == g // 2
    for step in range(40):
        x, y = one.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])), (seed, step)
        assert torch.equal(y, torch.cat([p[1] for p in parts])), (seed, step)
    ref, _ = _reference(streams, [w for _, w in datasets], seq_len, seed, True, 40 * g)
    assert torch.equal(x, torch.from_numpy(ref[-g:, :-1])), seed


def test_resume_is_bitwise(tmp_path: Path, seed: int):
    rng = np.random.default_rng(seed)
    datasets, _ = _mixture(tmp_path, rng, int(rng.integers(2, 4)))
    seq_len, g = int(rng.integers(2, 24)), 4
    full = TokenLoader(datasets, "train", seq_len, g, seed=seed)
    expected = [full.next_batch() for _ in range(60)]
    cut = int(rng.integers(0, 60))
    first = TokenLoader(datasets, "train", seq_len, g, seed=seed)
    for _ in range(cut):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    assert state["global_sequence"] == cut * g
    # Resume on two ranks: the state is rank-independent.
    resumed = [TokenLoader(datasets, "train", seq_len, g, rank=r, world_size=2, seed=seed)
               for r in range(2)]
    for r in resumed:
        r.load_state_dict(state)
    for step in range(cut, 60):
        parts = [r.next_batch() for r in resumed]
        assert torch.equal(expected[step][0], torch.cat([p[0] for p in parts])), (seed, cut, step)
        assert torch.equal(expected[step][1], torch.cat([p[1] for p in parts])), (seed, cut, step)
    full.reset()
    assert torch.equal(full.next_batch()[0], expected[0][0])


def test_mixture_follows_swrr(tmp_path: Path, seed: int):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 5))
    datasets, streams = _mixture(tmp_path, rng, k)
    seq_len, g = 3, int(rng.integers(1, 16))
    steps = 2000 // g
    inputs, _ = _take(TokenLoader(datasets, "train", seq_len, g, seed=seed), steps)
    bounds = np.linspace(0, EOS, k + 1).astype(int)
    # A sequence's source: the id range of its first non-EOS token (windows of 4 random-length
    # docs of >= 1 token each always hold one).
    first = [int(row[row != EOS][0]) for row in inputs.numpy()]
    source = np.searchsorted(bounds, first, side="right") - 1
    _, picked = _reference(streams, [w for _, w in datasets], seq_len, seed, True, steps * g)
    assert np.array_equal(source, picked), seed
    # SWRR bound: after every prefix, each count is within (-(k-1), 1) of its weighted share.
    weights = [w for _, w in datasets]
    w = np.array([round(x / sum(weights) * FP_SCALE) for x in weights])
    counts = np.cumsum(np.eye(k, dtype=np.int64)[source], axis=0)
    share = np.arange(1, len(source) + 1)[:, None] * w[None, :] / w.sum()
    assert np.all(counts - share < 1) and np.all(share - counts < k - 1), seed


def test_mixture_exact_period(tmp_path: Path, seed: int):
    rng = np.random.default_rng(seed)
    datasets, _ = _mixture(tmp_path, rng, 2)
    datasets = [(datasets[0][0], 1.0), (datasets[1][0], 3.0)]  # SWRR period 4: B A B B
    inputs, _ = _take(TokenLoader(datasets, "train", 3, 4, seed=seed), 100)
    first = np.array([int(row[row != EOS][0]) for row in inputs.numpy()])
    is_a = (first < EOS // 2).reshape(-1, 4)
    assert np.all(is_a.sum(axis=1) == 1), seed  # every 4 sequences: one from A, three from B
    assert np.all(is_a[:, 1]), seed  # SWRR order for [1, 3]: B A B B


def test_epochs_wrap_and_reshuffle(tmp_path: Path, seed: int):
    rng = np.random.default_rng(seed)
    streams = _make_dataset(tmp_path / "a", rng, int(rng.integers(600, 1200)), 0, EOS, 100)
    seq_len = 7
    num_windows = len(streams["train"]) // (seq_len + 1)
    windows = streams["train"][:num_windows * (seq_len + 1)].reshape(num_windows, -1)
    loader = TokenLoader(tmp_path / "a", "train", seq_len, 1, seed=seed)
    index = {w.tobytes(): i for i, w in enumerate(windows.astype(np.int64))}
    orders = []
    for _ in range(3):
        inputs, targets = _take(loader, num_windows)
        got = torch.cat([inputs, targets[:, -1:]], dim=1).numpy()
        # Map each sequence back to its window (windows of random tokens are distinct).
        order = [index[row.tobytes()] for row in got]
        assert sorted(order) == list(range(num_windows)), seed  # each window once per epoch
        orders.append(order)
    assert orders[0] != orders[1] != orders[2] and orders[0] != list(range(num_windows)), seed


def test_window_permutation_is_a_seeded_bijection(seed: int):
    rng = np.random.default_rng(seed)
    for n in [1, 2, 3, *rng.integers(4, 5000, size=20).tolist()]:
        p = WindowPermutation(n, (seed, n))
        values = p(np.arange(n))
        assert np.array_equal(np.sort(values), np.arange(n)), (seed, n)
        assert np.array_equal(values, WindowPermutation(n, (seed, n))(np.arange(n))), (seed, n)
        if n >= 20:
            assert not np.array_equal(values, WindowPermutation(n, (seed + 1, n))(np.arange(n)))
            assert not np.array_equal(values, np.arange(n)), (seed, n)


def test_errors_name_the_problem(tmp_path: Path, seed: int):
    rng = np.random.default_rng(seed)
    datasets, _ = _mixture(tmp_path, rng, 2)
    with pytest.raises(ValueError, match="global_batch .* multiple of world_size"):
        TokenLoader(datasets, "train", 8, 6, rank=0, world_size=4)
    with pytest.raises(DataError, match="fewer than one window"):
        TokenLoader(datasets[0][0], "train", 100_000, 1)
    with pytest.raises(DataError, match="no manifest"):
        TokenLoader(tmp_path / "nothing", "train", 8, 1)
    loader = TokenLoader(datasets, "train", 8, 4, seed=seed)
    loader.next_batch()
    state = loader.state_dict()
    cases = [
        (dict(seq_len=9), "seq_len=8"),
        (dict(seed=seed + 1), "seed="),
        (dict(global_batch=8), "global_batch=4"),
        (dict(datasets=[(datasets[0][0], 1.0), (datasets[1][0], 2.0)]), "weight_fp"),
        (dict(datasets=[datasets[1], datasets[0]]), "fingerprint"),
        (dict(datasets=datasets[0][0]), "has 2 source"),
    ]
    for change, message in cases:
        kw = dict(datasets=datasets, split="train", seq_len=8, global_batch=4, seed=seed) | change
        with pytest.raises(DataError, match=message):
            TokenLoader(**kw).load_state_dict(state)
    manifest = json.loads((datasets[1][0] / MANIFEST_NAME).read_text())
    manifest["tokenizer"], manifest["tokenizer_hash"] = "o200k_base", "0" * 16
    (datasets[1][0] / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="different tokenizers"):
        TokenLoader(datasets, "train", 8, 4)
