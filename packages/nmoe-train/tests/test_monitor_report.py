"""``n mon`` and ``n viz`` on a synthetic run: the numbers they print, the geometry of the braille
and SVG plots (decoded back to coordinates), exiting when the run ends, and a self-contained
HTML report."""

from __future__ import annotations

import math
import random
import re
import threading
import time

import pytest

from nmoe_train.metrics import MetricsDB
from nmoe_train.monitor import braille_plot, mon_main, sparkline
from nmoe_train.report import _nice_ticks, line_chart, viz_main

RUN_ID = "run_1700000000_4242"


def _make_run(run_dir, rng, steps=300, layers=3, finish=True):
    """A synthetic run; returns the last logged value of every key and its step."""
    last: dict[str, tuple[int, float]] = {}
    db = MetricsDB(run_dir / "metrics.db", tensorboard=False)
    db.start_run(RUN_ID, "synthetic-moe", {"model": {"dim": 96, "n_experts": 8},
                                          "optim": {"lr": 0.003}}, "fp-0123abcd", 2)
    for step in range(1, steps + 1):
        loss = 3 + 7 * math.exp(-step / 50) + rng.gauss(0, 0.02)
        values = {
            "train/loss": loss, "train/lm_loss": loss - 0.05, "train/mtp_loss": 0.04,
            "train/aux_loss": 0.01, "train/grad_norm": rng.uniform(0.5, 1.5),
            "throughput/tokens_per_s": rng.uniform(1e5, 2e5),
            "throughput/tokens_per_s_per_gpu": rng.uniform(5e4, 1e5),
            "throughput/ms_per_step": rng.uniform(200, 300), "tokens_seen": step * 65536.0,
            "lr/dense": 3e-3 * min(1.0, step / 30), "lr/expert": 2e-3, "lr/router": 1e-3,
            "lr/muon": 0.02, "memory/peak_gib": 12.5, "efficiency/mfu": 0.35,
        }
        for layer in range(1, layers + 1):
            values[f"router/layer_{layer:02d}/cv"] = rng.uniform(0.05, 0.5)
            values[f"router/layer_{layer:02d}/max_load"] = rng.uniform(1.1, 2.0)
            values[f"router/layer_{layer:02d}/dead"] = float(rng.randint(0, 2))
            values[f"router/layer_{layer:02d}/bias_range"] = rng.uniform(0, 0.1)
        if step % 50 == 0:
            values["val/loss"] = loss + 0.1
        db.log(step, values)
        last.update({k: (step, v) for k, v in values.items()})
    if finish:
        db.finish("completed", {"final_loss": last["train/loss"][1], "stop_reason": "steps"})
        db.close()
    return last, db


@pytest.fixture
def rng():
    seed = time.time_ns()
    r = random.Random(seed)
    r.seed_value = seed
    return r


def test_mon_once_prints_the_latest_numbers(tmp_path, rng, capsys):
    last, _ = _make_run(tmp_path, rng)
    assert mon_main([str(tmp_path), "--once", "--width", "120", "--height", "50"]) == 0
    out = capsys.readouterr().out
    assert RUN_ID in out and "[completed]" in out and "synthetic-moe" in out
    assert "step 300 " in out
    assert f"loss {last['train/loss'][1]:.4f}" in out, rng.seed_value
    assert f"val {last['val/loss'][1]:.4f} @300" in out
    assert f"grad norm {last['train/grad_norm'][1]:.3f}" in out
    assert "tokens 19.7M" in out  # 300 * 65536 = 19,660,800
    assert f"lr dense {last['lr/dense'][1]:.2e}" in out
    header = next(line for line in out.splitlines() if line.startswith("router"))
    assert "cv" in header and "max/mean" in header and "dead" in header
    for layer in ("01", "02", "03"):
        row = next(line for line in out.splitlines() if line.startswith(f"layer {layer}"))
        cols = row.split()
        assert cols[2] == f"{last[f'router/layer_{layer}/cv'][1]:.3f}", (rng.seed_value, row)
        assert cols[3] == f"{last[f'router/layer_{layer}/max_load'][1]:.2f}"
        assert cols[4] == f"{last[f'router/layer_{layer}/dead'][1]:.0f}"
        assert cols[5] == f"{last[f'router/layer_{layer}/bias_range'][1]:.4f}"
    assert max(len(line) for line in out.splitlines()) <= 120
    assert "\x1b[" not in out  # no ANSI codes when not a terminal


def test_mon_follows_a_running_run_until_it_ends(tmp_path, rng, capsys):
    last, db = _make_run(tmp_path, rng, steps=20, finish=False)
    db.flush()
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "rc", mon_main([str(tmp_path), "--interval", "0.05", "--width", "100"])))
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive(), "n mon must keep refreshing while the run is running"
    db.log(21, {"train/loss": 1.2345})
    db.finish("completed", {})
    db.close()
    thread.join(10)
    assert not thread.is_alive() and result["rc"] == 0
    frames = capsys.readouterr().out
    assert frames.count("[running]") >= 2 and frames.rstrip().split("nmoe mon")[-1].count(
        "[completed]") == 1
    assert "loss 1.2345" in frames


def test_mon_without_database(tmp_path, capsys):
    assert mon_main([str(tmp_path / "nope"), "--once"]) == 1
    assert "no metrics database" in capsys.readouterr().err


def _decode_braille(lines, label_w):
    """Set pixels ``{(x, y)}`` of a braille plot's area."""
    bit_pos = {0x01: (0, 0), 0x02: (0, 1), 0x04: (0, 2), 0x08: (1, 0), 0x10: (1, 1),
               0x20: (1, 2), 0x40: (0, 3), 0x80: (1, 3)}
    pixels = set()
    for r, line in enumerate(lines):
        for c, ch in enumerate(line[label_w + 2:]):
            code = ord(ch) - 0x2800
            if 0 < code < 256:
                pixels |= {(2 * c + dx, 4 * r + dy) for b, (dx, dy) in bit_pos.items()
                           if code & b}
    return pixels


def test_braille_plot_geometry(rng):
    height, width = 10, 70
    # Steps at least 20 apart: no two points share a pixel column (~8 steps a column here),
    # where the plot would average them.
    points = [(s, rng.uniform(-3, 7)) for s in sorted(rng.sample(range(0, 1000, 20), 30))]
    lines = braille_plot(points, [], width, height)
    assert len(lines) == height + 2
    label_w = lines[0].index("┤") - 1
    cols = len(lines[0]) - label_w - 2
    pixels = _decode_braille(lines[:height], label_w)
    xs, ys = [s for s, _ in points], [v for _, v in points]
    px_w, px_h = 2 * cols, 4 * height
    for s, v in points:  # every data point's own pixel is lit (independently computed)
        x = round((s - min(xs)) / (max(xs) - min(xs)) * (px_w - 1))
        y = round((max(ys) - v) / (max(ys) - min(ys)) * (px_h - 1))
        assert (x, y) in pixels, (rng.seed_value, s, v)
    # The line is connected: every pixel column between the first and last point is lit.
    assert {x for x, _ in pixels} == set(range(px_w)), rng.seed_value
    # y labels: the top row carries the maximum, the bottom row the minimum (4 sig. digits).
    assert float(lines[0][:label_w]) == pytest.approx(max(ys), rel=1e-3)
    assert float(lines[height - 1][:label_w]) == pytest.approx(min(ys), rel=1e-3)
    assert lines[-1].split() == [f"{min(xs):,}", f"{max(xs):,}"]


def test_sparkline_levels(rng):
    values = sorted(rng.uniform(0, 100) for _ in range(50))
    spark = sparkline(values, 25)
    assert len(spark) == 25 and spark[0] == "▁" and spark[-1] == "█"
    assert list(spark) == sorted(spark, key="▁▂▃▄▅▆▇█".index)  # monotone input stays monotone
    assert sparkline([1.0, float("nan"), 3.0], 3) == "▁ █"


def _polylines(svg):
    out = []
    for pts in re.findall(r'<polyline[^>]*points="([^"]*)"', svg):
        out.append([tuple(map(float, p.split(","))) for p in pts.split()])
    return out


def test_line_chart_geometry_and_nan_breaks(rng):
    steps = sorted(rng.sample(range(5000), 40))
    values = [rng.uniform(-1e3, 1e3) for _ in steps]
    values[17] = math.nan
    svg = line_chart("t", [("a", list(zip(steps, values, strict=True)))], width=600, height=300)
    segments = _polylines(svg)
    assert [len(s) for s in segments] == [17, 22], "NaN must split the line"
    coords = segments[0] + segments[1]
    kept = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
    (x0, y0), (x1, y1) = coords[0], coords[-1]
    (s0, v0), (s1, v1) = kept[0], kept[-1]
    vmin, vmax = min(v for _, v in kept), max(v for _, v in kept)
    ymin_px, ymax_px = max(y for _, y in coords), min(y for _, y in coords)
    for (x, y), (s, v) in zip(coords, kept, strict=True):
        # x is linear in step, y linear in value and inverted; coordinates are printed to 0.1 px.
        assert x - x0 == pytest.approx((s - s0) / (s1 - s0) * (x1 - x0), abs=0.15)
        assert ymin_px - y == pytest.approx((v - vmin) / (vmax - vmin) * (ymin_px - ymax_px),
                                            abs=0.15), rng.seed_value
    assert y1 != y0 or v1 == v0


def test_nice_ticks(rng):
    for _ in range(300):
        lo = rng.uniform(-1e4, 1e4) * 10 ** rng.randint(-6, 3)
        hi = lo + abs(lo) * rng.uniform(1e-3, 10) + 1e-9
        ticks = _nice_ticks(lo, hi)
        step = ticks[1] - ticks[0]
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert any(abs(mantissa - m) < 1e-6 for m in (1, 2, 5, 10)), (rng.seed_value, lo, hi)
        assert lo - 1e-9 * step <= ticks[0] < lo + step and hi - step < ticks[-1] <= hi + step
        assert 2 <= len(ticks) <= 12


def test_viz_writes_self_contained_html(tmp_path, rng, capsys):
    last, _ = _make_run(tmp_path, rng, layers=4)
    assert viz_main([str(tmp_path)]) == 0
    out_path = tmp_path / "report.html"
    assert capsys.readouterr().out.strip() == str(out_path)
    text = out_path.read_text()
    assert text.startswith("<!DOCTYPE html>") and RUN_ID in text
    # Loss, zoomed loss, components, tok/s, per GPU, ms/step, lr, grad norm, memory, MFU,
    # router cv and max/mean lines, and the final per-layer bar chart.
    assert text.count("<svg") == text.count("</svg>") == 13
    for title in ("Loss", "Tokens / s", "Learning rate", "Grad norm",
                  "Router cv of expert load, per layer", "Router cv per layer at step 300"):
        assert f">{title}</text>" in text
    assert "http" not in text and "src=" not in text and "href=" not in text
    assert "<script" not in text
    assert "fp-0123abcd" in text and "model.n_experts" in text and "stop_reason" in text
    for layer in ("01", "02", "03", "04"):
        assert f"<td>layer {layer}</td>" in text
    assert f"{last['router/layer_02/cv'][1]:.6g}" in text
    other = tmp_path / "sub" / "r.html"
    assert viz_main([str(tmp_path / "metrics.db"), "--out", str(other)]) == 0
    assert other.read_text().count("<svg") == 13


def test_viz_without_run(tmp_path, capsys):
    assert viz_main([str(tmp_path)]) == 1
    assert "no metrics database" in capsys.readouterr().err
