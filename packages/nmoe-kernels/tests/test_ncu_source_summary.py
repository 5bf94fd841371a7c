"""bench/ncu_source_summary.py: the per-opcode and per-reason shares of an ncu source-page CSV."""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import ncu_source_summary  # noqa: E402

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)",
          "Warp Stall Sampling (Not-issued Samples)", "stall_long_sb", "stall_wait",
          "stall_long_sb (Not Issued)"]


def _write(path: Path, rows) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Kernel Name", "kernel_x"])
        writer.writerow(HEADER)
        for row in rows:
            writer.writerow(row)


def test_shares_by_opcode_reason_and_instruction(tmp_path):
    # Random sample counts: FMUL's share is its samples over the total, whatever they are.
    rng = random.Random()
    fmul, bra, ffma = (rng.randint(2, 10_000) for _ in range(3))
    _write(tmp_path / "k.csv", [
        ["0x10", "LDG.E R1, desc[UR4][R2.64]", "0", "0", "0", "0", "0"],
        ["0x20", "FMUL R3, R1, R5", str(fmul), "0", str(fmul), "0", "0"],
        ["0x30", "@!P0  BRA 0x40", str(bra), "0", str(bra - 1), "1", "0"],
        ["0x40", "FFMA R6, R3, R7, R6", str(ffma), "0", "0", str(ffma), "0"],
    ])
    header, rows = ncu_source_summary.load(str(tmp_path / "k.csv"))
    text = ncu_source_summary.summarise(header, rows, top=5)
    total = fmul + bra + ffma
    assert text.splitlines()[0] == f"4 instructions, {total} stall samples"
    share = f"{100 * fmul / total:5.1f}%"
    assert f"  FMUL         {share}   long_sb {share.strip()}" in text
    assert "  BRA " in text  # the predicate guard is skipped for the opcode
    reasons = next(line for line in text.splitlines() if line.startswith("by reason: "))
    assert f"long_sb {100 * (fmul + bra - 1) / total:.1f}%" in reasons
    assert f"wait {100 * (1 + ffma) / total:.1f}%" in reasons
    # the instruction before the top one is listed under "before <address>"
    first = max((fmul, "0x20"), (bra, "0x30"), (ffma, "0x40"))[1]
    assert f"before {first}:" in text


def test_rejects_a_csv_without_stall_samples(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="no 'Warp Stall Sampling"):
        ncu_source_summary.load(str(tmp_path / "bad.csv"))
