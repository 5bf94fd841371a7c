"""What every nmoe-kernels bench script ends with: the device line under its table and the JSON
rows (imported by the sibling scripts, which run from this directory)."""

from __future__ import annotations

import json

import torch


def finish_report(rows: list[dict], json_path: str | None) -> None:
    """Print the GPU, torch and CUDA versions under the table; write ``rows`` to ``json_path``."""
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
