"""Repository-wide pytest setup: GPU markers skip with a reason where the hardware is missing."""

from __future__ import annotations

import pytest


def _cuda_device_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config, items):
    count = _cuda_device_count()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (marker `gpu`); none is visible here")
    skip_multi = pytest.mark.skip(
        reason=f"needs 2 or more CUDA GPUs (marker `multigpu`); {count} visible here"
    )
    for item in items:
        if "multigpu" in item.keywords and count < 2:
            item.add_marker(skip_multi)
        elif "gpu" in item.keywords and count < 1:
            item.add_marker(skip_gpu)
