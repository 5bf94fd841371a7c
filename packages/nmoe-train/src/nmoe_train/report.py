"""``n viz RUN_DIR [--out FILE]``: a self-contained HTML report of a training run.

Reads ``RUN_DIR/metrics.db`` and writes one HTML file (default ``RUN_DIR/report.html``) with no
network access and no JavaScript: every chart is an SVG generated here. Sections:

- the run (id, name, status, host, world size, times, config fingerprint) and its latest numbers;
- loss (train and validation; full run and zoomed past the first 10% of steps), loss components,
  tokens/s, ms/step, learning rate per parameter group, grad norm, memory, MFU;
- router load balance: cv and max/mean load per MoE layer over the run, and the final cv per layer
  as bars, with a per-layer table (cv, max/mean, dead experts, bias range);
- the config and the results as tables, and the final value of every metric.

Each series is read averaged over at most ``--max-points`` step ranges, so reports of long runs
stay small.
"""

from __future__ import annotations

import argparse
import html
import math
import sqlite3
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nmoe_core.progress import format_count, format_duration
from nmoe_train.metrics import latest_values, read_run, read_series, resolve_db_path
from nmoe_train.monitor import ROUTER_KEY

__all__ = ["RunNotFoundError", "bar_chart", "line_chart", "render_report", "viz_main"]

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]

Series = Sequence[tuple[int, float]]


class RunNotFoundError(LookupError):
    """The database holds no such run (or no run yet)."""

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1180px;
       color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.sub { color: #666; margin-top: 0; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.chart { border: 1px solid #e4e4e4; border-radius: 6px; background: #fff; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
td, th { border: 1px solid #e0e0e0; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.status-running { color: #2ca02c; } .status-failed { color: #d62728; }
"""


# -- numbers ------------------------------------------------------------------------------------


def _nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k apart) covering [lo, hi]."""
    span = hi - lo
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return ticks


def _tick_label(v: float, step: float) -> str:
    if abs(v) >= 1e4:
        return format_count(v)
    if step < 1e-3:
        return f"{v:.1e}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{v:.{decimals}f}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e7):
            return f"{v:.4e}"
        return f"{v:.6g}"
    return str(v)


# -- SVG charts -----------------------------------------------------------------------------------


def line_chart(
    title: str,
    series: Sequence[tuple[str, Series]],
    width: int = 560,
    height: int = 300,
    markers: Sequence[str] = (),
    y_from: float | None = None,
    x_from: int | None = None,
) -> str:
    """An SVG line chart (one polyline per series; NaN breaks the line).

    Args:
        title: shown above the plot.
        series: ``[(label, [(step, value), ...]), ...]``; empty series are left out.
        width, height: SVG size in px.
        markers: labels of series drawn with a circle at every point (sparse series such as
            validation loss).
        y_from: force the y axis to start here (e.g. 0 for rates).
        x_from: plot only points with step >= this (a zoomed view).
    """
    series = [(label, [(s, v) for s, v in pts if x_from is None or s >= x_from])
              for label, pts in series]
    series = [(label, pts) for label, pts in series if pts]
    finite = [(s, v) for _, pts in series for s, v in pts if math.isfinite(v)]
    left, right, top, bottom = 64, 16, 30, 40
    pw, ph = width - left - right, height - top - bottom
    # The legend goes in the title row, right-aligned, when it fits there; else in a grid below
    # the plot. Widths are estimated from character counts (11px text: ~6.5px a character).
    entry_w = [24 + 6.5 * len(label) for label, _ in series]
    title_w = left + 8.5 * len(title)
    in_title_row = title_w + sum(entry_w) <= width - right
    cell_w = max(entry_w, default=0)
    per_row = max(int(pw // cell_w), 1) if cell_w else 1
    legend_rows = 0 if in_title_row else math.ceil(len(series) / per_row)
    height += 16 * legend_rows
    parts = [f'<svg class="chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img">',
             f'<text x="{left}" y="18" font-size="14" font-weight="600">{html.escape(title)}'
             "</text>"]
    if not finite:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" '
                     'fill="#999">no data</text></svg>')
        return "".join(parts)
    xs, ys = [s for s, _ in finite], [v for _, v in finite]
    xlo, xhi = min(xs), max(xs)
    ylo, yhi = (min(ys) if y_from is None else min(y_from, min(ys))), max(ys)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    if yhi - ylo <= 1e-12 * max(1.0, abs(yhi)):
        ylo, yhi = ylo - 0.5 * max(abs(ylo), 1e-3), yhi + 0.5 * max(abs(yhi), 1e-3)
    pad = (yhi - ylo) * 0.04
    ylo, yhi = ylo - (pad if y_from is None else 0), yhi + pad

    def X(s: float) -> float:
        return left + (s - xlo) / (xhi - xlo) * pw

    def Y(v: float) -> float:
        return top + (yhi - v) / (yhi - ylo) * ph

    yt = _nice_ticks(ylo, yhi)
    ystep = yt[1] - yt[0] if len(yt) > 1 else (yhi - ylo)
    for t in yt:
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" '
                     'stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{Y(t) + 4:.1f}" font-size="11" text-anchor="end" '
                     f'fill="#555">{_tick_label(t, ystep)}</text>')
    xt = _nice_ticks(xlo, xhi, target=6)
    xstep = xt[1] - xt[0] if len(xt) > 1 else 1
    for t in xt:
        parts.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{top}" y2="{top + ph}" '
                     'stroke="#f3f3f3"/>'
                     f'<text x="{X(t):.1f}" y="{top + ph + 16}" font-size="11" '
                     f'text-anchor="middle" fill="#555">{_tick_label(t, max(xstep, 1))}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" '
                 'stroke="#bbb"/>'
                 f'<text x="{left + pw / 2}" y="{top + ph + bottom - 6}" font-size="11" '
                 'text-anchor="middle" fill="#555">step</text>')
    for i, (label, pts) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        dash = ("", ' stroke-dasharray="6,3"', ' stroke-dasharray="2,2"')[i // len(PALETTE) % 3]
        segment: list[str] = []
        segments = [segment]
        for s, v in pts:
            if math.isfinite(v):
                segment.append(f"{X(s):.1f},{Y(v):.1f}")
            elif segment:
                segment = []
                segments.append(segment)
        for seg in segments:
            if len(seg) > 1:
                parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6"{dash} '
                             f'points="{" ".join(seg)}"/>')
        if label in markers or len(pts) == 1:
            parts += [f'<circle cx="{X(s):.1f}" cy="{Y(v):.1f}" r="2.6" fill="{color}"/>'
                      for s, v in pts if math.isfinite(v)]
        if in_title_row:
            lx, ly = width - right - sum(entry_w[i:]) + 10, 18
        else:
            lx = left + (i % per_row) * cell_w
            ly = top + ph + bottom + 12 + 16 * (i // per_row)
        parts.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" '
                     f'fill="{color}"/><text x="{lx + 14}" y="{ly}" font-size="11" '
                     f'fill="#333">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(title: str, labels: Sequence[str], values: Sequence[float], width: int = 560,
              height: int = 300) -> str:
    """An SVG bar chart of ``values`` (one bar per label, value printed above each bar)."""
    left, right, top, bottom = 64, 16, 30, 48
    pw, ph = width - left - right, height - top - bottom
    parts = [f'<svg class="chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img">',
             f'<text x="{left}" y="18" font-size="14" font-weight="600">{html.escape(title)}'
             "</text>"]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" '
                     'fill="#999">no data</text></svg>')
        return "".join(parts)
    vmax = max(max(finite), 0.0) or 1.0
    ticks = _nice_ticks(0.0, vmax * 1.08)
    top_v = ticks[-1] if ticks[-1] >= vmax else vmax * 1.08
    tstep = ticks[1] - ticks[0] if len(ticks) > 1 else top_v
    for t in ticks:
        y = top + ph - t / top_v * ph
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="#eee"/><text x="{left - 6}" y="{y + 4:.1f}" font-size="11" '
                     f'text-anchor="end" fill="#555">{_tick_label(t, tstep)}</text>')
    n = len(values)
    slot = pw / n
    bar_w = max(slot * 0.7, 1.0)
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        x = left + i * slot + (slot - bar_w) / 2
        if math.isfinite(v):
            h = max(v, 0.0) / top_v * ph
            parts.append(f'<rect x="{x:.1f}" y="{top + ph - h:.1f}" width="{bar_w:.1f}" '
                         f'height="{h:.1f}" fill="{PALETTE[0]}"/>')
            if n <= 32:
                parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{top + ph - h - 3:.1f}" '
                             f'font-size="10" text-anchor="middle">{v:.3g}</text>')
        if n <= 32 or i % math.ceil(n / 32) == 0:
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{top + ph + 14}" font-size="10" '
                         f'text-anchor="middle" fill="#555">{html.escape(label)}</text>')
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" '
                 'stroke="#999"/></svg>')
    return "".join(parts)


# -- tables ---------------------------------------------------------------------------------------


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, Mapping):
        if not obj:
            return [(prefix, "{}")] if prefix else []
        rows = []
        for k, v in obj.items():
            rows += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    return [(prefix, obj)]


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="num"' if isinstance(v, int | float) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{html.escape(_fmt(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


# -- the report -----------------------------------------------------------------------------------


def _router_layers(keys: Sequence[str]) -> list[str]:
    layers = {m.group(1) for k in keys if (m := ROUTER_KEY.fullmatch(k))}
    return sorted(layers, key=lambda x: (0, int(x)) if x.isdigit() else (1, x))


def render_report(db: str | Path, run_id: str | None = None, max_points: int = 1500) -> str:
    """The HTML report of one run (the most recently started one by default).

    Raises:
        FileNotFoundError: no database at ``db``.
        RunNotFoundError: no such run.
    """
    run = read_run(db, run_id)
    if run is None:
        raise RunNotFoundError(f"no run {run_id!r} in {db}" if run_id else f"no run in {db} yet")
    rid = run["run_id"]
    series = read_series(db, rid, max_points=max_points)
    latest = latest_values(db, rid)

    def s(key: str) -> Series:
        return series.get(key, [])

    charts: list[str] = []
    last_step = max((e[0] for e in latest.values()), default=0)
    charts.append(line_chart("Loss", [("train", s("train/loss")), ("val", s("val/loss"))],
                             markers=("val",)))
    charts.append(line_chart("Loss (after the first 10% of steps)",
                             [("train", s("train/loss")), ("val", s("val/loss"))],
                             markers=("val",), x_from=last_step // 10))
    components = [(k.split("/")[1], s(k)) for k in
                  ("train/lm_loss", "train/mtp_loss", "train/aux_loss") if k in series]
    if components:
        charts.append(line_chart("Loss components", components))
    charts.append(line_chart("Tokens / s", [("all ranks", s("throughput/tokens_per_s"))],
                             y_from=0.0))
    if "throughput/tokens_per_s_per_gpu" in series:
        charts.append(line_chart("Tokens / s per GPU",
                                 [("per GPU", s("throughput/tokens_per_s_per_gpu"))], y_from=0.0))
    if "throughput/ms_per_step" in series:
        charts.append(line_chart("ms / step", [("ms/step", s("throughput/ms_per_step"))],
                                 y_from=0.0))
    lr_keys = sorted(k for k in series if k.startswith("lr/"))
    charts.append(line_chart("Learning rate", [(k[3:], s(k)) for k in lr_keys], y_from=0.0))
    charts.append(line_chart("Grad norm", [("grad norm", s("train/grad_norm"))]))
    for key, title in (("memory/peak_gib", "Peak memory (GiB)"), ("efficiency/mfu", "MFU")):
        if key in series:
            charts.append(line_chart(title, [(key.split("/")[1], s(key))], y_from=0.0))

    layers = _router_layers(list(latest))
    router_html = ""
    if layers:
        router_charts = [
            line_chart("Router cv of expert load, per layer",
                       [(f"layer {li}", s(f"router/layer_{li}/cv")) for li in layers],
                       y_from=0.0),
            line_chart("Router max / mean expert load, per layer",
                       [(f"layer {li}", s(f"router/layer_{li}/max_load")) for li in layers]),
            bar_chart(f"Router cv per layer at step {last_step:,}", layers,
                      [latest.get(f"router/layer_{li}/cv", (0, math.nan))[1] for li in layers]),
        ]
        rows = [[f"layer {li}"] + [latest.get(f"router/layer_{li}/{stat}", (0, math.nan))[1]
                                   for stat in ("cv", "max_load", "dead", "bias_range")]
                for li in layers]
        router_html = ("<h2>Router load balance</h2><div class=\"charts\">" +
                       "".join(router_charts) + "</div>" +
                       _table(rows, ["layer", "cv", "max / mean", "dead experts", "bias range"]))

    status = run["status"] or "?"
    status_cls = "status-running" if status == "running" else \
        "status-failed" if status.startswith("failed") else ""
    end = run["ended_at"] or time.time()
    started = run["started_at"]
    info = [
        ["run id", rid], ["name", run["name"]], ["status", status], ["host", run["host"]],
        ["world size", run["world_size"]],
        ["started (UTC)", time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started))
         if started else "?"],
        ["ended (UTC)", time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(run["ended_at"]))
         if run["ended_at"] else "-"],
        ["elapsed", format_duration(end - started) if started else "?"],
        ["config fingerprint", run["fingerprint"] or "-"], ["last step", last_step],
    ]
    headline = [[k, v] for k, (_, v) in latest.items()
                if k in ("train/loss", "val/loss", "tokens_seen", "throughput/tokens_per_s",
                         "efficiency/mfu", "memory/peak_gib")]
    title = f"nmoe run {rid}"
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="sub">{html.escape(run["name"] or "")} &middot; '
        f'<span class="{status_cls}">{html.escape(status)}</span> &middot; '
        f"report written {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}</p>",
        '<div class="charts"><div>', _table(info), "</div><div>",
        _table(headline, ["metric", "latest"]), "</div></div>",
        "<h2>Training</h2>", '<div class="charts">', *charts, "</div>",
        router_html,
        "<h2>Results</h2>",
        _table(_flatten(run["results"]), ["key", "value"]) if run["results"]
        else "<p>none recorded (the run has not finished)</p>",
        "<h2>Config</h2>", _table(_flatten(run["config"]), ["key", "value"]),
        "<h2>All metrics (final values)</h2>",
        _table([[k, st, v] for k, (st, v) in latest.items()], ["metric", "step", "value"]),
        "</body></html>",
    ]
    return "\n".join(body) + "\n"


def viz_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``n viz``; prints the path written and returns the exit code."""
    p = argparse.ArgumentParser(prog="n viz", description="Write a self-contained HTML report "
                                "of a training run (reads RUN_DIR/metrics.db).")
    p.add_argument("run_dir", help="the run directory (or its metrics.db file)")
    p.add_argument("--out", default=None, help="output file (default RUN_DIR/report.html)")
    p.add_argument("--run", default=None, help="run id (default: the latest started)")
    p.add_argument("--max-points", type=int, default=1500,
                   help="points per series at most (longer series are averaged)")
    args = p.parse_args(argv)
    db = resolve_db_path(args.run_dir)
    try:
        text = render_report(db, args.run, max_points=max(args.max_points, 2))
    except (FileNotFoundError, RunNotFoundError) as e:
        print(f"n viz: {e}", file=sys.stderr)
        return 1
    except sqlite3.DatabaseError as e:
        print(f"n viz: cannot read {db} ({e}); pass a run directory or the metrics.db that "
              "`n train` writes in it", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else db.parent / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    print(out)
    return 0
