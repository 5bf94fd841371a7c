"""nmoe-kernels test setup: every test draws fresh random inputs and prints its seed.

pytest shows a failing test's captured stdout, so the printed seed reproduces the failure:
``torch.manual_seed(<seed>)`` before the test body.
"""

from __future__ import annotations

import importlib
import pathlib
import sys

import pytest
import torch

BENCH_DIR = pathlib.Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(autouse=True)
def torch_seed() -> int:
    seed = torch.seed()
    print(f"torch seed: {seed} (reproduce with torch.manual_seed({seed}))")
    return seed


@pytest.fixture(scope="session")
def load_bench():
    """``load_bench(name)`` imports the bench script ``bench/<name>.py`` as module ``name``, its
    sibling imports resolved from ``bench/`` as when it runs there (CPU tests of bench code)."""

    def load(name: str):
        sys.path.insert(0, str(BENCH_DIR))
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(BENCH_DIR))

    return load
