"""bench/wgmma_probe.cu (the FP8 mainloop probe) compiles for sm_90a without register spills and
without ptxas serializing its wgmmas -- either would make its timings measure something else."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

PROBE = Path(__file__).resolve().parents[1] / "bench" / "wgmma_probe.cu"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_wgmma_probe_compiles_clean(tmp_path):
    done = subprocess.run(
        ["nvcc", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
         str(PROBE), "-o", str(tmp_path / "wgmma_probe")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    # C7513 / C7514: ptxas serialized every wgmma of a kernel (an in-flight accumulator or A
    # fragment touched by other instructions)
    assert not re.search(r"C751\d|serialized", report), report
    spills = re.findall(r"(\d+) bytes spill stores", report)
    assert spills and all(s == "0" for s in spills), report
    # one entry per probe variant: part 1's 18, part 2's 10 GEMM walks
    assert len(re.findall(r"Compiling entry function '_Z12probe_kernel", report)) == 28, report
