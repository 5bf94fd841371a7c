"""Where a training step synchronises with the host: one step of `n train`'s step function under
``torch.cuda.set_sync_debug_mode("warn")``, each synchronising call's Python stack recorded and
counted (the innermost frames inside this repository).

    python ci/sync_audit.py --variant fused:bf16:compile=true --micro-batch 4 [--json out.json]

Warm-up steps run first (compilation and first-use allocations sync), then one audited step.
A GPU is required; the report lists each distinct call site with its count per step.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import traceback
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "packages" / "nmoe-train" / "bench"))


def _site(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frames in this repository (at most three), innermost last."""
    ours = [f for f in stack if str(REPO) in f.filename and "sync_audit" not in f.filename]
    frames = ours[-3:] if ours else stack[-3:]
    return " <- ".join(
        f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames)
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="fused:bf16:compile=true,cache_expert_weights=true")
    parser.add_argument("--preset", default="super")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("a CUDA GPU is required")
    from bench_train import parse_variant, variant_config

    from nmoe_train.trainer import Trainer

    backend, recipe, extra = parse_variant(args.variant)
    cfg = variant_config(args.preset, backend, recipe, args.micro_batch, args.warmup + 1, 2048,
                         1, extra=extra)
    trainer = Trainer(cfg, quiet=True)
    for _ in range(args.warmup):
        trainer.train_step()
    torch.cuda.synchronize()
    sites: collections.Counter[str] = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        stack = traceback.extract_stack()[:-1]
        # set_sync_debug_mode("warn") announces itself with a warning: not a sync of the step.
        if "synchroniz" in str(message) and not any(
            f.name == "set_sync_debug_mode" for f in stack
        ):
            sites[_site(stack)] += 1

    previous = warnings.showwarning
    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.train_step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = previous
    total = sum(sites.values())
    print(f"{args.variant} micro-batch {args.micro_batch}: {total} synchronising calls in one "
          f"step, {len(sites)} call sites")
    for site, count in sites.most_common():
        print(f"{count:5d}  {site}")
    if args.json:
        Path(args.json).write_text(json.dumps({"variant": args.variant, "total": total,
                                               "sites": dict(sites.most_common())}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
