"""``n mon RUN_DIR``: a live terminal view of a training run, read from ``RUN_DIR/metrics.db``.

Redraws every ``--interval`` seconds (default 2) until the run's status is no longer ``running``
(after one last draw) or Ctrl-C:

- a header: run id and name, status, step, tokens, elapsed time, tokens/s, ms/step, MFU, memory,
  the latest losses and grad norm, the learning rate of each parameter group;
- the loss: train as a braille line, validation as dots, with y-axis labels, sized to the
  terminal;
- a tokens/s sparkline;
- the router load balance per MoE layer: coefficient of variation of per-expert load, max/mean
  load, dead experts, bias range, and a strip of the layer's cv over the run (shade = cv).

``--once`` draws one frame and exits (scripts, tests, logs). Pure standard library: ANSI escape
codes for clearing and colour on a terminal (none when ``NO_COLOR`` is set or output is piped).
The database is opened read-only, so a running trainer is never disturbed.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sqlite3
import sys
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nmoe_core.progress import format_count, format_duration
from nmoe_train.metrics import (
    connect_readonly,
    latest_values,
    read_run,
    read_series,
    resolve_db_path,
)

__all__ = ["Snapshot", "load_snapshot", "mon_main", "render"]

ROUTER_KEY = re.compile(r"router/layer_(\w+?)/(cv|max_load|dead|bias_range)")
_SPARK = "▁▂▃▄▅▆▇█"
_SHADES = " ░▒▓█"
_BRAILLE_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # [row][col] in a cell

_CYAN, _YELLOW, _GREEN, _RED, _DIM, _BOLD, _RESET = (
    "\x1b[36m", "\x1b[33m", "\x1b[32m", "\x1b[31m", "\x1b[2m", "\x1b[1m", "\x1b[0m")


# -- data -------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """Everything one frame shows, read from the database at time ``now``."""

    run: dict[str, Any]
    latest: dict[str, tuple[int, float]]
    loss: list[tuple[int, float]]
    val_loss: list[tuple[int, float]]
    tokens_per_s: list[tuple[int, float]]
    router_cv: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    last_write: float | None = None
    now: float = 0.0


def load_snapshot(db: Path, run_id: str | None = None, max_points: int = 400) -> Snapshot | None:
    """Read one frame's data; None when the database holds no run (yet).

    Args:
        db: the metrics database file.
        run_id: the run to show; default the most recently started one.
        max_points: cap on the points read per series (averaged over step ranges beyond it).
    """
    run = read_run(db, run_id)
    if run is None:
        return None
    rid = run["run_id"]
    series = read_series(db, rid, keys=["train/loss", "val/loss", "throughput/tokens_per_s",
                                        "router/layer_*/cv"], max_points=max_points)
    with closing(connect_readonly(db)) as conn:
        row = conn.execute("SELECT wall_time FROM metrics WHERE run_id = ? AND key = ? "
                           "ORDER BY step DESC LIMIT 1", (rid, "train/loss")).fetchone()
    router_cv = {}
    for key, points in series.items():
        m = ROUTER_KEY.fullmatch(key)
        if m and m.group(2) == "cv":
            router_cv[m.group(1)] = points
    return Snapshot(
        run=run,
        latest=latest_values(db, rid),
        loss=series.get("train/loss", []),
        val_loss=series.get("val/loss", []),
        tokens_per_s=series.get("throughput/tokens_per_s", []),
        router_cv=router_cv,
        last_write=row[0] if row else None,
        now=time.time(),
    )


# -- text drawing -----------------------------------------------------------------------------


def _paint(text: str, code: str, color: bool) -> str:
    return f"{code}{text}{_RESET}" if color and text.strip() else text


def _num(v: float, digits: int = 4) -> str:
    """A compact number for labels: 4 significant digits, or engineering form when tiny/huge."""
    if not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
        return f"{v:.2e}"
    return f"{v:.{digits}g}"


def _finite(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(s, v) for s, v in points if math.isfinite(v)]


def sparkline(values: Sequence[float], width: int) -> str:
    """``values`` resampled to ``width`` cells of ``▁..█`` (min to max; NaN gives a space)."""
    if width < 1 or not values:
        return ""
    cells = []
    n = len(values)
    for i in range(min(width, n)):
        chunk = [v for v in values[i * n // min(width, n):(i + 1) * n // min(width, n)]
                 if math.isfinite(v)]
        cells.append(sum(chunk) / len(chunk) if chunk else math.nan)
    finite = [v for v in cells if math.isfinite(v)]
    if not finite:
        return " " * len(cells)
    lo, hi = min(finite), max(finite)
    span = hi - lo
    out = []
    for v in cells:
        if not math.isfinite(v):
            out.append(" ")
        else:
            out.append(_SPARK[int((v - lo) / span * (len(_SPARK) - 1) + 0.5) if span else 3])
    return "".join(out)


def braille_plot(
    line: Sequence[tuple[int, float]],
    dots: Sequence[tuple[int, float]],
    width: int,
    height: int,
    color: bool = False,
) -> list[str]:
    """A line chart in braille with a y axis: ``line`` drawn as a connected braille curve,
    ``dots`` as ``•`` markers (e.g. train and validation loss).

    Args:
        line, dots: ``[(step, value), ...]`` sorted by step; non-finite values are skipped.
        width: total columns including the y-axis labels (>= 20).
        height: rows of plot area (>= 3); two more rows hold the x axis.
        color: ANSI colours (line cyan, dots yellow).

    Returns:
        ``height + 2`` lines of text.
    """
    line, dots = _finite(line), _finite(dots)
    values = [v for _, v in line + dots]
    steps = [s for s, _ in line + dots]
    if not values:
        return ["(no data yet)"]
    ylo, yhi = min(values), max(values)
    if yhi - ylo < 1e-12 * max(1.0, abs(yhi)):
        ylo, yhi = ylo - 0.5, yhi + 0.5
    xlo, xhi = min(steps), max(steps)
    px_h = height * 4
    # Label the top row (its top dot is yhi), the bottom row (its bottom dot is ylo) and every
    # 5th row between them (at the row's centre).
    label_rows = {r: yhi - (yhi - ylo) * (4 * r + 1.5) / (px_h - 1)
                  for r in range(5, height - 2, 5)}
    label_rows.update({0: yhi, height - 1: ylo})
    label_w = max(len(_num(v)) for v in label_rows.values()) + 1
    cols = max(width - label_w - 2, 8)
    px_w = cols * 2

    def px(step: float) -> int:
        return 0 if xhi == xlo else round((step - xlo) / (xhi - xlo) * (px_w - 1))

    def py(v: float) -> int:
        return round((yhi - v) / (yhi - ylo) * (px_h - 1))

    # Average the line's points per pixel column, then join neighbouring columns.
    sums: dict[int, list[float]] = {}
    for s, v in line:
        acc = sums.setdefault(px(s), [0.0, 0])
        acc[0] += v
        acc[1] += 1
    columns = sorted((x, py(a[0] / a[1])) for x, a in sums.items())
    bits = [[0] * cols for _ in range(height)]

    def dot(x: int, y: int) -> None:
        bits[y // 4][x // 2] |= _BRAILLE_BITS[y % 4][x % 2]

    for i, (x, y) in enumerate(columns):
        dot(x, y)
        if i + 1 == len(columns):
            break
        x2, y2 = columns[i + 1]
        prev = y
        for xi in range(x + 1, x2 + 1):  # linear interpolation, each column's gap filled
            yi = round(y + (y2 - y) * (xi - x) / (x2 - x))
            for yy in range(min(prev, yi), max(prev, yi) + 1):
                dot(xi, yy)
            prev = yi
    markers = {(py(v) // 4, px(s) // 2) for s, v in dots}
    out = []
    for r in range(height):
        label = _num(label_rows[r]) if r in label_rows else ""
        runs: list[tuple[str, list[str]]] = []  # (colour, chars): one escape code per run
        for c in range(cols):
            if (r, c) in markers:
                code, ch = _YELLOW, "•"
            elif bits[r][c]:
                code, ch = _CYAN, chr(0x2800 + bits[r][c])
            else:
                code, ch = "", " "
            if runs and runs[-1][0] == code:
                runs[-1][1].append(ch)
            else:
                runs.append((code, [ch]))
        body = "".join(_paint("".join(chars), code, color and bool(code)) for code, chars in runs)
        out.append(f"{label:>{label_w}} ┤" + body)
    out.append(" " * label_w + " └" + "─" * cols)
    left, right = f"{xlo:,}", f"{xhi:,}"
    out.append(" " * (label_w + 2) + left + right.rjust(max(cols - len(left), len(right) + 1)))
    return out


# -- the frame --------------------------------------------------------------------------------


def _value(snap: Snapshot, key: str) -> float | None:
    entry = snap.latest.get(key)
    return entry[1] if entry else None


def _header(snap: Snapshot, width: int, color: bool) -> list[str]:
    run, get = snap.run, lambda k: _value(snap, k)
    status = run["status"] or "?"
    status_text = _paint(status, _GREEN if status == "running" else
                         _RED if status.startswith("failed") else _BOLD, color)
    end = snap.now if status == "running" else (run["ended_at"] or snap.now)
    elapsed = format_duration(end - run["started_at"]) if run["started_at"] else "?"
    line1 = f"nmoe mon  {run['run_id']}  ({run['name']})  [{status_text}]  host {run['host']}" \
            f"  world {run['world_size']}"
    if snap.last_write is not None and status == "running":
        line1 += f"  last write {format_duration(max(snap.now - snap.last_write, 0))} ago"
    steps = [e[0] for k, e in snap.latest.items()]
    step = max(steps) if steps else 0
    parts = [f"step {step:,}"]
    if (tokens := get("tokens_seen")) is not None:
        parts.append(f"tokens {format_count(tokens)}")
    parts.append(f"elapsed {elapsed}")
    if (tps := get("throughput/tokens_per_s")) is not None:
        per_gpu = get("throughput/tokens_per_s_per_gpu")
        parts.append(f"tok/s {format_count(tps)}" +
                     (f" ({format_count(per_gpu)}/gpu)" if per_gpu is not None else ""))
    if (ms := get("throughput/ms_per_step")) is not None:
        parts.append(f"ms/step {ms:.0f}")
    if (mfu := get("efficiency/mfu")) is not None:
        parts.append(f"mfu {100 * mfu:.1f}%")
    if (mem := get("memory/peak_gib")) is not None:
        parts.append(f"mem {mem:.1f} GiB")
    losses = []
    if (loss := get("train/loss")) is not None:
        losses.append(f"loss {loss:.4f}")
        comps = [f"{name} {v:.4f}" for name in ("lm", "mtp", "aux")
                 if (v := get(f"train/{name}_loss")) is not None]
        if comps:
            losses[-1] += " (" + "  ".join(comps) + ")"
    if (val := snap.latest.get("val/loss")) is not None:
        losses.append(f"val {val[1]:.4f} @{val[0]:,}")
    if (gn := get("train/grad_norm")) is not None:
        losses.append(f"grad norm {gn:.3f}")
    lrs = [f"{g} {v:.2e}" for g in ("dense", "expert", "router", "muon")
           if (v := get(f"lr/{g}")) is not None]
    lines = [line1, "   ".join(parts)]
    if losses:
        lines.append("   ".join(losses))
    if lrs:
        lines.append("lr " + "  ".join(lrs))
    if run["status"] != "running" and run["results"]:
        results = "  ".join(f"{k}={_num(v) if isinstance(v, float) else v}"
                            for k, v in run["results"].items())
        lines.append(f"results {results}")
    return [ln if len(ln) <= width or color else ln[:width] for ln in lines]


def _layer_sort_key(layer: str) -> tuple[int, int | str]:
    return (0, int(layer)) if layer.isdigit() else (1, layer)


def _router_table(snap: Snapshot, width: int, max_rows: int, color: bool) -> list[str]:
    layers: dict[str, dict[str, float]] = {}
    for key, (_, v) in snap.latest.items():
        m = ROUTER_KEY.fullmatch(key)
        if m:
            layers.setdefault(m.group(1), {})[m.group(2)] = v
    if not layers:
        return []
    order = sorted(layers, key=_layer_sort_key)
    hidden = 0
    if len(order) > max_rows:  # show the least balanced layers
        worst = sorted(order, key=lambda k: -layers[k].get("cv", 0.0))[:max_rows]
        hidden = len(order) - len(worst)
        order = sorted(worst, key=_layer_sort_key)
    head = f"{'router':<10}{'cv':>8}{'max/mean':>10}{'dead':>6}{'bias range':>12}  "
    strip_w = max(width - len(head), 0)
    all_cv = [v for pts in snap.router_cv.values() for _, v in pts if math.isfinite(v)]
    cv_max = max(all_cv) if all_cv else 0.0
    lines = [head + ("cv over the run (shade: 0 to " + _num(cv_max, 3) + ")")[:strip_w]]

    def cell(v: float | None, fmt: str, w: int) -> str:
        return f"{'-':>{w}}" if v is None or not math.isfinite(v) else f"{v:>{w}{fmt}}"

    for layer in order:
        stats = layers[layer]
        dead = stats.get("dead")
        row = (f"{'layer ' + layer:<10}{cell(stats.get('cv'), '.3f', 8)}"
               f"{cell(stats.get('max_load'), '.2f', 10)}{cell(dead, '.0f', 6)}"
               f"{cell(stats.get('bias_range'), '.4f', 12)}  ")
        if color and dead:
            row = row.replace(f"{dead:>6.0f}", _paint(f"{dead:>6.0f}", _RED, True), 1)
        strip = ""
        points = snap.router_cv.get(layer, [])
        if strip_w and points and cv_max > 0:
            values = [v for _, v in points]
            n = len(values)
            for i in range(min(strip_w, n)):
                chunk = [v for v in values[i * n // min(strip_w, n):
                                           (i + 1) * n // min(strip_w, n)] if math.isfinite(v)]
                level = sum(chunk) / len(chunk) / cv_max if chunk else 0.0
                # (0, 1/4) -> '░', [1/4, 1/2) -> '▒', ...; only exactly 0 (or no data) is blank
                strip += _SHADES[1 + min(int(level * 4), 3)] if level > 0 else " "
        lines.append(row + strip)
    if hidden:
        lines.append(f"(+{hidden} better-balanced layers not shown; widen the terminal)")
    return lines


def render(snap: Snapshot, width: int = 100, height: int = 40, color: bool = False) -> str:
    """One frame of ``n mon`` as text, fitted to ``width`` x ``height``."""
    header = _header(snap, width, color)
    n_layers = len({m.group(1) for k in snap.latest if (m := ROUTER_KEY.fullmatch(k))})
    router_rows = min(n_layers, max(height // 3, 4)) + (1 if n_layers else 0)
    tps = [v for _, v in snap.tokens_per_s]
    fixed = len(header) + 1 + 1 + 2 + (2 if tps else 0) + (router_rows + 1 if n_layers else 0)
    plot_h = max(min(height - fixed, 20), 4)
    legend = "loss  " + _paint("⠒⠒ train", _CYAN, color) + "  " + _paint("• val", _YELLOW, color)
    lines = [*header, "", legend]
    lines += braille_plot(snap.loss, snap.val_loss, width, plot_h, color)
    if tps:
        label = "tok/s "
        tail = f"  last {format_count(tps[-1])}  min {format_count(min(tps))}  " \
               f"max {format_count(max(tps))}"
        spark = sparkline(tps, max(width - len(label) - len(tail), 5))
        lines += ["", label + _paint(spark, _GREEN, color) + tail]
    if n_layers:
        lines.append("")
        lines += _router_table(snap, width, max(router_rows - 1, 1), color)
    return "\n".join(lines)


# -- the command ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="n mon", description="Live terminal view of a training run "
                                "(reads RUN_DIR/metrics.db).")
    p.add_argument("run_dir", help="the run directory (or its metrics.db file)")
    p.add_argument("--once", action="store_true", help="draw one frame and exit")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between redraws (>0)")
    p.add_argument("--run", default=None, help="run id to show (default: the latest started)")
    p.add_argument("--width", type=int, default=None, help="columns (default: the terminal's)")
    p.add_argument("--height", type=int, default=None, help="rows (default: the terminal's)")
    p.add_argument("--no-color", action="store_true", help="no ANSI colours")
    return p


def mon_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``n mon``; returns the exit code (0, or 1 when there is nothing to show)."""
    args = _parser().parse_args(argv)
    if not args.interval > 0:
        print(f"n mon: --interval must be > 0 seconds, got {args.interval}", file=sys.stderr)
        return 2
    out = sys.stdout
    tty = out.isatty()
    color = tty and not args.no_color and "NO_COLOR" not in os.environ
    db = resolve_db_path(args.run_dir)

    def size() -> tuple[int, int]:
        cols, rows = shutil.get_terminal_size((100, 40))
        return args.width or cols, args.height or rows - 1

    def frame() -> tuple[str | None, str | None]:
        try:
            snap = load_snapshot(db, args.run)
        except FileNotFoundError as e:
            return None, str(e)
        except sqlite3.DatabaseError as e:  # e.g. the writer holds a lock for too long
            return None, f"cannot read {db} ({e})" + ("" if args.once else "; retrying")
        if snap is None:
            return None, f"no run in {db} yet" if args.run is None else \
                f"no run {args.run!r} in {db}"
        width, height = size()
        return render(snap, width, height, color), snap.run["status"]

    if args.once:
        text, status = frame()
        if text is None:
            print(f"n mon: {status}", file=sys.stderr)
            return 1
        out.write(text + "\n")
        return 0
    if tty:
        out.write("\x1b[?25l")  # hide the cursor while redrawing
    try:
        while True:
            text, status = frame()
            shown = text if text is not None else f"n mon: {status} (waiting)"
            if tty:
                out.write("\x1b[H" + shown.replace("\n", "\x1b[K\n") + "\x1b[K\x1b[J")
            else:
                out.write(shown + "\n\n")
            out.flush()
            if text is not None and status != "running":
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        if tty:
            out.write("\x1b[?25h\n")
            out.flush()
