"""The benches' target verdicts, floors and byte counts (CPU; no kernel runs)."""

from __future__ import annotations

import random

import pytest
import torch

from nmoe_kernels import reference as ref


@pytest.fixture(scope="module")
def targets(load_bench):
    return load_bench("bench_targets")


@pytest.fixture(scope="module")
def fp8_bench(load_bench):
    return load_bench("bench_grouped_fp8")


def test_floor_is_the_larger_term(targets):
    rng = random.Random()
    ceilings = dict(dense="x", dense_tflops=rng.uniform(500, 1500), copy_gbs=rng.uniform(2e3, 4e3))
    compute_ms = rng.uniform(0.5, 2.0)
    flops = compute_ms * ceilings["dense_tflops"] * 1e9
    # bytes worth half the compute time: compute-bound; then twice: bytes-bound
    for share, bound in ((0.5, "compute"), (2.0, "bytes")):
        nbytes = share * compute_ms * ceilings["copy_gbs"] * 1e6
        ms = rng.uniform(1.0, 3.0) * max(1.0, share) * compute_ms
        got = targets.floor_fields(flops, nbytes, ms, ceilings)
        floor = max(compute_ms, share * compute_ms)
        assert got["bound"] == bound
        assert got["floor_ms"] == pytest.approx(floor, rel=1e-12)
        assert got["of_floor"] == pytest.approx(floor / ms, rel=1e-12)
        assert got["min_bytes"] == int(nbytes)
        assert targets.floor_column(got) == f"{100 * floor / ms:.0f}% {bound[0]}"
    assert targets.floor_fields(flops, 123.0, 1.0, None) == dict(min_bytes=123)
    assert targets.floor_column(dict(min_bytes=1)) == "n/a"


def test_evaluate_meets_misses_and_absent(targets):
    rng = random.Random()
    want = [targets.Target("w13_fp8", "moonlight", "ratio", 1.3),
            targets.Target("deepgemm_shape", "deepgemm K=7168", "tflops", 1150.0),
            targets.Target("mlp_fwd_fp8", "dsv3-local", "ratio", 1.5)]
    ratio = rng.uniform(1.0, 1.29)
    tflops = rng.uniform(1151.0, 1400.0)
    rows = [
        dict(op="w13_fp8", case="moonlight", ratio=ratio, tflops=900.0, of_floor=0.5,
             bound="compute"),
        dict(op="w13_fp8", case="super", ratio=9.0, tflops=900.0),  # another case: ignored
        dict(op="deepgemm_shape", case="deepgemm K=7168", ratio=1.0, tflops=tflops),
    ]
    got = targets.evaluate(rows, want)
    assert [v["met"] for v in got] == [False, True, None]
    assert got[0]["value"] == ratio
    assert got[0]["shortfall_pct"] == pytest.approx(100 * (1 - ratio / 1.3))
    assert got[0]["of_floor"] == 0.5 and got[0]["bound"] == "compute"
    assert got[1]["shortfall_pct"] == 0.0 and "of_floor" not in got[1]
    assert got[2]["value"] is None
    lines = [targets.format_verdict(v) for v in got]
    assert lines[0] == (f"w13_fp8 at moonlight >= 1.3x baseline: {ratio:.2f}x MISSED by "
                        f"{100 * (1 - ratio / 1.3):.1f}% (runs at 50% of its compute floor)")
    assert lines[1] == (f"deepgemm_shape at deepgemm K=7168 >= 1150 TFLOP/s: {tflops:.0f} "
                        "TFLOP/s MET")
    assert lines[2] == "mlp_fwd_fp8 at dsv3-local >= 1.5x baseline: not measured in this run"


def test_missed_compute_target_reports_the_rate_it_needs(targets):
    """A missed ratio target on a compute-bound row: threshold x the baseline's TFLOP/s, and
    that as a share of the dense product's sustained rate; not for a bytes-bound row, a met
    target, or without the sustained rate."""
    rng = random.Random()
    base_tf = rng.uniform(800, 1000)
    held = rng.uniform(1100, 1300)
    ceilings = dict(dense="x", dense_tflops=1400.0, copy_gbs=3000.0, dense_sustained_tflops=held)
    t = targets.Target("w13_fp8", "dsv3-local", "ratio", 1.3)
    ratio = rng.uniform(1.0, 1.2)
    row = dict(op="w13_fp8", case="dsv3-local", ratio=ratio, tflops=ratio * base_tf,
               baseline_tflops=base_tf, of_floor=0.7, bound="compute")
    (v,) = targets.evaluate([row], [t], ceilings)
    assert v["needed_tflops"] == pytest.approx(1.3 * base_tf)
    assert v["needed_of_sustained"] == pytest.approx(1.3 * base_tf / held)
    assert targets.format_verdict(v).endswith(
        f"; meeting it needs {1.3 * base_tf:.0f} TFLOP/s, "
        f"{100 * 1.3 * base_tf / held:.0f}% of the dense GEMM's sustained rate")
    (v,) = targets.evaluate([dict(row, bound="bytes")], [t], ceilings)
    assert "needed_tflops" not in v
    (v,) = targets.evaluate([row], [t], dict(ceilings, dense_sustained_tflops=None))
    assert "needed_tflops" not in v
    (v,) = targets.evaluate([dict(row, ratio=1.31)], [t], ceilings)
    assert v["met"] and "needed_tflops" not in v
    tf = targets.Target("deepgemm_shape", "deepgemm K=7168", "tflops", 1150.0)
    assert targets.needed_tflops(tf, {}) == 1150.0
    assert targets.needed_tflops(t, {}) is None


def test_issue_targets_listed(targets):
    fp8 = {(t.op, t.case): (t.metric, t.threshold) for t in targets.FP8_TARGETS}
    assert fp8[("w13_fp8", "super")] == ("ratio", 3.0)
    assert fp8[("w13_fp8", "dsv3-local")] == ("ratio", 1.3)
    assert fp8[("deepgemm_shape", "deepgemm K=7168")] == ("tflops", 1150.0)
    assert len(fp8) == 6
    bf16 = {(t.op, t.case): t.threshold for t in targets.BF16_TARGETS}
    assert len(bf16) == 15 and bf16[("mlp_fwd", "moonlight")] == 1.2
    assert bf16[("wgrad_w2", "super")] == 1.0


def test_measure_ceilings_counts_flops_and_bytes(targets):
    """On the CPU with a timer that runs the op once and reports a fixed time: the rates follow
    from the sizes (2 n^3 FLOPs; the copy's bytes read plus written), and the ops run."""
    calls = []

    def timer(fn):
        out = fn()
        calls.append(out)
        return 2.0  # ms

    size = 128 * random.randrange(1, 3)
    for dtype in ("fp8", "bf16"):
        got = targets.measure_ceilings(dtype, timer, size=size, copy_bytes=1 << 12, device="cpu",
                                       sustain_s=0)  # the sustained run needs CUDA events
        assert got["dense_tflops"] == pytest.approx(2 * size**3 / 2.0 / 1e9)
        assert got["dense_sustained_tflops"] is None
        assert got["copy_gbs"] == pytest.approx(2 * (1 << 12) / 2.0 / 1e6)
        assert dtype in got["dense"]
        product, copied = calls[-2:]
        assert product.shape == (size, size) and product.dtype == torch.bfloat16
        assert product.abs().sum() > 0 and copied.shape == ((1 << 12) // 4,)
    with pytest.raises(ValueError, match="dtype must be 'fp8' or 'bf16'"):
        targets.measure_ceilings("fp16", timer, device="cpu")


def test_fp8_byte_counts_match_the_quantized_operands(fp8_bench):
    rows = random.randrange(1, 300)
    k = 128 * random.randrange(1, 4)
    experts, n = random.randrange(1, 4), random.choice((128, 200, 384))
    xq, xs = ref.quantize_fp8_1x128(torch.randn(rows, k))
    assert fp8_bench.fp8_bytes(rows, k) == xq.nbytes + xs.nbytes
    wq, ws = ref.quantize_fp8_128x128(torch.randn(experts, n, k))
    assert fp8_bench.weight_bytes(experts, n, k) == wq.nbytes + ws.nbytes


def test_bf16_byte_counts_are_each_operand_once(load_bench):
    bench = load_bench("bench_grouped_bf16")
    m, d, f, e = (random.randrange(1, 1000) for _ in range(4))
    x, h, a, y = (m, d), (m, 2 * f), (m, f), (m, d)  # input, W13 out, SwiGLU out, W2 out
    w13, w2 = (e, d, 2 * f), (e, f, d)
    operands = {  # inputs and output of each case
        "w13_swiglu": (x, w13, a),
        "mlp_fwd": (x, w13, w2, y),
        "dgrad_w13": (h, w13, x),
        "dgrad_w2": (y, w2, a),
        "wgrad_w13": (x, h, w13),
        "wgrad_w2": (a, y, w2),
    }
    for op, shapes in operands.items():
        want = sum(torch.empty(s, dtype=torch.bfloat16, device="meta").nbytes for s in shapes)
        assert bench.min_bytes(op, m, d, f, e) == want, op
        assert bench.min_bytes(op + "[nk]", m, d, f, e) == want, op


def test_print_verdicts_shows_both_ceilings(targets, capsys):
    rng = random.Random()
    cool, held = rng.uniform(1300, 1500), rng.uniform(1100, 1290)
    ceilings = dict(dense="torch._scaled_mm fp8 8192^3", dense_tflops=cool, copy_gbs=3000.0,
                    dense_sustained_tflops=held)
    targets.print_verdicts([], ceilings)
    out = capsys.readouterr().out
    assert f"torch._scaled_mm fp8 8192^3 {cool:.0f} TFLOP/s" in out
    assert f"held back to back for 1.5 s (second half): {held:.0f} TFLOP/s" in out
    targets.print_verdicts([], dict(ceilings, dense_sustained_tflops=None))
    assert "held back to back" not in capsys.readouterr().out
