"""The BF16 sweep's command-line helpers (CPU; no kernel runs): the cluster syntax, and loading
another kernel module (``--base-kernel``) so that the public ops compile from it."""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

import pytest

pytest.importorskip("cutlass", reason="needs nvidia-cutlass-dsl")

KERNEL = (pathlib.Path(__file__).resolve().parents[1] / "src" / "nmoe_kernels" / "cute"
          / "grouped_gemm_bf16.py")


@pytest.fixture(scope="module")
def sweep(load_bench):
    return load_bench("sweep_bf16_tiles")  # it imports its sibling bench modules


def test_cluster_syntax(sweep):
    assert sweep.parse_cluster("2x1") == (2, 1)
    assert sweep.parse_cluster("1x2") == (1, 2)
    for bad in ("3x1", "2", "x", "2x1x1", "ax1"):
        with pytest.raises(argparse.ArgumentTypeError, match="cluster must be"):
            sweep.parse_cluster(bad)


def test_base_kernel_compiles_from_its_own_file(sweep, tmp_path):
    """A copy of the kernel module loads under a name of its own, compiles through the wrapper
    the public ops call (one-CTA and default-BN keywords accepted, a cluster or a BN refused
    when the copy has no such keyword), and swaps in and out of sys.modules with `Config.run`."""
    copy = tmp_path / "grouped_gemm_bf16_base.py"
    shutil.copy(KERNEL, copy)
    base = sweep.load_base_kernel(str(copy))
    assert base.__name__ != sweep.kmod.__name__
    base.compile_kernel("fwd", 256, 512, "sm_90a", cluster=(1, 1))
    # A copy without the keyword: the wrapper drops the one-CTA default and refuses the rest.
    text = copy.read_text().replace(
        "    cluster: tuple[int, int] = (1, 1),\n    tile_n: int | None = None,\n):", "):", 1)
    text = text.replace("out_dtype=out_dtype, cluster=cluster)", "out_dtype=out_dtype)", 1)
    text = text.replace("(op, dim_k, dim_n, tile_n=tile_n, raster", "(op, dim_k, dim_n, raster", 1)
    assert "tile_n=tile_n" not in text and "cluster=cluster)" not in text
    old = tmp_path / "grouped_gemm_bf16_old.py"
    old.write_text(text)
    older = sweep.load_base_kernel(str(old))
    older.compile_kernel("fwd", 256, 512, "sm_90a", cluster=(1, 1), tile_n=None)
    with pytest.raises(ValueError, match="has no 'cluster'"):
        older.compile_kernel("fwd", 256, 512, "sm_90a", cluster=(2, 1))
    with pytest.raises(ValueError, match="has no 'tile_n'"):
        older.compile_kernel("wgrad", 256, 768, "sm_90a", tile_n=192)
    seen = []
    config = sweep.Config(256, "n", (1, 1), base)
    config.run(lambda: seen.append(sys.modules[sweep.kmod.__name__]))
    assert seen == [base] and sys.modules[sweep.kmod.__name__] is sweep.kmod
