"""What the nmoe-kernels bench scripts share: CUDA-event median timing, and what every script
ends with, the device line under its table and the JSON rows (imported by the sibling scripts,
which run from this directory)."""

from __future__ import annotations

import json
import statistics

import torch


def finish_report(rows: list[dict], json_path: str | None) -> None:
    """Print the GPU, torch and CUDA versions under the table; write ``rows`` to ``json_path``."""
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)


def median_ms(fn, iters: int, warmup: int) -> float:
    """Median GPU time of ``fn`` over ``iters`` calls after ``warmup``, each call timed alone
    (CUDA events around it, synchronised after it), so launch overhead counts."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
