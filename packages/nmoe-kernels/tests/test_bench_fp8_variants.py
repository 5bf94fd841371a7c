"""The FP8 bench's variant syntax and round-robin timing helper (CPU; no kernel runs)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("bench_grouped_fp8")


def test_parse_variant_flags(bench):
    cluster, opts, tile = bench.parse_variant("2x1oef")
    assert cluster == (2, 1) and tile is None
    assert opts == dict(overlap=True, epi_overlap=True, fast_silu=True, skip_epilogue=False,
                        n_major=False, cluster_launch=False, early_scales=False)
    cluster, opts, tile = bench.parse_variant("1x1owtl")
    assert cluster == (1, 1) and tile == (64, 256)
    assert opts == dict(overlap=True, epi_overlap=False, fast_silu=False, skip_epilogue=False,
                        n_major=True, cluster_launch=True, early_scales=False)
    cluster, opts, tile = bench.parse_variant("2x1We")
    assert cluster == (2, 1) and tile == (128, 256)
    assert opts == dict(overlap=False, epi_overlap=True, fast_silu=False, skip_epilogue=False,
                        n_major=False, cluster_launch=False, early_scales=False)
    assert bench.parse_variant("2x1eWh")[1]["early_scales"] is True
    assert bench.parse_variant("1x1W@3")[1]["stages"] == 3
    assert bench.parse_variant("2x1We%2")[1]["band"] == 2
    assert bench.parse_variant("1x1o@4%3")[1] | {} == dict(
        overlap=True, epi_overlap=False, fast_silu=False, skip_epilogue=False, n_major=False,
        cluster_launch=False, early_scales=False, stages=4, band=3)
    for bad in ("1x1q", "oe", "1x", "1x2 o", "1x1O", "1x1%", "1x1%2@3"):
        with pytest.raises(ValueError, match="want <M>x<N> followed by flags from oefswWtlh"):
            bench.parse_variant(bad)


def test_timed_rounds_takes_medians_and_reports_failures(bench, monkeypatch, capsys):
    calls = []
    samples = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 4.0, 6.0])}

    def fake_median_ms(fn):
        return fn()

    def make(name):
        def fn():
            calls.append(name)
            return next(samples[name])

        return fn

    def broken():
        calls.append("c")
        raise RuntimeError("unsupported")

    monkeypatch.setattr(bench, "median_ms", fake_median_ms)
    monkeypatch.setattr(bench, "ROUNDS", 3)
    got = bench.timed_rounds({"a": make("a"), "b": make("b"), "c": broken})
    assert got == {"a": 2.0, "b": 5.0, "c": None}
    # Round-robin, odd passes reversed; a failure is not retried.
    assert calls == ["a", "b", "c", "b", "a", "a", "b"]
    assert "c failed: RuntimeError: unsupported" in capsys.readouterr().out



def test_ab_rounds_rotate_and_ratios_are_paired_within_a_round(load_bench, monkeypatch):
    """bench/ab_fp8.py: each round times every variant once, the order rotated by one and
    reversed on odd rounds; a variant's ratio is taken to the first variant's time in the same
    round, so a drift shared by a round cancels."""
    ab = load_bench("ab_fp8")
    calls = []
    # round r: a takes 1 + r (a drift), b takes 0.9 * (1 + r), c takes 1.1 * (1 + r)
    factor = {"a": 1.0, "b": 0.9, "c": 1.1}
    rnd = {"n": 0}

    def fake_median_ms(fn, iters, warmup):
        assert (iters, warmup) == (7, 2)
        return fn()

    def make(name):
        def fn():
            calls.append(name)
            return factor[name] * (1 + rnd["n"] // 3)  # three calls per round

        return fn

    def counting(fn):
        def wrapped():
            out = fn()
            rnd["n"] += 1
            return out

        return wrapped

    monkeypatch.setattr(ab.bench, "median_ms", fake_median_ms)
    times = ab.ab_rounds({v: counting(make(v)) for v in "abc"}, rounds=4, iters=7)
    assert calls == list("abc") + list("bca")[::-1] + list("cab") + list("abc")[::-1]
    assert times["a"] == [1.0, 2.0, 3.0, 4.0]
    rows = {r["variant"]: r for r in ab.summarize(times, flops=int(2e12))}
    assert rows["a"]["ratio_median"] == 1.0 and rows["a"]["faster_rounds"] == 0
    assert rows["b"]["ratio_median"] == pytest.approx(0.9)
    assert (rows["b"]["faster_rounds"], rows["c"]["faster_rounds"]) == (4, 0)
    assert rows["c"]["ratio_min"] == pytest.approx(1.1) == rows["c"]["ratio_max"]
    assert rows["a"]["ms"] == 2.5 and rows["a"]["tflops"] == pytest.approx(2e12 / 2.5 / 1e9)
