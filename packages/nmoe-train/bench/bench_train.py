"""Training throughput of the MoE paths on one GPU: tokens/s, MFU and peak memory per step.

    python packages/nmoe-train/bench/bench_train.py --preset super --json out.json \
        --variants torch:bf16 fused:bf16 fused:fp8 --micro-batches 16 32 48 64 --steps 6

Each variant (``backend:recipe``) trains the preset on synthetic tokens (throughput only) at
sequence length 2048 with each micro-batch size until one runs out of memory; the table reports
the median tokens/s of the steps after the first (compile/warm-up) step, MFU (training FLOPs as
`nmoe_train.trainer.flops_per_token` counts them, over the card's dense bf16 peak) and the peak
memory, plus each variant's ratio to ``torch:bf16`` at the same micro-batch, measured in the same
process on the same card (after ``--warmup-steps`` untimed steps of the first variant; rows of one
process still differ by up to ~11% on an H100, results/train_1xH100_position_check.txt, so
compare close variants with ``--rounds N``: every row N times, round-robin in alternating order,
medians reported), and ends with each variant at its largest
micro-batch (the largest that fits when the list went on to an out-of-memory) against
``torch:bf16`` at its own largest.

``--profile DIR``: after the timed steps of each variant, one more full step (forward, backward,
optimizer) runs under torch.profiler (CPU + CUDA activities) inside named ranges (see
`nmoe_train.step_profile`): ``nmoe/step`` around it, ``nmoe/forward`` around the model call,
``nmoe/backward`` around ``loss.backward()``, ``nmoe/optimizer`` around ``optimizer.step``,
and ``nmoe/router`` / ``nmoe/dispatch`` / ``nmoe/combine`` / ``nmoe/experts`` / ``nmoe/loss``
around the routers, the dispatcher calls, the expert MLPs and the loss (forward and backward).
It writes DIR/<variant>-mb<micro>.trace.json (chrome trace), .kernels.txt (the profiler's
kernel table) and .breakdown.json, and prints the GPU time per category and the idle time.

Expert parallel: under torchrun with ``--expert-parallel``, every rank trains its micro-batch with
the experts split over the ranks (``parallel.expert_parallel=all``, ``--dispatcher``, default
``ipc``) and data parallel ZeRO-2 for the rest; tokens/s is per GPU (rank 0's step times, which
include the step's collectives), peak memory the largest over the ranks. ``--compare JSON``
adds each row's ratio to a 1-GPU run's row of the same variant and micro-batch (the issue's
"per-GPU throughput >= 0.85x the 1-GPU figure"):

    torchrun --standalone --nproc_per_node 4 packages/nmoe-train/bench/bench_train.py \
        --expert-parallel --compare one_gpu.json --json ep4.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def _ranged(name: str, fn):
    """``fn`` wrapped in ``torch.profiler.record_function(name)``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def _step_ranges(trainer):
    """Wrap the parts of a training step in the `nmoe_train.step_profile.RANGES` ranges for the
    duration of the block (instance and class attributes patched, then restored)."""
    from nmoe_core import loss as loss_module
    from nmoe_core import moe as moe_module
    from nmoe_train.step_profile import RANGES

    patches = []  # (owner, attribute, original, had_own_attribute)

    def patch(owner, attribute, range_name, static=False):
        original = getattr(owner, attribute, None)
        if original is None:
            return
        own = attribute in vars(owner)
        raw = vars(owner)[attribute] if own else original
        if static and isinstance(raw, staticmethod):
            setattr(owner, attribute, staticmethod(_ranged(range_name, raw.__func__)))
        else:
            setattr(owner, attribute, _ranged(range_name, original))
        patches.append((owner, attribute, raw, own))

    patch(trainer.model, "forward", RANGES.forward)
    patch(trainer.optimizer, "step", RANGES.optimizer)
    patch(torch.Tensor, "backward", RANGES.backward)
    patch(moe_module.Router, "forward", RANGES.router)
    patch(moe_module.GroupedExperts, "forward", RANGES.experts)
    try:
        from nmoe_core import fused as fused_module
    except ImportError:
        fused_module = None
    for name in ("_FusedExperts", "_ExpertMLP", "_ExpertMLPFp8"):
        function = getattr(fused_module, name, None)
        if function is not None:
            patch(function, "forward", RANGES.experts, static=True)
            patch(function, "backward", RANGES.experts, static=True)
    for name in dir(loss_module):
        function = getattr(loss_module, name)
        if isinstance(function, type) and issubclass(function, torch.autograd.Function):
            patch(function, "forward", RANGES.loss, static=True)
            patch(function, "backward", RANGES.loss, static=True)
    seen = set()
    for layer in trainer.model.moe_layers():
        dispatcher = layer.dispatcher
        if dispatcher is None or id(dispatcher) in seen:
            continue
        seen.add(id(dispatcher))
        for method in ("dispatch", "dispatch_backward", "rows_to_sources"):
            patch(dispatcher, method, RANGES.dispatch)
        for method in ("combine", "combine_backward"):
            patch(dispatcher, method, RANGES.combine)
    try:
        yield
    finally:
        for owner, attribute, raw, own in reversed(patches):
            if own:
                setattr(owner, attribute, raw)
            else:
                delattr(owner, attribute)


def profile_step(trainer, out_dir: Path, label: str) -> dict:
    """Profile one more training step of ``trainer``; write the trace, the kernel table and the
    category breakdown under ``out_dir`` and return the breakdown (microseconds)."""
    from torch.profiler import ProfilerActivity, profile

    from nmoe_train.step_profile import (
        RANGES,
        format_breakdown,
        gpu_time_breakdown,
        kernel_events_from_chrome_trace,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    trace_path = out_dir / f"{label}.trace.json"
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with _step_ranges(trainer), torch.profiler.record_function(RANGES.step):
            torch.cuda.synchronize()
            trainer.train_step()
            torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace_path))
    (out_dir / f"{label}.kernels.txt").write_text(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=80)
    )
    with open(trace_path) as handle:
        events, ranges = kernel_events_from_chrome_trace(json.load(handle))
    if RANGES.step not in ranges:
        raise RuntimeError(f"{trace_path}: no {RANGES.step} range in the trace")
    totals = gpu_time_breakdown(events, *ranges[RANGES.step])
    (out_dir / f"{label}.breakdown.json").write_text(json.dumps(totals, indent=2))
    print(format_breakdown(f"GPU time of one step, {label} ({torch.cuda.get_device_name()}):",
                           totals))
    return totals


def _world() -> int:
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _max_over_ranks(value: float) -> float:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=torch.cuda.current_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _destroy_dispatchers(trainer) -> None:
    """Free each distinct dispatcher's buffers (collective for ipc/nvshmem: every rank calls it in
    the same order), so that the next variant's dispatchers have the memory."""
    for dispatcher in trainer.dispatchers():
        destroy = getattr(dispatcher, "destroy", None)
        if destroy is not None:
            destroy()


def parse_variant(spec: str) -> tuple[str, str, tuple[str, ...]]:
    """``BACKEND:RECIPE[:KEY=VALUE,...]`` -> (backend, recipe, config overrides), e.g.
    ``fused:bf16:optim.adamw_state_dtype=bfloat16``."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or not all(parts[:2]):
        raise SystemExit(f"--variants: {spec!r} is not BACKEND:RECIPE[:KEY=VALUE,...] "
                         "(e.g. fused:bf16 or fused:bf16:optim.adamw_state_dtype=bfloat16)")
    extra = tuple(o for o in parts[2].split(",") if o) if len(parts) == 3 else ()
    bad = [o for o in extra if "=" not in o]
    if bad:
        raise SystemExit(f"--variants: {spec!r}: overrides must be KEY=VALUE, got {bad}")
    return parts[0], parts[1], extra


def variant_config(preset: str, backend: str, recipe: str, micro: int, steps: int,
                   seq_len: int, world: int, expert_parallel: bool = False,
                   dispatcher: str = "ipc", extra: tuple[str, ...] = ()):
    """The `TrainConfig` of one bench row: synthetic data, no validation or checkpoints, the
    preset's model and optimizer, eager and uncached unless ``extra`` says otherwise."""
    from nmoe_train.config import resolve_config

    overrides = [
        f"model.moe.backend={backend}", f"model.moe.recipe={recipe}", f"seq_len={seq_len}",
        f"micro_batch={micro}", f"global_batch={micro * world}", f"steps={steps}",
        "val_every=0", "checkpoints=false", "data.synthetic=true", "resume=false",
        "log_every=1000", f"run_name=bench-{backend}-{recipe}-{micro}",
        "runs_root=/tmp/nmoe-bench", "final_eval_tasks=null",
        # Plain rows are eager and uncached whatever the preset runs with; variants opt in
        # (`fused:bf16:compile=true,cache_expert_weights=true`).
        "compile=false", "cache_expert_weights=false",
    ]
    if expert_parallel:
        overrides += ["parallel.expert_parallel=all", f"parallel.dispatcher={dispatcher}"]
    return resolve_config(preset, overrides + list(extra))


def run_variant(preset: str, backend: str, recipe: str, micro: int, steps: int,
                seq_len: int, profile_dir: Path | None = None, expert_parallel: bool = False,
                dispatcher: str = "ipc", extra: tuple[str, ...] = ()) -> dict:
    from nmoe_train.trainer import Trainer, flops_per_token, peak_tflops

    world = _world()
    cfg = variant_config(preset, backend, recipe, micro, steps, seq_len, world, expert_parallel,
                         dispatcher, extra)
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
        "peak_gib": _max_over_ranks(torch.cuda.max_memory_allocated() / 2**30),
        # ipc / nvshmem buffers live outside torch's allocator: not in peak_gib.
        "comm_buffer_gib": sum(d.persistent_bytes for d in trainer.dispatchers()) / 2**30,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "gpus": world,
        "expert_parallel": expert_parallel and world > 1,
        "dispatcher": trainer.model.moe_layers()[0].dispatcher.name,
        "overrides": list(extra),
    }
    if profile_dir is not None:
        suffix = f"-ep{world}-rank{trainer.dist.rank}" if world > 1 else ""
        totals = profile_step(trainer, profile_dir, f"{backend}-{recipe}-mb{micro}{suffix}")
        row["profile_ms"] = {key: value / 1000 for key, value in totals.items()}
    _destroy_dispatchers(trainer)
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return row


def format_table(rows: list[dict], one_gpu: list[dict] | None = None) -> str:
    """The result table; fills each row's ratios in place: ``ratio_vs_torch`` /
    ``memory_vs_torch`` (to ``torch:bf16`` at the same micro-batch, same run),
    ``ratio_vs_fused_bf16`` (to ``fused:bf16``, same run) and, given the rows of a 1-GPU run,
    ``ratio_vs_one_gpu`` (to the same variant and micro-batch there, ``parallel.*`` overrides
    aside)."""
    def key(r, backend=None, recipe=None):
        """A row's variant and micro-batch; with backend/recipe given, the plain variant (no
        overrides) the ratios compare against."""
        extra = () if backend else tuple(r.get("overrides") or ())
        return (backend or r["backend"], recipe or r["recipe"], extra, r["micro_batch"])

    def label(r):
        return ":".join([r["backend"], r["recipe"], *([",".join(r["overrides"])]
                                                      if r.get("overrides") else [])])

    def one_gpu_key(r):
        # `parallel.*` overrides (e.g. dedup_rows) only act across ranks: an expert-parallel row
        # pairs with the 1-GPU row of the same variant without them.
        extra = tuple(o for o in r.get("overrides") or () if not o.startswith("parallel."))
        return (r["backend"], r["recipe"], extra, r["micro_batch"])

    by_key = {key(r): r for r in rows}
    one = {one_gpu_key(r): r for r in one_gpu or []}
    width = max([12, *(len(label(r)) for r in rows)])
    lines = [f"{'variant':<{width}} {'GPUs':>4} {'micro':>5} {'tok/s/GPU':>10} {'ms/step':>9} "
             f"{'MFU':>6} {'peak GiB':>9} {'+comm':>6} {'x torch':>8} {'mem x':>6} {'x f-bf16':>8} "
             f"{'x 1-GPU':>8}"]

    def ratio(a, b, field):
        return a[field] / b[field] if b else None

    def fmt(v):
        return f"{v:.2f}" if v is not None else "-"

    for r in rows:
        torch_row = by_key.get(key(r, "torch", "bf16"))
        r["ratio_vs_torch"] = ratio(r, torch_row, "tokens_per_s")
        r["memory_vs_torch"] = ratio(r, torch_row, "peak_gib")
        # Another recipe compares with the BF16 row of the same options when the run has one
        # (FP8 with compile and cached weights against BF16 with them), else with plain BF16.
        same_options = (by_key.get(("fused", "bf16", key(r)[2], r["micro_batch"]))
                        if r["recipe"] != "bf16" else None)
        r["ratio_vs_fused_bf16"] = ratio(r, same_options or by_key.get(key(r, "fused", "bf16")),
                                         "tokens_per_s")
        r["ratio_vs_one_gpu"] = ratio(r, one.get(one_gpu_key(r)), "tokens_per_s") if one else None
        lines.append(
            f"{label(r):<{width}} {r.get('gpus', 1):>4} {r['micro_batch']:>5} "
            f"{r['tokens_per_s']:>10.0f} {r['ms_per_step']:>9.1f} "
            f"{(r['mfu'] or 0) * 100:>5.1f}% {r['peak_gib']:>9.1f} "
            f"{r.get('comm_buffer_gib', 0.0):>6.1f} "
            f"{fmt(r['ratio_vs_torch']):>8} {fmt(r['memory_vs_torch']):>6} "
            f"{fmt(r['ratio_vs_fused_bf16']):>8} {fmt(r['ratio_vs_one_gpu']):>8}")
    lines += largest_micro_batch_summary(rows, label)
    return "\n".join(lines)


def largest_micro_batch_summary(rows: list[dict], label) -> list[str]:
    """Lines comparing each variant at its largest micro-batch in ``rows`` (the issue's "largest
    micro-batch that fits" when the run went up to an out-of-memory) with ``torch:bf16`` at its
    own largest; empty when no variant has more than one micro-batch."""
    largest: dict[str, dict] = {}
    count: collections.Counter[str] = collections.Counter()
    for r in rows:
        name = label(r) + (f" x{r['gpus']}" if r.get("gpus", 1) > 1 else "")
        count[name] += 1
        if name not in largest or r["micro_batch"] > largest[name]["micro_batch"]:
            largest[name] = r
    if max(count.values(), default=0) < 2:
        return []
    torch_best = largest.get("torch:bf16")
    lines = ["largest micro-batch of each variant in this run:"]
    for name, r in largest.items():
        versus = ""
        if torch_best is not None and r is not torch_best:
            versus = (f", {r['tokens_per_s'] / torch_best['tokens_per_s']:.2f}x torch:bf16 at "
                      f"its largest ({torch_best['micro_batch']})")
        lines.append(f"  {name}: micro-batch {r['micro_batch']}, {r['tokens_per_s']:.0f} "
                     f"tokens/s/GPU, {r['peak_gib']:.1f} GiB{versus}")
    return lines


def merge_rounds(rows: list[dict], variants: list[str]) -> list[dict]:
    """One row per (variant, micro-batch), in the order of ``variants`` then micro-batch: the
    median tokens/s, ms/step and MFU of its rounds and the largest peak memory, with every
    round's tokens/s in ``tokens_per_s_rounds``. A variant's micro-batch that failed in a later
    round keeps the rounds it ran."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["micro_batch"]), []).append(row)
    merged = []
    for _, runs in sorted(groups.items(),
                          key=lambda item: (variants.index(item[0][0]), item[0][1])):
        row = dict(runs[0])
        for field in ("tokens_per_s", "ms_per_step", "mfu"):
            row[field] = statistics.median(r[field] for r in runs)
        row["peak_gib"] = max(r["peak_gib"] for r in runs)
        row["tokens_per_s_rounds"] = [r["tokens_per_s"] for r in runs]
        row.pop("round", None)
        merged.append(row)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="super")
    parser.add_argument("--variants", nargs="+", default=["torch:bf16", "fused:bf16"],
                        help="BACKEND:RECIPE[:KEY=VALUE,...] (config overrides for that variant; "
                             "ratios compare with the plain torch:bf16 / fused:bf16 rows)")
    parser.add_argument("--micro-batches", nargs="+", type=int, default=[16, 32, 48, 64])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup-steps", type=int, default=4,
                        help="untimed steps of the first variant at the first micro-batch before "
                             "the table (0: none). They do not remove the row-to-row spread of "
                             "up to ~11%% on an H100 (results/train_1xH100_position_check.txt)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every (variant, micro-batch) this many times, round-robin with "
                             "the variant order reversed on odd rounds (A B, B A, ...), and report "
                             "the median of each (all round values in the JSON): rows of one "
                             "process differ by up to ~11%% on an H100, which one round cannot "
                             "tell from a difference between variants")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="profile one more step per variant; write traces and tables to DIR")
    parser.add_argument("--expert-parallel", action="store_true",
                        help="under torchrun: split the experts over the ranks")
    parser.add_argument("--dispatcher", default="ipc", choices=["ipc", "nvshmem", "nccl"],
                        help="the expert-parallel dispatcher (default ipc)")
    parser.add_argument("--compare", default=None, metavar="JSON",
                        help="a 1-GPU run's JSON: add each row's ratio to its row there")
    args = parser.parse_args(argv)
    from nmoe_train.distributed import shutdown_distributed

    main_rank = int(os.environ.get("RANK", "0")) == 0
    if not main_rank:  # one table, from rank 0
        args.json = None
    rows = []
    if args.warmup_steps > 0 and args.variants and args.micro_batches:
        backend, recipe, extra = parse_variant(args.variants[0])
        if main_rank:
            print(f"warm-up: {args.variants[0]} micro-batch {args.micro_batches[0]}, "
                  f"{args.warmup_steps} untimed steps", flush=True)
        try:
            run_variant(args.preset, backend, recipe, args.micro_batches[0], args.warmup_steps,
                        args.seq_len, None, args.expert_parallel, args.dispatcher, extra)
        except torch.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
    failed: dict[str, int] = {}  # variant -> the micro-batch at which it ran out or failed
    for round_index in range(max(1, args.rounds)):
        order = args.variants if round_index % 2 == 0 else args.variants[::-1]
        for variant in order:
            backend, recipe, extra = parse_variant(variant)
            for micro in args.micro_batches:
                if micro >= failed.get(variant, micro + 1):
                    break
                try:
                    row = run_variant(args.preset, backend, recipe, micro, args.steps,
                                      args.seq_len, args.profile if round_index == 0 else None,
                                      args.expert_parallel, args.dispatcher, extra)
                except torch.OutOfMemoryError:
                    print(f"{variant} micro-batch {micro}: out of memory", file=sys.stderr)
                    gc.collect()
                    torch.cuda.empty_cache()
                    failed[variant] = micro
                    break
                except Exception as err:  # report and go on with the other variants
                    print(f"{variant} micro-batch {micro}: {type(err).__name__}: {err}",
                          file=sys.stderr)
                    failed[variant] = micro
                    break
                row["variant"], row["round"] = variant, round_index
                rows.append(row)
                if not main_rank:
                    continue
                # Progress, and partial results that survive a time limit.
                print(f"{variant} micro-batch {micro}"
                      + (f" (round {round_index + 1})" if args.rounds > 1 else "")
                      + f": {row['tokens_per_s']:.0f} tokens/s, {row['ms_per_step']:.1f} ms/step, "
                      f"peak {row['peak_gib']:.1f} GiB + {row['comm_buffer_gib']:.1f} GiB "
                      f"dispatcher buffers", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=2))
    rows = merge_rounds(rows, args.variants)
    shutdown_distributed()
    if not main_rank:
        return 0
    one_gpu = json.loads(Path(args.compare).read_text()) if args.compare else []
    print(format_table(rows, one_gpu))
    if rows:
        print(f"device: {rows[0]['device']} x {rows[0]['gpus']}, torch {rows[0]['torch']}; "
              f"tokens/s and memory per GPU")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
