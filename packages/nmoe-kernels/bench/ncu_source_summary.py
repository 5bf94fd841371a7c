"""Summarise Nsight Compute's per-instruction warp-stall samples (the SASS source page as CSV).

    ncu -i report.ncu-rep --page source --csv --print-source sass > kernel.sass.csv
    python packages/nmoe-kernels/bench/ncu_source_summary.py kernel.sass.csv [--top 25]

Prints the share of all stall samples by opcode with each opcode's three largest stall reasons,
the share of each stall reason over the kernel, and the instructions with the most samples (with
their two largest reasons) followed by the instructions just before each of the top three, which
is where the register or barrier they wait for usually comes from. `ci/gpu.sh ncu-fp8-source`
writes such CSV files for the FP8 grouped GEMM.
"""

from __future__ import annotations

import argparse
import collections
import csv
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def _opcode(source: str) -> str:
    words = source.split()
    if not words:
        return "?"
    word = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return word.split(".")[0]


def load(path: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of an ncu source-page CSV (its first line names the kernel)."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    start = next((i for i, row in enumerate(rows) if SAMPLES in row), None)
    if start is None:
        raise SystemExit(f"{path}: no '{SAMPLES}' column; export with --page source --csv")
    return rows[start], [row for row in rows[start + 1:] if len(row) == len(rows[start])]


def summarise(header: list[str], rows: list[list[str]], top: int) -> str:
    col = {name: i for i, name in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    total = sum(_number(r[col[SAMPLES]]) for r in rows) or 1.0
    by_op: collections.Counter = collections.Counter()
    by_op_reason: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_reason: collections.Counter = collections.Counter()
    for r in rows:
        op = _opcode(r[col["Source"]])
        by_op[op] += _number(r[col[SAMPLES]])
        for reason in reasons:
            value = _number(r[col[reason]])
            by_op_reason[op][reason] += value
            by_reason[reason] += value
    pct = lambda v: f"{100 * v / total:5.1f}%"  # noqa: E731
    out = [f"{len(rows)} instructions, {int(total)} stall samples", "", "by opcode:"]
    for op, value in by_op.most_common(top):
        tops = ", ".join(f"{k[6:]} {pct(v).strip()}" for k, v in by_op_reason[op].most_common(3))
        out.append(f"  {op:12s} {pct(value)}   {tops}")
    out += ["", "by reason: " + ", ".join(f"{k[6:]} {pct(v).strip()}"
                                          for k, v in by_reason.most_common(10)), "",
            "instructions with the most samples:"]
    order = sorted(range(len(rows)), key=lambda i: -_number(rows[i][col[SAMPLES]]))
    for i in order[:top]:
        r = rows[i]
        two = sorted(((_number(r[col[k]]), k[6:]) for k in reasons), reverse=True)[:2]
        why = ", ".join(f"{name} {pct(v).strip()}" for v, name in two if v)
        out.append(f"  {r[col['Address']][-6:]} {pct(_number(r[col[SAMPLES]]))} "
                   f"{r[col['Source']].strip()[:64]:64s} {why}")
    for i in order[:3]:
        out += ["", f"before {rows[i][col['Address']][-6:]}:"]
        for r in rows[max(0, i - 12):i + 1]:
            out.append(f"  {r[col['Address']][-6:]} {pct(_number(r[col[SAMPLES]]))} "
                       f"{r[col['Source']].strip()[:80]}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    header, rows = load(args.csv)
    print(summarise(header, rows, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
