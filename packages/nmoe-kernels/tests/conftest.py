"""nmoe-kernels test setup: every test draws fresh random inputs and prints its seed.

pytest shows a failing test's captured stdout, so the printed seed reproduces the failure:
``torch.manual_seed(<seed>)`` before the test body.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def torch_seed() -> int:
    seed = torch.seed()
    print(f"torch seed: {seed} (reproduce with torch.manual_seed({seed}))")
    return seed
