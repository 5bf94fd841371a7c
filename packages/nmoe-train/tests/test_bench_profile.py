"""The training bench's profiling ranges (`bench/bench_train.py --profile`) on a CPU step: the
ranges appear in a torch.profiler trace where the categorisation expects them, leave the step's
results unchanged, and every patched attribute is restored afterwards."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from nmoe_core import moe as moe_module
from nmoe_train.config import resolve_config
from nmoe_train.step_profile import RANGES
from nmoe_train.testing import SMALL
from nmoe_train.trainer import Trainer

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_train.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trainer(tmp_path: Path, name: str) -> Trainer:
    cfg = resolve_config("tiny", [*SMALL, "data.synthetic=true", "checkpoints=false",
                                  "resume=false", "val_every=0", "steps=3",
                                  "model.moe.backend=torch", f"runs_root={tmp_path}",
                                  f"run_name={name}"])
    return Trainer(cfg, quiet=True)


def _user_ranges(trace_path: Path) -> list[tuple[float, float, str, int]]:
    events = json.loads(trace_path.read_text())["traceEvents"]
    return [(e["ts"], e["ts"] + e["dur"], e["name"], e["tid"]) for e in events
            if e.get("cat") == "user_annotation" and e["name"].startswith("nmoe/")]


def test_step_ranges_cover_the_step_and_change_nothing(tmp_path):
    bench = _bench()
    plain, ranged = _trainer(tmp_path, "plain"), _trainer(tmp_path, "ranged")
    originals = (moe_module.Router.forward, torch.Tensor.backward,
                 moe_module.GroupedExperts.forward)
    want = plain.train_step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with bench._step_ranges(ranged), torch.profiler.record_function(RANGES.step):
            got = ranged.train_step()
    assert got == want  # same losses, norms and router statistics, bit for bit
    assert (moe_module.Router.forward, torch.Tensor.backward,
            moe_module.GroupedExperts.forward) == originals
    assert "forward" not in vars(ranged.model) and "step" not in vars(ranged.optimizer)
    for layer in ranged.model.moe_layers():
        assert "dispatch" not in vars(layer.dispatcher)
        assert "combine" not in vars(layer.dispatcher)

    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    ranges = _user_ranges(trace)
    names = [name for _, _, name, _ in ranges]
    num_moe = len(ranged.model.moe_layers())
    assert names.count(RANGES.step) == 1
    assert names.count(RANGES.forward) == 1 and names.count(RANGES.backward) == 1
    assert names.count(RANGES.optimizer) == 1
    assert names.count(RANGES.router) == num_moe
    # forward: one dispatch and one combine per MoE layer; backward: the combine's gradient is
    # a dispatch and the dispatch's a combine (or their *_backward methods).
    assert names.count(RANGES.dispatch) >= 2 * num_moe
    assert names.count(RANGES.combine) >= 2 * num_moe
    assert names.count(RANGES.experts) == num_moe and names.count(RANGES.loss) >= 2

    def span(name):
        return next((start, end) for start, end, n, _ in ranges if n == name)

    step, forward, backward, optimizer = (span(n) for n in (
        RANGES.step, RANGES.forward, RANGES.backward, RANGES.optimizer))
    assert step[0] <= forward[0] < forward[1] <= backward[0] < backward[1] <= optimizer[0]
    assert optimizer[1] <= step[1]
    for start, end, name, _ in ranges:
        if name in (RANGES.router, RANGES.experts):
            assert forward[0] <= start and end <= forward[1], name
        if name in (RANGES.dispatch, RANGES.combine, RANGES.loss):
            assert forward[0] <= start and end <= backward[1], name


def test_table_ratios_pair_rows_of_the_same_micro_batch_and_variant():
    import random

    bench = _bench()
    rng = random.Random()

    def row(backend, recipe, micro, gpus=1):
        return {"backend": backend, "recipe": recipe, "micro_batch": micro, "gpus": gpus,
                "tokens_per_s": rng.uniform(1e4, 3e5), "ms_per_step": 1.0, "mfu": 0.3,
                "peak_gib": rng.uniform(5, 70)}

    rows = [row(b, r, m, 4) for b, r in (("torch", "bf16"), ("fused", "bf16"), ("fused", "fp8"))
            for m in (8, 16)]
    one_gpu = [row("fused", "bf16", 8), row("torch", "bf16", 16)]
    table = bench.format_table(rows, one_gpu)
    # header, one line per row, then the largest-micro-batch summary: a title and one per variant
    assert len(table.splitlines()) == 1 + len(rows) + 1 + 3
    by = {(r["backend"], r["recipe"], r["micro_batch"]): r for r in rows}
    for (_, _, micro), r in by.items():
        t = by[("torch", "bf16", micro)]
        f = by[("fused", "bf16", micro)]
        assert r["ratio_vs_torch"] == r["tokens_per_s"] / t["tokens_per_s"]
        assert r["memory_vs_torch"] == r["peak_gib"] / t["peak_gib"]
        assert r["ratio_vs_fused_bf16"] == r["tokens_per_s"] / f["tokens_per_s"]
    assert by[("fused", "bf16", 8)]["ratio_vs_one_gpu"] == (
        by[("fused", "bf16", 8)]["tokens_per_s"] / one_gpu[0]["tokens_per_s"])
    assert by[("torch", "bf16", 16)]["ratio_vs_one_gpu"] == (
        by[("torch", "bf16", 16)]["tokens_per_s"] / one_gpu[1]["tokens_per_s"])
    assert by[("fused", "fp8", 8)]["ratio_vs_one_gpu"] is None  # no 1-GPU row to pair with
    # An expert-parallel-only override pairs with the 1-GPU row without it; others do not.
    dedup = dict(row("fused", "bf16", 8, 4), overrides=["parallel.dedup_rows=true"])
    moments = dict(row("fused", "bf16", 8, 4), overrides=["optim.adamw_state_dtype=bfloat16"])
    bench.format_table([dedup, moments], one_gpu)
    assert dedup["ratio_vs_one_gpu"] == dedup["tokens_per_s"] / one_gpu[0]["tokens_per_s"]
    assert moments["ratio_vs_one_gpu"] is None


def test_variant_overrides_are_parsed_labelled_and_compared_with_the_plain_rows():
    bench = _bench()
    assert bench.parse_variant("fused:bf16") == ("fused", "bf16", ())
    assert bench.parse_variant("fused:bf16:optim.adamw_state_dtype=bfloat16,seed=3") == (
        "fused", "bf16", ("optim.adamw_state_dtype=bfloat16", "seed=3"))
    for bad in ("fused", "fused:bf16:adamw"):
        with pytest.raises(SystemExit, match="--variants"):
            bench.parse_variant(bad)

    def row(backend, recipe, tok, gib, overrides=()):
        return {"backend": backend, "recipe": recipe, "micro_batch": 16, "tokens_per_s": tok,
                "ms_per_step": 1.0, "mfu": 0.3, "peak_gib": gib, "overrides": list(overrides)}

    plain, torch_row = row("fused", "bf16", 140.0, 48.0), row("torch", "bf16", 100.0, 70.0)
    moments = row("fused", "bf16", 133.0, 38.0, ["optim.adamw_state_dtype=bfloat16"])
    table = bench.format_table([torch_row, plain, moments])
    assert "fused:bf16:optim.adamw_state_dtype=bfloat16" in table
    assert moments["ratio_vs_fused_bf16"] == 133.0 / 140.0
    assert moments["memory_vs_torch"] == 38.0 / 70.0
    assert plain["ratio_vs_fused_bf16"] == 1.0
    # FP8 with options compares with BF16 with the same options, when the run has them.
    fp8 = row("fused", "fp8", 120.0, 38.0, ["optim.adamw_state_dtype=bfloat16"])
    fp8_plain = row("fused", "fp8", 125.0, 47.0)
    bench.format_table([plain, moments, fp8, fp8_plain])
    assert fp8["ratio_vs_fused_bf16"] == 120.0 / 133.0
    assert fp8_plain["ratio_vs_fused_bf16"] == 125.0 / 140.0
    bench.format_table([plain, fp8])  # no BF16 row with its options: plain BF16
    assert fp8["ratio_vs_fused_bf16"] == 120.0 / 140.0


def test_summary_compares_each_variant_at_its_largest_micro_batch():
    bench = _bench()

    def row(backend, recipe, micro, tok, overrides=()):
        return {"backend": backend, "recipe": recipe, "micro_batch": micro, "tokens_per_s": tok,
                "ms_per_step": 1.0, "mfu": 0.3, "peak_gib": micro * 1.5,
                "overrides": list(overrides)}

    rows = [row("torch", "bf16", 16, 100.0), row("fused", "bf16", 16, 200.0, ["compile=true"]),
            row("fused", "bf16", 48, 250.0, ["compile=true"])]
    summary = bench.format_table(rows).splitlines()[1 + len(rows):]
    assert summary[0].startswith("largest micro-batch")
    assert summary[1].strip() == "torch:bf16: micro-batch 16, 100 tokens/s/GPU, 24.0 GiB"
    assert summary[2].strip() == ("fused:bf16:compile=true: micro-batch 48, 250 tokens/s/GPU, "
                                  "72.0 GiB, 2.50x torch:bf16 at its largest (16)")
    # One micro-batch per variant: nothing to add.
    assert len(bench.format_table(rows[:2]).splitlines()) == 3


def test_plain_rows_run_eager_whatever_the_preset_says():
    """`super` trains with compile and cached expert casts; the bench's plain rows must not (they
    are the baselines), and a variant's overrides switch them on."""
    bench = _bench()
    assert resolve_config("super", []).compile and resolve_config("super", []).cache_expert_weights
    plain = bench.variant_config("super", "fused", "bf16", 16, 6, 2048, 1)
    assert not plain.compile and not plain.cache_expert_weights
    assert plain.micro_batch == 16 and plain.global_batch == 16 and plain.data.synthetic
    fast = bench.variant_config("super", "fused", "bf16", 16, 6, 2048, 4, extra=(
        "compile=true", "cache_expert_weights=true", "optim.adamw_state_dtype=bfloat16"))
    assert fast.compile and fast.cache_expert_weights and fast.global_batch == 64
    assert fast.optim.adamw_state_dtype == "bfloat16"


def test_warmup_runs_the_first_variant_untimed_before_the_table(monkeypatch, tmp_path, capsys):
    """``--warmup-steps``: the first variant at the first micro-batch runs that many steps
    before any timed row, and is not in the table; an out-of-memory in the warm-up is no error.
    (run_variant itself needs a GPU: replaced by a recorder.)"""
    bench = _bench()
    calls = []

    def fake_run_variant(preset, backend, recipe, micro, steps, *args):
        calls.append((backend, recipe, micro, steps))
        if len(calls) == 1 and micro == 8:
            raise torch.OutOfMemoryError("warm-up")
        return {"backend": backend, "recipe": recipe, "micro_batch": micro, "gpus": 1,
                "tokens_per_s": 1.0, "ms_per_step": 1.0, "mfu": 0.1, "peak_gib": 1.0,
                "comm_buffer_gib": 0.0, "device": "cpu", "torch": torch.__version__,
                "overrides": []}

    monkeypatch.setattr(bench, "run_variant", fake_run_variant)
    out = tmp_path / "rows.json"
    assert bench.main(["--variants", "fused:bf16", "torch:bf16", "--micro-batches", "16", "32",
                       "--steps", "3", "--warmup-steps", "2", "--json", str(out)]) == 0
    assert calls == [("fused", "bf16", 16, 2), ("fused", "bf16", 16, 3), ("fused", "bf16", 32, 3),
                     ("torch", "bf16", 16, 3), ("torch", "bf16", 32, 3)]
    assert len(json.loads(out.read_text())) == 4
    assert "warm-up: fused:bf16 micro-batch 16, 2 untimed steps" in capsys.readouterr().out
    calls.clear()
    bench.main(["--variants", "fused:bf16", "--micro-batches", "8", "--steps", "3"])
    assert calls == [("fused", "bf16", 8, 4), ("fused", "bf16", 8, 3)]  # warm-up OOM tolerated
    calls.clear()
    bench.main(["--variants", "fused:bf16", "--micro-batches", "8", "--warmup-steps", "0"])
    assert calls == [("fused", "bf16", 8, 6)]


def test_rounds_alternate_the_order_and_report_medians(monkeypatch, tmp_path):
    """``--rounds 3``: every (variant, micro-batch) runs three times, the variant order reversed
    on odd rounds (A B, B A, A B); the table row is the median of the rounds with every round's
    tokens/s kept; a micro-batch that ran out of memory is not tried again in later rounds."""
    bench = _bench()
    calls = []
    speeds = iter([100.0, 300.0, 200.0, 110.0, 180.0, 150.0, 120.0, 250.0, 190.0, 130.0])

    def fake_run_variant(preset, backend, recipe, micro, steps, seq_len, profile, *args):
        calls.append((backend, micro, profile))
        if backend == "torch" and micro == 32:
            raise torch.OutOfMemoryError("too big")
        value = next(speeds)
        return {"backend": backend, "recipe": recipe, "micro_batch": micro, "gpus": 1,
                "tokens_per_s": value, "ms_per_step": 1000.0 / value, "mfu": value / 1000,
                "peak_gib": value / 10, "comm_buffer_gib": 0.0, "device": "cpu",
                "torch": torch.__version__, "overrides": []}

    monkeypatch.setattr(bench, "run_variant", fake_run_variant)
    out = tmp_path / "rows.json"
    assert bench.main(["--variants", "fused:bf16", "torch:bf16", "--micro-batches", "16", "32",
                       "--rounds", "3", "--warmup-steps", "0", "--profile", str(tmp_path),
                       "--json", str(out)]) == 0
    order = [(b, m) for b, m, _ in calls]
    assert order == [("fused", 16), ("fused", 32), ("torch", 16), ("torch", 32),
                     ("torch", 16), ("fused", 16), ("fused", 32),
                     ("fused", 16), ("fused", 32), ("torch", 16)]
    assert [p is not None for _, _, p in calls] == [True] * 4 + [False] * 6  # round 1 only
    rows = json.loads(out.read_text())
    assert [(r["backend"], r["micro_batch"]) for r in rows] == [
        ("fused", 16), ("fused", 32), ("torch", 16)]
    fused16, fused32, torch16 = rows
    # fused 16 ran 100, 180, 120 -> median 120; fused 32: 300, 150, 250 -> 250;
    # torch 16: 200, 110, 190 -> 190
    assert fused16["tokens_per_s_rounds"] == [100.0, 180.0, 120.0]
    assert fused16["tokens_per_s"] == 120.0 and fused32["tokens_per_s"] == 250.0
    assert torch16["tokens_per_s"] == 190.0 and torch16["peak_gib"] == 20.0
    assert fused16["ratio_vs_torch"] == pytest.approx(120.0 / 190.0)
