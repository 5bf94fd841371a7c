"""clock_probe.py's nvidia-smi parsing and per-workload summary, and launch_overhead.py's host timer
(CPU; no GPU, no nvidia-smi)."""

from __future__ import annotations

import datetime
import random

import pytest


@pytest.fixture(scope="module")
def probe(load_bench):
    return load_bench("clock_probe")


def smi_line(t: float, mhz: float, watts: float, reasons: int) -> str:
    stamp = datetime.datetime.fromtimestamp(t).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
    return f"{stamp}, {mhz:.0f}, {watts:.2f}, 61, 0x{reasons:016X}"


def test_parse_smi_line_round_trips_and_rejects_na(probe):
    t = 1_800_000_000.25 + random.random()
    s = probe.parse_smi_line(smi_line(t, 1755, 512.3, 0x4))
    assert s["t"] == pytest.approx(t, abs=1e-3)
    assert (s["mhz"], s["watts"], s["temp"], s["reasons"]) == (1755.0, 512.3, 61.0, 4)
    assert probe.parse_smi_line("2026/11/27 22:00:00.000, [N/A], 100.0, 50, 0x0") is None
    assert probe.parse_smi_line("garbage") is None


def test_summary_uses_the_sustained_half_and_its_samples(probe):
    rng = random.Random()
    t0 = 1_800_000_000.0 + rng.random()
    calls = 40
    # the first half fast at a high clock, the second half slower at a lower clock under the cap
    call_ms = [1.0 + 0.01 * rng.random() for _ in range(20)] + [1.25] * 20
    spans, t = [], t0
    for ms in call_ms:
        spans.append((t, t + ms / 1e3))
        t += ms / 1e3
    samples = []
    for i in range(80):
        ts = t0 + i * (t - t0) / 80
        second_half = ts >= spans[20][0]
        samples.append(probe.parse_smi_line(smi_line(
            ts, 1500 if second_half else 1980, 690 if second_half else 600,
            0x4 if second_half and i % 2 else 0x0)))
    flops = 10**12
    r = probe.summarize_run("w", flops, call_ms, spans, samples)
    assert r["calls"] == calls
    assert r["ms_sustained"] == 1.25
    assert r["ms_first"] == pytest.approx(sorted(call_ms[:5])[2])
    assert r["mhz"] == 1500 and r["watts"] == 690
    assert 0.4 <= r["power_cap"] <= 0.6 and r["hw_slowdown"] == 0
    assert r["tflops"] == pytest.approx(flops / 1.25 / 1e9)
    assert r["tflops_per_ghz"] == pytest.approx(r["tflops"] / 1.5)


def test_window_without_samples_reports_none(probe):
    stats = probe.window_stats([], 0.0, 1.0)
    assert stats["samples"] == 0 and stats["mhz"] is None


def test_unknown_workload_is_named(probe, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["clock_probe.py", "--workloads", "fp8_dense,nope"])
    with pytest.raises(SystemExit, match="nope"):
        probe.main()


def test_variant_workloads_are_checked(probe):
    assert probe.is_variant("fp8_w13_dsv3@2x1eWh")
    assert probe.is_variant("fp8_w13_deepgemm@1x1eWh@3")
    assert not probe.is_variant("fp8_w13_super@1x1eWh")
    assert not probe.is_variant("fp8_w13_dsv3@")
    with pytest.raises(SystemExit, match="want <M>x<N>"):
        probe.is_variant("fp8_w13_dsv3@2x1q")


def test_launch_overhead_host_timer(load_bench, monkeypatch):
    """launch_overhead.host_us: the median host time per call, in microseconds (CPU: a sleeping
    callable, the CUDA synchronisation stubbed out)."""
    import time

    import torch

    bench = load_bench("launch_overhead")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    ms = random.uniform(0.5, 1.5)
    us = bench.host_us(lambda: time.sleep(ms / 1e3), calls=15, warmup=1)
    assert ms * 1e3 <= us < ms * 1e3 + 2000
