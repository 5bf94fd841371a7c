"""The deterministic, resumable token loader over prepared datasets, with weighted mixtures.

Letters: B sequences per rank per step (``global_batch // world_size``), S sequence length
(``seq_len``), G sequences per step over all ranks (``global_batch``), W windows of a source.

Semantics ("global stream, local slice"):

- A source is the concatenated token stream of one dataset split (all shards in manifest order:
  ``doc EOS doc EOS ...``). Window ``k`` of a source is tokens ``[k*(S+1), (k+1)*(S+1))``;
  windows are non-overlapping, may cross document and shard boundaries, and the tail shorter than
  ``S+1`` is not used. A sequence is one window ``w``: ``inputs = w[:-1]``, ``targets = w[1:]``.
- Each source walks its windows epoch after epoch: in epoch ``e`` the order is a pseudo-random
  permutation of ``0..W-1`` keyed by ``(seed, source index, e)`` (``shuffle=True``) or ``0, 1, ...``
  (``shuffle=False``, for validation). The permutation is a Feistel network over the window index
  with cycle walking: O(1) memory and O(1) work per window, for any dataset size.
- The stream of global sequences ``g = 0, 1, 2, ...``: the source of each sequence is picked by
  smooth weighted round-robin (SWRR) over integer weights (``round(weight / sum * 1e6)``; ties
  go to the lower source index), and that source's next window is taken. Over any span the count of
  each source differs from its weighted share by less than the number of sources.
- Step ``t`` consumes global sequences ``[t*G, (t+1)*G)``; rank ``r`` returns the contiguous block
  ``[t*G + r*B, t*G + (r+1)*B)``. So one process with ``global_batch=8`` sees exactly the sequences
  of two ranks with four each, concatenated in rank order. Every rank advances the shared cursors
  for all G sequences but reads only its own B windows.
- `TokenLoader.state_dict` holds the stream position (global sequence, each source's window
  cursor, the SWRR accumulators); a loader given it continues bitwise-identically. It does not
  depend on rank or world size, so a run may resume on a different number of ranks with the same
  ``global_batch``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nmoe_train.data.shards import DataError, open_split, read_manifest, split_fingerprint

__all__ = ["FP_SCALE", "TokenLoader", "WindowPermutation", "swrr_schedule"]

FP_SCALE = 1_000_000
"""Mixture weights are rounded to integers out of this total."""

STATE_VERSION = 1

_FEISTEL_ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class WindowPermutation:
    """A keyed pseudo-random permutation of ``0..n-1`` (balanced Feistel + cycle walking).

    Args:
        n: domain size (>= 1).
        key: any integers; equal keys give equal permutations.
    """

    def __init__(self, n: int, key: tuple[int, ...]) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._half = np.uint64((bits + 1) // 2)
        self._mask = np.uint64((1 << int(self._half)) - 1)
        self._keys = np.random.SeedSequence(list(key)).generate_state(_FEISTEL_ROUNDS, np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ (_mix64(right ^ k) & self._mask)
        return (left << self._half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Map positions (int array, each in ``[0, n)``) to their permuted values (int64)."""
        y = self._encrypt(np.asarray(positions, dtype=np.uint64))
        outside = y >= self.n
        while outside.any():  # cycle walking: re-encrypt until back inside [0, n)
            y[outside] = self._encrypt(y[outside])
            outside = y >= self.n
        return y.astype(np.int64)


def swrr_schedule(weights_fp: list[int], current: list[int], count: int) -> list[int]:
    """Advance smooth weighted round-robin by ``count`` picks; return the picked indices.

    Each pick adds every weight to its accumulator, takes the largest accumulator (lowest index on
    ties) and subtracts the total weight from it. ``current`` is updated in place.

    Args:
        weights_fp: positive integer weights, one per source.
        current: the accumulators (same length), mutated.
        count: number of picks (>= 0).
    """
    total = sum(weights_fp)
    n = len(weights_fp)
    picks = []
    for _ in range(count):
        best = 0
        for i in range(n):
            current[i] += weights_fp[i]
            if current[i] > current[best]:
                best = i
        current[best] -= total
        picks.append(best)
    return picks


@dataclass
class _Source:
    """One dataset split as a stream of windows."""

    path: Path
    name: str
    weight: float
    weight_fp: int
    fingerprint: str
    shards: list[np.ndarray]
    starts: np.ndarray  # token offset of each shard in the stream, plus the total at the end
    num_windows: int
    cursor: int = 0  # windows taken so far, over all epochs


class TokenLoader:
    """Batches of ``(inputs_BS, targets_BS)`` from one dataset or a weighted mixture.

    Args:
        datasets: a prepared dataset directory, or ``[(directory, weight), ...]`` for a mixture
            (weights > 0, relative; all datasets must share one tokenizer).
        split: ``"train"`` or ``"val"``.
        seq_len: S, tokens per input sequence (>= 1); each window has S + 1 tokens.
        global_batch: G, sequences per step over all ranks; divisible by ``world_size``.
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of data-parallel ranks.
        seed: shuffling seed.
        shuffle: random window order per epoch (train) or sequential (validation).

    Raises:
        DataError: a missing/invalid dataset, an empty or too-short split, mixed tokenizers.
        ValueError: out-of-range arguments.
    """

    def __init__(self, datasets: Path | str | list[tuple[Path | str, float]], split: str,
                 seq_len: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"global_batch ({global_batch}) must be a positive multiple of "
                             f"world_size ({world_size}); each rank takes global_batch // "
                             f"world_size sequences per step")
        if isinstance(datasets, (str, Path)):
            datasets = [(datasets, 1.0)]
        if not datasets:
            raise ValueError("datasets is empty; pass a dataset directory or [(dir, weight), ...]")
        self.split, self.seq_len, self.global_batch = split, seq_len, global_batch
        self.rank, self.world_size, self.local_batch = rank, world_size, global_batch // world_size
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.sources = self._open_sources(datasets)
        self._swrr = [0] * len(self.sources)
        self.global_sequence = 0
        self._orders: dict[tuple[int, int], WindowPermutation] = {}

    def _open_sources(self, datasets: list[tuple[Path | str, float]]) -> list[_Source]:
        if any(not isinstance(d, (tuple, list)) or len(d) != 2 for d in datasets):
            raise ValueError(f"datasets must be a directory or a list of (directory, weight) "
                             f"pairs, got {datasets!r}")
        weights = [float(w) for _, w in datasets]
        if any(not math.isfinite(w) or w <= 0 for w in weights):
            raise ValueError(f"mixture weights must be finite and > 0, got {weights}")
        sources: list[_Source] = []
        tokenizer = None
        for (path, weight) in datasets:
            path = Path(path)
            manifest = read_manifest(path)
            if tokenizer is None:
                tokenizer = (manifest["tokenizer"], manifest["tokenizer_hash"], path)
                self.tokenizer, self.eos_id = manifest["tokenizer"], manifest["eos_id"]
                self.n_vocab = manifest["n_vocab"]
            elif manifest["tokenizer_hash"] != tokenizer[1]:
                raise DataError(f"datasets use different tokenizers: {tokenizer[2]} has "
                                f"{tokenizer[0]} ({tokenizer[1]}), {path} has "
                                f"{manifest['tokenizer']} ({manifest['tokenizer_hash']}); "
                                f"prepare all mixture sources with one tokenizer")
            shards = open_split(path, self.split, manifest)
            starts = np.cumsum([0] + [len(s) for s in shards]).astype(np.int64)
            num_windows = int(starts[-1]) // (self.seq_len + 1)
            if num_windows == 0:
                raise DataError(f"{path}: split {self.split!r} has {int(starts[-1])} tokens, "
                                f"fewer than one window of seq_len + 1 = {self.seq_len + 1}; "
                                f"prepare more data (or a larger --val-fraction) or use a "
                                f"shorter seq_len")
            weight_fp = round(weight / sum(weights) * FP_SCALE)
            if weight_fp == 0:
                raise ValueError(f"mixture weight {weight} of {path} is below 1e-6 of the total; "
                                 f"drop the source or raise its weight")
            sources.append(_Source(path=path, name=manifest["name"], weight=weight,
                                   weight_fp=weight_fp,
                                   fingerprint=split_fingerprint(manifest, self.split),
                                   shards=shards, starts=starts, num_windows=num_windows))
        return sources

    # -- sizes ----------------------------------------------------------------------------------

    @property
    def num_windows(self) -> int:
        """Windows (sequences) in one epoch, summed over sources."""
        return sum(s.num_windows for s in self.sources)

    @property
    def tokens_per_epoch(self) -> int:
        """Input tokens in one epoch of every source (``num_windows * seq_len``)."""
        return self.num_windows * self.seq_len

    @property
    def tokens_per_step(self) -> int:
        """Input tokens per step over all ranks (``global_batch * seq_len``)."""
        return self.global_batch * self.seq_len

    @property
    def epoch(self) -> float:
        """Epochs completed so far (fractional), of the first source."""
        s = self.sources[0]
        return s.cursor / s.num_windows

    def describe(self) -> str:
        """One line for the start-up report."""
        parts = []
        for s in self.sources:
            share = f" {s.weight_fp / sum(x.weight_fp for x in self.sources):.1%}" \
                if len(self.sources) > 1 else ""
            parts.append(f"{s.name}{share} ({int(s.starts[-1]):,} tok, {s.num_windows:,} win)")
        order = f"shuffled seed {self.seed}" if self.shuffle else "sequential"
        return (f"data {self.split}: {' + '.join(parts)}; seq_len {self.seq_len}, "
                f"global_batch {self.global_batch} = {self.world_size} x {self.local_batch}, "
                f"{order}, {self.tokenizer}")

    # -- batches --------------------------------------------------------------------------------

    def _window_ids(self, source_index: int, cursors: np.ndarray) -> np.ndarray:
        src = self.sources[source_index]
        epochs, positions = np.divmod(cursors, src.num_windows)
        if not self.shuffle:
            return positions
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            key = (source_index, int(epoch))
            if key not in self._orders:
                if len(self._orders) > 64:
                    self._orders.clear()
                self._orders[key] = WindowPermutation(
                    src.num_windows, (self.seed, source_index, int(epoch)))
            mask = epochs == epoch
            out[mask] = self._orders[key](positions[mask])
        return out

    def _read(self, src: _Source, window: int, out_row: np.ndarray) -> None:
        """Copy window ``window`` of ``src`` (S+1 tokens, maybe across shards) into ``out_row``."""
        start, filled = window * (self.seq_len + 1), 0
        i = int(np.searchsorted(src.starts, start, side="right")) - 1
        while filled < len(out_row):
            offset = start + filled - int(src.starts[i])
            piece = src.shards[i][offset:offset + len(out_row) - filled]
            out_row[filled:filled + len(piece)] = piece
            filled += len(piece)
            i += 1

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next step's batch for this rank.

        Returns:
            ``(inputs_BS, targets_BS)``: int64 CPU tensors of shape ``(B, S)`` with
            ``B = global_batch // world_size``; ``targets_BS[b, s] == inputs_BS[b, s + 1]`` for
            ``s < S - 1`` (both are slices of one S+1 window).
        """
        G, B = self.global_batch, self.local_batch
        if len(self.sources) == 1:
            picks = np.zeros(G, dtype=np.int64)
        else:
            picks = np.array(swrr_schedule([s.weight_fp for s in self.sources], self._swrr, G))
        lo, hi = self.rank * B, (self.rank + 1) * B
        windows_BS = np.empty((B, self.seq_len + 1), dtype=np.int64)
        for i, src in enumerate(self.sources):
            mine = np.flatnonzero(picks == i)
            # Cursor of each pick of this source within the step: the source's running count.
            cursors = src.cursor + np.arange(len(mine), dtype=np.int64)
            local = (mine >= lo) & (mine < hi)
            for row, window in zip(mine[local] - lo, self._window_ids(i, cursors[local])):
                self._read(src, int(window), windows_BS[row])
            src.cursor += len(mine)
        self.global_sequence += G
        x = torch.from_numpy(windows_BS)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    # -- state ----------------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {"split": self.split, "seq_len": self.seq_len, "global_batch": self.global_batch,
                "shuffle": self.shuffle, "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        """The stream position as a small JSON-able dict (identical on every rank)."""
        return {
            "version": STATE_VERSION,
            "global_sequence": self.global_sequence,
            "config": self._config(),
            "sources": [{"path": str(s.path), "name": s.name, "fingerprint": s.fingerprint,
                         "weight_fp": s.weight_fp, "num_windows": s.num_windows,
                         "cursor": s.cursor, "epoch": s.cursor // s.num_windows}
                        for s in self.sources],
            "swrr_current": list(self._swrr),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from `state_dict` of a loader with the same configuration).

        Rank and world size may differ from the saving loader's.

        Raises:
            DataError: ``state`` was made with a different configuration, dataset or mixture;
                the message names the first mismatching field.
        """
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r} is not supported "
                            f"(expected {STATE_VERSION})")
        for key, mine in self._config().items():
            theirs = state.get("config", {}).get(key)
            if theirs != mine:
                raise DataError(f"loader state was saved with {key}={theirs!r}, this loader has "
                                f"{key}={mine!r}; resume with the same data configuration")
        saved = state.get("sources", [])
        if len(saved) != len(self.sources):
            raise DataError(f"loader state has {len(saved)} source(s), this loader has "
                            f"{len(self.sources)}; resume with the same mixture")
        for i, (s, src) in enumerate(zip(saved, self.sources)):
            for key in ("fingerprint", "weight_fp", "num_windows"):
                if s.get(key) != getattr(src, key):
                    raise DataError(
                        f"loader state source {i} ({s.get('path')}) has {key}={s.get(key)!r}, "
                        f"this loader's {src.path} has {key}={getattr(src, key)!r}; the dataset "
                        f"or mixture changed since the state was saved")
        for s, src in zip(saved, self.sources):
            src.cursor = int(s["cursor"])
        self._swrr = [int(c) for c in state["swrr_current"]]
        self.global_sequence = int(state["global_sequence"])

    def reset(self) -> None:
        """Go back to the start of the stream (e.g. to re-run the same validation batches)."""
        for s in self.sources:
            s.cursor = 0
        self._swrr = [0] * len(self.sources)
        self.global_sequence = 0
