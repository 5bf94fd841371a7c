"""Fixtures for the nmoe-comm tests: a fresh random generator per test, its seed reported.

Every test draws its inputs from the ``gen`` fixture. The seed is new each run (printed with any
failure); set ``NMOE_TEST_SEED=<seed>`` to replay a failing run.
"""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    seed = int(os.environ.get("NMOE_TEST_SEED", "0")) or int.from_bytes(os.urandom(6), "little")
    print(f"random seed {seed} (replay with NMOE_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)
