"""Repository-wide pytest setup: GPU markers skip with a reason where the hardware is missing."""

from __future__ import annotations

import os
import tempfile

import pytest

# CuTeDSL writes kept artifacts (.ptx) into its dump directory, by default the working directory
# at import: point it at a temporary directory so tests never litter the repository.
os.environ.setdefault("CUTE_DSL_DUMP_DIR", os.path.join(tempfile.gettempdir(), "nmoe-cute-dump"))
os.makedirs(os.environ["CUTE_DSL_DUMP_DIR"], exist_ok=True)


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
