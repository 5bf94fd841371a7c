"""bench/bench_dispatch.py's target lines (CPU; no GPU, no process group): each verdict reads
the row of the right backend, shape and op and compares it with the issue's bound."""

from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_dispatch.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_dispatch", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(backend, shape, op, time_us, gb_per_s=0.0):
    return {"backend": backend, "shape": list(shape), "op": op, "time_us": time_us,
            "gb_per_s": gb_per_s}


def test_verdicts_compare_each_row_with_its_bound():
    bench = _bench()
    rng = random.Random()
    largest, decode = bench.LARGE[0], bench.DECODE
    nccl = rng.uniform(5000.0, 8000.0)
    fast = rng.uniform(320.5, 400.0)  # GB/s above the bound, and one below it
    slow = rng.uniform(200.0, 319.5)
    rows = [_row("nccl", largest, "dispatch+combine", nccl),
            _row("ipc", largest, "dispatch+combine", nccl / 1.2, slow),
            _row("ipc:graph", largest, "dispatch+combine", nccl / 3.0, fast),
            _row("ipc+dedup:graph", largest, "dispatch+combine", nccl / 4.0, 999.0),
            _row("ipc/zc:graph", largest, "dispatch+combine", nccl / 3.0, 319.97),
            _row("ipc:graph", decode, "dispatch", 59.0), _row("ipc:graph", decode, "combine", 81.0)]
    lines = bench._verdicts(rows)
    assert f"ipc >= 1.3x nccl end to end at {largest}: 1.20x MISS" in lines
    shown = math.floor(slow * 10) / 10
    assert f"ipc >= 320 GB/s per rank at {largest} (crossing bytes): {shown:.1f} MISS" in lines
    shown = math.floor(fast * 10) / 10
    assert (f"ipc:graph >= 320 GB/s per rank at {largest} (crossing bytes): {shown:.1f} PASS"
            in lines)
    # just below the bound: shown below it too, never rounded up to "320.0 MISS"
    assert (f"ipc/zc:graph >= 320 GB/s per rank at {largest} (crossing bytes): 319.9 MISS"
            in lines)
    # a deduplicated row counts one row per slot (an effective rate): not judged on this bound
    assert not any(line.startswith("ipc+dedup:graph >= 320") for line in lines)
    assert "ipc:graph decode dispatch < 60 us: 59.0 us PASS" in lines
    assert "ipc:graph decode combine < 80 us: 81.0 us MISS" in lines
