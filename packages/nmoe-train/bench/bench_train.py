"""Training throughput of the MoE paths on one GPU: tokens/s, MFU and peak memory per step.

    python packages/nmoe-train/bench/bench_train.py --preset super --json out.json \
        --variants torch:bf16 fused:bf16 fused:fp8 --micro-batches 4 8 16 --steps 6

Each variant (``backend:recipe``) trains the preset on synthetic tokens (throughput only) at
sequence length 2048 with each micro-batch size until one runs out of memory; the table reports
the median tokens/s of the steps after the first (compile/warm-up) step, MFU (training FLOPs as
`nmoe_train.trainer.flops_per_token` counts them, over the card's dense bf16 peak) and the peak
memory, plus each variant's ratio to ``torch:bf16`` at the same micro-batch, measured in the same
process on the same card.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch


def run_variant(preset: str, backend: str, recipe: str, micro: int, steps: int,
                seq_len: int) -> dict:
    from nmoe_train.config import resolve_config
    from nmoe_train.trainer import Trainer, flops_per_token, peak_tflops

    cfg = resolve_config(preset, [
        f"model.moe.backend={backend}", f"model.moe.recipe={recipe}", f"seq_len={seq_len}",
        f"micro_batch={micro}", f"global_batch={micro}", f"steps={steps}", "val_every=0",
        "checkpoints=false", "data.synthetic=true", "resume=false", "log_every=1000",
        f"run_name=bench-{backend}-{recipe}-{micro}", "runs_root=/tmp/nmoe-bench",
    ])
    torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg, quiet=True)
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train_step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tokens = micro * seq_len
    median = statistics.median(times[1:]) if len(times) > 1 else times[0]
    tok_s = tokens / median
    peak = peak_tflops(trainer.device)
    row = {
        "preset": preset, "backend": backend, "recipe": recipe, "micro_batch": micro,
        "seq_len": seq_len, "tokens_per_s": tok_s, "ms_per_step": median * 1000,
        "mfu": flops_per_token(trainer.model, seq_len) * tok_s / (peak * 1e12) if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
    }
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="super")
    parser.add_argument("--variants", nargs="+", default=["torch:bf16", "fused:bf16"])
    parser.add_argument("--micro-batches", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    for variant in args.variants:
        backend, recipe = variant.split(":")
        for micro in args.micro_batches:
            try:
                rows.append(run_variant(args.preset, backend, recipe, micro, args.steps,
                                        args.seq_len))
            except torch.OutOfMemoryError:
                print(f"{variant} micro-batch {micro}: out of memory", file=sys.stderr)
                gc.collect()
                torch.cuda.empty_cache()
                break
            except Exception as err:  # report and go on with the other variants
                print(f"{variant} micro-batch {micro}: {type(err).__name__}: {err}",
                      file=sys.stderr)
                break
    base = {r["micro_batch"]: r for r in rows if r["backend"] == "torch"}
    print(f"{'variant':<12} {'micro':>5} {'tok/s':>10} {'ms/step':>9} {'MFU':>6} {'peak GiB':>9} "
          f"{'x torch':>8} {'mem x':>6}")
    for r in rows:
        b = base.get(r["micro_batch"])
        r["ratio_vs_torch"] = r["tokens_per_s"] / b["tokens_per_s"] if b else None
        r["memory_vs_torch"] = r["peak_gib"] / b["peak_gib"] if b else None
        print(f"{r['backend'] + ':' + r['recipe']:<12} {r['micro_batch']:>5} "
              f"{r['tokens_per_s']:>10.0f} {r['ms_per_step']:>9.1f} "
              f"{(r['mfu'] or 0) * 100:>5.1f}% {r['peak_gib']:>9.1f} "
              f"{(r['ratio_vs_torch'] or float('nan')):>8.2f} "
              f"{(r['memory_vs_torch'] or float('nan')):>6.2f}")
    if rows:
        print(f"device: {rows[0]['device']}, torch {rows[0]['torch']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
