"""Validation-loss curves of several training variants of one small config, side by side.

    python packages/nmoe-train/bench/track_loss.py --steps 200 --val-every 25 \
        --variants torch fused torch:micro_batch=16 fused:model.moe.recipe=fp8

Each variant is ``backend[:key=value,...]`` (extra overrides); every run starts from the same
seed and data. The table gives each variant's validation loss and its relative difference to
the first variant at every validation point; a variant that only changes the rounding of the
first (``torch:micro_batch=16`` sums the micro-batch gradients in another order) calibrates how
far two runs that are equal in exact arithmetic drift apart -- the yardstick for the fused-vs-
torch tracking test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

SMALL_GPU = ["model.dim=256", "model.attention.n_heads=4", "model.moe.n_routed_experts=32",
             "model.moe.n_activated_experts=4", "model.moe.moe_inter_dim=256", "seq_len=256",
             "global_batch=32", "checkpoints=false", "resume=false", "log_every=1000",
             "target_loss=null"]


def run(variant: str, steps: int, val_every: int, root: Path, data_root: Path) -> list:
    from nmoe_train.config import resolve_config
    from nmoe_train.trainer import Trainer

    backend, _, extra = variant.partition(":")
    overrides = [o for o in extra.split(",") if o]
    name = variant.replace(":", "_").replace(",", "_").replace("=", "-").replace(".", "-")
    cfg = resolve_config("tiny", [*SMALL_GPU, f"model.moe.backend={backend}", f"steps={steps}",
                                  f"val_every={val_every}", f"runs_root={root}",
                                  f"run_name={name}", f"data.data_root={data_root}", *overrides])
    trainer = Trainer(cfg, quiet=True)
    trainer.run()
    return trainer.val_history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["torch", "fused", "torch:micro_batch=16"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from nmoe_train.data import ensure_builtin_dataset

    root = Path(tempfile.mkdtemp(prefix="nmoe-track-"))
    data_root = root / "data"
    ensure_builtin_dataset("shakespeare", data_root, "gpt2", progress=False)
    curves = {}
    for variant in args.variants:
        curves[variant] = run(variant, args.steps, args.val_every, root, data_root)
        points = " ".join(f"{step}:{loss:.4f}" for step, loss in curves[variant])
        print(f"{variant}: {points}", flush=True)
    base = curves[args.variants[0]]
    print(f"{'step':>5} " + " ".join(f"{v[:22]:>24}" for v in args.variants))
    for i, (step, want) in enumerate(base):
        cells = []
        for variant in args.variants:
            got = curves[variant][i][1]
            cells.append(f"{got:>9.4f} ({(got / want - 1) * 100:+6.2f}%)")
        print(f"{step:>5} " + " ".join(f"{c:>24}" for c in cells))
    if args.json:
        Path(args.json).write_text(json.dumps(curves, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
