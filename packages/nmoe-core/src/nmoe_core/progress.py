"""A dependency-free progress bar shared by nmoe's long-running commands (train, eval, data prep).

`Progress` draws a one-line bar that is redrawn in place when its stream is a terminal:

    train  42% |████▌     | 420/1000 it  [00:12<00:17, 35.1 it/s] loss=3.2

and, when the stream is not a terminal (logs, CI, ``nohup``), writes a plain line at most every
``min_interval * 20`` seconds and one at the end:

    train: 420/1000 it (42%), 35.1 it/s, eta 17s

The rate is the average since the bar was created (items done since then / elapsed), so it and
the ETA are exact for steady work and never jump around. `format_duration` and `format_count` are
the human formatting helpers used here and by ``n mon`` / ``n viz``.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["Progress", "format_count", "format_duration"]

_PARTIAL_BLOCKS = " ▏▎▍▌▋▊▉"  # index i = i/8 of a cell filled
_FULL_BLOCK = "█"


def format_duration(seconds: float) -> str:
    """A short human duration: ``"17s"``, ``"2m05s"``, ``"1h02m03s"``, ``"2d03h"``.

    Args:
        seconds: a non-negative duration; fractions are rounded to whole seconds. NaN, infinite
            and negative values give ``"?"``.
    """
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m{s:02d}s"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"


def format_count(n: float) -> str:
    """A count with an SI suffix and two or three significant digits: ``999``, ``3.4k``,
    ``12.3M``, ``1.2B``, ``4.5T``.

    Args:
        n: any real number (negative values keep their sign; NaN/inf are printed as Python does).
    """
    if not math.isfinite(n):
        return str(n)
    sign = "-" if n < 0 else ""
    a = abs(n)
    if a < 1000 and float(a).is_integer():
        return f"{sign}{int(a)}"
    if a < 999.5:
        return f"{sign}{a:.3g}"
    for suffix, scale in (("k", 1e3), ("M", 1e6), ("B", 1e9), ("T", 1e12)):
        v = a / scale
        if v < 99.95:
            return f"{sign}{v:.1f}{suffix}"
        if v < 999.5:
            return f"{sign}{v:.0f}{suffix}"
    return f"{sign}{a / 1e15:.1f}P"


def _clock(seconds: float) -> str:
    """``MM:SS`` or ``H:MM:SS`` for the bar's elapsed/remaining fields."""
    if not math.isfinite(seconds) or seconds < 0:
        return "??:??"
    s = int(round(seconds))
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    return f"{hours}:{minutes:02d}:{s:02d}" if hours else f"{minutes:02d}:{s:02d}"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _bar(fraction: float, width: int) -> str:
    """``width`` cells filled to ``fraction`` with eighth-block resolution."""
    fraction = min(max(fraction, 0.0), 1.0)
    eighths = int(fraction * width * 8)
    full, part = divmod(eighths, 8)
    text = _FULL_BLOCK * full
    if full < width:
        text += _PARTIAL_BLOCKS[part] + " " * (width - full - 1)
    return text


class Progress:
    """A progress bar (terminal) or periodic progress log lines (anything else).

    Use as a context manager, or call `close` yourself:

        with Progress(total=len(shards), desc="tokenize", unit="shard") as bar:
            for shard in shards:
                ...
                bar.update(1, docs=num_docs)

    Args:
        total: the count at which the work is done, or None when unknown (no percentage, bar or
            ETA is shown then). Must be >= 0.
        desc: what is being done; starts the line.
        unit: the name of one counted item (``"it"``, ``"tok"``, ``"step"``).
        stream: where to write; a terminal (``stream.isatty()``) gets the redrawn bar.
        min_interval: seconds between terminal redraws (> 0); non-terminal streams get a line at
            most every ``min_interval * 20`` seconds.
        initial: the count already done before this bar started (a resumed run's step); it is
            shown in the count but not in the rate.
        clock: a monotonic clock in seconds (tests pass a fake one).
        is_tty: overrides ``stream.isatty()``.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        stream: TextIO | None = None,
        min_interval: float = 0.5,
        *,
        initial: int = 0,
        clock: Callable[[], float] = time.monotonic,
        is_tty: bool | None = None,
    ) -> None:
        if total is not None and (not isinstance(total, int) or total < 0):
            raise ValueError(f"total must be a non-negative int or None, got {total!r}")
        if not isinstance(initial, int) or initial < 0:
            raise ValueError(f"initial must be a non-negative int, got {initial!r}")
        if not min_interval > 0:
            raise ValueError(f"min_interval must be > 0 seconds, got {min_interval!r}")
        self.total = total
        self.desc = desc
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        self.min_interval = float(min_interval)
        self.count = initial
        self.initial = initial
        self.postfix: dict[str, Any] = {}
        self._clock = clock
        if is_tty is None:
            isatty = getattr(self.stream, "isatty", None)
            is_tty = bool(isatty()) if callable(isatty) else False
        self.is_tty = is_tty
        self._start = clock()
        self._last_draw = -math.inf if is_tty else self._start
        self._drawn_width = 0
        self._closed = False

    # -- public API -----------------------------------------------------------------------------

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Add ``n`` to the count and replace the postfix values shown after the rate.

        Args:
            n: items completed since the last call (>= 0).
            **postfix: ``name=value`` pairs shown as ``name=value`` (floats with 4 significant
                digits); each call's pairs update the ones given before.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if self._closed:
            raise RuntimeError(f"Progress({self.desc!r}) is closed; create a new one")
        self.count += n
        self.postfix.update(postfix)
        now = self._clock()
        interval = self.min_interval if self.is_tty else self.min_interval * 20
        if now - self._last_draw >= interval:
            self._emit(now)

    def write(self, text: str) -> None:
        """Print a line of ``text`` above the bar without garbling it."""
        if self.is_tty and self._drawn_width:
            self.stream.write("\r\x1b[K")
        self.stream.write(text.rstrip("\n") + "\n")
        if self.is_tty and self._drawn_width and not self._closed:
            self._emit(self._clock())
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state (terminal: leave the bar and end its line). Idempotent."""
        if self._closed:
            return
        self._emit(self._clock())
        if self.is_tty:
            self.stream.write("\n")
            self.stream.flush()
        self._closed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- formatting -----------------------------------------------------------------------------

    def _rate(self, elapsed: float) -> float:
        return (self.count - self.initial) / elapsed if elapsed > 0 else math.nan

    def _postfix_text(self) -> str:
        return " ".join(f"{k}={_format_value(v)}" for k, v in self.postfix.items())

    def log_line(self, now: float | None = None) -> str:
        """The non-terminal line for the current state (e.g. ``desc: 420/1000 it (42%), ...``)."""
        now = self._clock() if now is None else now
        elapsed = now - self._start
        rate = self._rate(elapsed)
        rate_text = f"{rate:.1f} {self.unit}/s" if math.isfinite(rate) else f"? {self.unit}/s"
        if self.total is not None:
            pct = 100.0 * self.count / self.total if self.total else 100.0
            eta = (self.total - self.count) / rate if rate > 0 else math.nan
            text = (f"{self.desc}: {self.count}/{self.total} {self.unit} ({pct:.0f}%), "
                    f"{rate_text}, eta {format_duration(max(eta, 0.0))}")
        else:
            text = f"{self.desc}: {self.count} {self.unit}, {rate_text}, " \
                   f"elapsed {format_duration(elapsed)}"
        post = self._postfix_text()
        return f"{text}, {post}" if post else text

    def bar_line(self, width: int, now: float | None = None) -> str:
        """The terminal line for the current state, fitted to ``width`` columns."""
        now = self._clock() if now is None else now
        elapsed = now - self._start
        rate = self._rate(elapsed)
        rate_text = f"{rate:.1f} {self.unit}/s" if math.isfinite(rate) else f"? {self.unit}/s"
        post = self._postfix_text()
        tail_post = f" {post}" if post else ""
        if self.total is None:
            line = (f"{self.desc}  {self.count} {self.unit}  [{_clock(elapsed)}, {rate_text}]"
                    f"{tail_post}")
            return line[:width]
        fraction = self.count / self.total if self.total else 1.0
        eta = (self.total - self.count) / rate if rate > 0 else math.nan
        head = f"{self.desc} {100 * fraction:3.0f}% "
        tail = (f" {self.count}/{self.total} {self.unit}  "
                f"[{_clock(elapsed)}<{_clock(max(eta, 0.0))}, {rate_text}]{tail_post}")
        bar_width = width - len(head) - len(tail) - 2
        if bar_width < 5:  # too narrow for a bar: drop it rather than wrap the line
            return (head.rstrip() + tail)[:width]
        return f"{head}|{_bar(fraction, min(bar_width, 40))}|{tail}"

    def _emit(self, now: float) -> None:
        if self.is_tty:
            width = shutil.get_terminal_size((100, 24)).columns - 1
            line = self.bar_line(width, now)
            self.stream.write("\r" + line + "\x1b[K")
            self._drawn_width = len(line)
        else:
            self.stream.write(self.log_line(now) + "\n")
        self.stream.flush()
        self._last_draw = now
