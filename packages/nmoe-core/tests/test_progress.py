"""Progress bar: exact log lines under a fake clock, redraw throttling, the bar's eighth-block fill,
and the duration / count formatters checked by parsing their output back."""

from __future__ import annotations

import io
import random
import re
import time

import pytest

from nmoe_core.progress import Progress, format_count, format_duration


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def _parse_duration(text: str) -> int:
    m = re.fullmatch(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    assert m and text, text
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def test_format_duration_parses_back():
    seed = time.time_ns()
    rng = random.Random(seed)
    for _ in range(500):
        seconds = rng.choice([rng.uniform(0, 60), rng.uniform(0, 7200), rng.uniform(0, 86400)])
        text = format_duration(seconds)
        assert _parse_duration(text) == round(seconds), (seed, seconds, text)
    # Beyond a day the seconds and minutes are dropped: exact to the hour.
    for _ in range(100):
        seconds = rng.uniform(86400, 30 * 86400)
        text = format_duration(seconds)
        assert abs(_parse_duration(text) - round(seconds)) < 3600, (seed, seconds, text)
    assert [format_duration(s) for s in (0, 17, 125, 3723, 2 * 86400 + 3 * 3600 + 59)] == \
        ["0s", "17s", "2m05s", "1h02m03s", "2d03h"]
    assert format_duration(float("nan")) == "?" and format_duration(-1) == "?"


def test_format_count_parses_back_within_rounding():
    seed = time.time_ns()
    rng = random.Random(seed)
    scale = {"": 1, "k": 1e3, "M": 1e6, "B": 1e9, "T": 1e12, "P": 1e15}
    for _ in range(2000):
        n = 10 ** rng.uniform(-2, 16) * rng.choice([1, -1])
        text = format_count(n)
        m = re.fullmatch(r"(-?[\d.]+(?:e[-+]\d+)?)([kMBTP]?)", text)
        assert m, (seed, n, text)
        value = float(m.group(1)) * scale[m.group(2)]
        # Two or three significant digits: relative error at most half a unit in the 2nd digit.
        assert abs(value - n) <= 0.05 * abs(n) + 1e-12, (seed, n, text)
        if abs(n) >= 1000:
            assert len(m.group(1).lstrip("-").replace(".", "")) <= 3, (seed, n, text)
    assert [format_count(x) for x in (0, 999, 3412, 1_234_567, 999_999, 1.2e9, 3.14)] == \
        ["0", "999", "3.4k", "1.2M", "1.0M", "1.2B", "3.14"]


def test_non_tty_logs_every_20_intervals_and_at_end():
    clock, out = FakeClock(), io.StringIO()
    with Progress(100, "train", unit="step", stream=out, min_interval=0.5, clock=clock) as bar:
        assert not bar.is_tty
        for i in range(100):
            clock.now += 1.0
            bar.update(1, loss=4.0 - i / 100)
    lines = out.getvalue().splitlines()
    # One line every 10 s of fake time (at 10, 20, ..., 100 s) plus the final line at close.
    assert len(lines) == 11, lines
    assert lines[0] == "train: 10/100 step (10%), 1.0 step/s, eta 1m30s, loss=3.91"
    assert lines[-1] == "train: 100/100 step (100%), 1.0 step/s, eta 0s, loss=3.01"
    bar.close()  # idempotent
    assert len(out.getvalue().splitlines()) == 11


def test_non_tty_unknown_total():
    clock, out = FakeClock(), io.StringIO()
    bar = Progress(None, "scan", unit="doc", stream=out, min_interval=0.1, clock=clock)
    clock.now += 4.0
    bar.update(10)
    assert out.getvalue() == "scan: 10 doc, 2.5 doc/s, elapsed 4s\n"
    bar.close()


def test_initial_count_is_not_in_the_rate():
    clock, out = FakeClock(), io.StringIO()
    bar = Progress(1000, "train", stream=out, min_interval=0.5, initial=600, clock=clock)
    clock.now += 20.0
    bar.update(40)  # resumed at 600: 40 steps in 20 s, 360 to go
    assert out.getvalue() == "train: 640/1000 it (64%), 2.0 it/s, eta 3m00s\n"
    bar.close()


def test_tty_bar_fill_and_throttle():
    clock, out = FakeClock(), io.StringIO()
    bar = Progress(1000, "desc", stream=out, min_interval=0.5, clock=clock, is_tty=True)
    clock.now += 12.0
    bar.update(420, loss=3.2)
    first = out.getvalue()
    assert first.startswith("\r") and first.endswith("\x1b[K")
    clock.now += 0.1  # within min_interval: no redraw
    bar.update(1)
    assert out.getvalue() == first
    clock.now += 0.5
    bar.update(0)
    assert out.getvalue() != first
    # A 10-cell bar at 42% is 4 full cells and 2/10*8 = 1.6 -> 1 eighth: '▏'.
    bar.count = 420
    clock.now = 1012.0
    line = bar.bar_line(width=10 + len("desc  42% ") + 2 + len(" 420/1000 it  [00:12<00:17, "
                                                                  "35.0 it/s] loss=3.2"))
    assert line == "desc  42% |████▏     | 420/1000 it  [00:12<00:17, 35.0 it/s] loss=3.2", line
    bar.close()
    assert out.getvalue().endswith("\n")


def test_tty_write_keeps_bar():
    clock, out = FakeClock(), io.StringIO()
    bar = Progress(10, "x", stream=out, clock=clock, is_tty=True)
    clock.now += 1
    bar.update(5)
    bar.write("hello")
    text = out.getvalue()
    assert "\r\x1b[Khello\n" in text and text.rstrip().endswith("\x1b[K")
    bar.close()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="total"):
        Progress(-1, "x")
    with pytest.raises(ValueError, match="min_interval"):
        Progress(1, "x", min_interval=0)
    bar = Progress(1, "x", stream=io.StringIO())
    with pytest.raises(ValueError, match="n must be"):
        bar.update(-2)
    bar.close()
    with pytest.raises(RuntimeError, match="closed"):
        bar.update(1)
