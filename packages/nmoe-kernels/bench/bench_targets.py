"""Issue 4's targets, checked at the end of a bench run, with what bounds each op.

Every timed row can carry its floor (METHOD: the larger of its FLOPs over the card's measured
dense-GEMM rate and its fewest bytes -- each input read once, each output written once -- over
the card's measured copy bandwidth). Both ceilings are measured in the same run
(`measure_ceilings`): the rate of a large dense product through torch (cuBLAS) in the bench's
dtype, and a large device-to-device copy (bytes read plus bytes written). A row's ``of_floor``
is floor / time: how close it runs to what this card allows, and ``bound`` says which term sets
the floor ("compute" or "bytes").

`evaluate` turns rows into one verdict per target: the measured value, the target, met or missed
and by how much. The bench scripts print them under their tables and add them to the JSON.

The H100s here hold their 700 W power limit through any long dense GEMM: the SM clock falls from
1980 MHz to ~1300 MHz within a fraction of a second (`clock_probe.py`), so a dsv3-local-sized op
cannot run at the cool card's dense rate. `measure_ceilings` therefore also holds the dense
product for 1.5 s, and a missed compute-bound target reports the TFLOP/s it needs as a share of
that sustained rate.

Imported by the sibling scripts, which run from this directory; the functions but
`measure_ceilings` and `sustained_ms` need no GPU (CPU tests: tests/test_bench_targets.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Target:
    """``op`` at bench case ``case`` must reach ``threshold`` in ``metric`` ("ratio": the
    baseline's time over ours; "tflops")."""

    op: str
    case: str
    metric: str
    threshold: float

    def label(self) -> str:
        unit = "x baseline" if self.metric == "ratio" else " TFLOP/s"
        return f"{self.op} at {self.case} >= {self.threshold:g}{unit}"


FP8_TARGETS = (
    Target("w13_fp8", "super", "ratio", 3.0),
    Target("w13_fp8", "moonlight", "ratio", 1.3),
    Target("w13_fp8", "dsv3-local", "ratio", 1.3),
    Target("deepgemm_shape", "deepgemm K=7168", "tflops", 1150.0),
    Target("mlp_fwd_fp8", "moonlight", "ratio", 1.5),
    Target("mlp_fwd_fp8", "dsv3-local", "ratio", 1.5),
)

BF16_TARGETS = tuple(
    Target(op, case, "ratio", 1.2 if op == "mlp_fwd" else 1.0)
    for op in ("mlp_fwd", "dgrad_w13", "dgrad_w2", "wgrad_w13", "wgrad_w2")
    for case in ("super", "moonlight", "dsv3-local")
)


def floor_fields(flops: float, nbytes: float, ms: float, ceilings: dict | None) -> dict:
    """The row fields of an op of ``flops`` and ``nbytes`` timed at ``ms``: its byte count, and
    where ``ceilings`` were measured its floor, the bounding term and floor / time."""
    fields = dict(min_bytes=int(nbytes))
    if not ceilings:
        return fields
    compute_ms = flops / (ceilings["dense_tflops"] * 1e9)
    bytes_ms = nbytes / (ceilings["copy_gbs"] * 1e6)
    floor = max(compute_ms, bytes_ms)
    return dict(
        fields,
        floor_ms=floor,
        bound="compute" if compute_ms >= bytes_ms else "bytes",
        of_floor=floor / ms,
    )


def floor_column(row: dict) -> str:
    """A row's floor as a table cell: ``54% c`` is 54% of the floor set by compute (b: bytes)."""
    if "of_floor" not in row:
        return "n/a"
    return f"{100 * row['of_floor']:.0f}% {row['bound'][0]}"


def evaluate(rows: list[dict], targets, ceilings: dict | None = None) -> list[dict]:
    """One verdict per target from the rows (``op``, ``case``, ``ratio``, ``tflops`` and, where
    known, ``of_floor`` / ``bound``, ``baseline_tflops``): measured value, met, and the
    shortfall in percent of the target. A target whose row is absent (shape not run, op left
    out) is reported as such. For a missed target on a compute-bound row, with ``ceilings``
    holding the dense product's sustained rate: the TFLOP/s the target needs and that rate's
    share of the sustained dense rate (above 1: more than the vendor's dense GEMM holds)."""
    verdicts = []
    for t in targets:
        row = next((r for r in rows if r.get("op") == t.op and r.get("case") == t.case), None)
        value = None if row is None else row.get(t.metric)
        verdict = dict(target=t.label(), op=t.op, case=t.case, metric=t.metric,
                       threshold=t.threshold, value=value)
        if value is None:
            verdict.update(met=None, note="not measured in this run")
        else:
            met = value >= t.threshold
            verdict.update(met=met, shortfall_pct=0.0 if met else 100 * (1 - value / t.threshold))
            if row.get("of_floor") is not None:
                verdict.update(of_floor=row["of_floor"], bound=row["bound"])
            needed = needed_tflops(t, row)
            held = (ceilings or {}).get("dense_sustained_tflops")
            if not met and needed and held and row.get("bound") == "compute":
                verdict.update(needed_tflops=needed, needed_of_sustained=needed / held)
        verdicts.append(verdict)
    return verdicts


def needed_tflops(t: Target, row: dict) -> float | None:
    """The TFLOP/s at which ``row`` would meet ``t``: the threshold itself, or for a ratio the
    threshold times the baseline's TFLOP/s in the same run (None if that is not in the row)."""
    if t.metric == "tflops":
        return t.threshold
    base = row.get("baseline_tflops")
    return t.threshold * base if base else None


def format_verdict(v: dict) -> str:
    if v["met"] is None:
        return f"{v['target']}: {v['note']}"
    value = f"{v['value']:.2f}x" if v["metric"] == "ratio" else f"{v['value']:.0f} TFLOP/s"
    status = "MET" if v["met"] else f"MISSED by {v['shortfall_pct']:.1f}%"
    line = f"{v['target']}: {value} {status}"
    if "of_floor" in v:
        line += f" (runs at {100 * v['of_floor']:.0f}% of its {v['bound']} floor)"
    if "needed_tflops" in v:
        line += (f"; meeting it needs {v['needed_tflops']:.0f} TFLOP/s, "
                 f"{100 * v['needed_of_sustained']:.0f}% of the dense GEMM's sustained rate")
    return line


def print_verdicts(verdicts: list[dict], ceilings: dict | None) -> None:
    print("targets (issue 4):")
    if ceilings:
        print(f"  ceilings measured in this run: {ceilings['dense']} "
              f"{ceilings['dense_tflops']:.0f} TFLOP/s, device copy "
              f"{ceilings['copy_gbs']:.0f} GB/s (read + write)")
        if ceilings.get("dense_sustained_tflops"):
            print(f"  the same dense product held back to back for 1.5 s (second half): "
                  f"{ceilings['dense_sustained_tflops']:.0f} TFLOP/s (below the cool rate where "
                  "the card's power limit binds)")
    for v in verdicts:
        print("  " + format_verdict(v))


def _dense_product(dtype: str, size: int, device: str):
    """(what, callable) of one dense ``size``-cubed product in ``dtype`` through torch."""
    if dtype not in ("fp8", "bf16"):
        raise ValueError(f"measure_ceilings: dtype must be 'fp8' or 'bf16', got {dtype!r}")
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    if dtype == "bf16":
        return f"torch.mm bf16 {size}^3", lambda: torch.mm(a, b)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), device=device, dtype=torch.float32)
    return (f"torch._scaled_mm fp8 {size}^3",
            lambda: torch._scaled_mm(a8, b8.t(), one, one, out_dtype=torch.bfloat16))


def sustained_ms(fn, seconds: float, first_ms: float) -> float:
    """Median time of the second half of ``fn`` called back to back for about ``seconds``
    (``first_ms``: one call's time, to size the run). On a power-capped card (the H100s here:
    700 W, reached by every large FP8 GEMM within ~0.2 s, `bench/clock_probe.py`) the clock
    falls during such a run, so this is the rate a long op can hold, not the cool card's."""
    calls = max(20, int(seconds * 1e3 / max(first_ms, 1e-3)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(calls)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events[calls // 2:])
    return times[len(times) // 2]


def measure_ceilings(dtype: str, timer, size: int = 8192, copy_bytes: int = 1 << 30,
                     device: str = "cuda", sustain_s: float = 1.5) -> dict:
    """The card's two ceilings through torch on ``device``: the dense product of
    two ``size`` x ``size`` matrices in ``dtype`` ("fp8": `torch._scaled_mm` e4m3 with tensor
    scales, bf16 out; "bf16": `torch.mm`), and a copy of ``copy_bytes`` (read + write counted).
    ``timer(fn) -> ms`` is the bench's median timer. Random inputs, never zeros. Also the dense
    product's rate held over ``sustain_s`` seconds (`sustained_ms`; 0 skips it): what a
    compute-bound op as long as dsv3-local's can reach on a power-capped card."""
    what, product = _dense_product(dtype, size, device)
    dense_ms = timer(product)
    held_ms = sustained_ms(product, sustain_s, dense_ms) if sustain_s > 0 else None
    src = torch.randn(copy_bytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    return dict(
        dense=what,
        dense_tflops=2 * size**3 / dense_ms / 1e9,
        dense_sustained_tflops=2 * size**3 / held_ms / 1e9 if held_ms else None,
        copy_gbs=2 * copy_bytes / copy_ms / 1e6,
    )
