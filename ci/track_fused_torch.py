"""Diagnose the fused-vs-torch tracking test (nmoe-train/tests/test_fused_training_gpu.py): the
small config for 200 steps, validation every 25, on the torch backend, the fused backend, and the
fused backend with its expert weight gradient rounded to bf16 first (as torch's autograd gives
it). Prints every validation point and the relative gaps. GPU only; a diagnostic, not a test."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from nmoe_core import fused
from nmoe_train.config import resolve_config
from nmoe_train.data import ensure_builtin_dataset
from nmoe_train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages/nmoe-train/tests"))
from test_fused_training_gpu import SMALL_GPU  # noqa: E402


def train(root: Path, data: Path, backend: str, name: str, extra=()):
    cfg = resolve_config("tiny", [*SMALL_GPU, f"model.moe.backend={backend}", "steps=200",
                                  "val_every=25", f"runs_root={root}", f"run_name={name}",
                                  f"data.data_root={data}", "target_loss=null", *extra])
    trainer = Trainer(cfg, quiet=True)
    trainer.run()
    return dict(trainer.val_history)


def main() -> None:
    root = Path(tempfile.mkdtemp())
    data = root / "data"
    ensure_builtin_dataset("shakespeare", data, "gpt2", progress=False)
    runs = {"torch": train(root, data, "torch", "torch"),
            "fused": train(root, data, "fused", "fused")}
    plain = fused.HopperExpertKernels.wgrad

    def bf16_wgrad(self, x_RK, dy_RN, offsets_E1):
        return self.k.grouped_gemm_bf16_wgrad(x_RK, dy_RN, offsets_E1).float()

    fused.HopperExpertKernels.wgrad = bf16_wgrad
    try:
        runs["fused_bf16_wgrad"] = train(root, data, "fused", "fused_bf16_wgrad")
    finally:
        fused.HopperExpertKernels.wgrad = plain
    runs["fused_again"] = train(root, data, "fused", "fused_again")
    runs["torch_seed2"] = train(root, data, "torch", "torch_seed2", ("seed=2",))
    runs["fused_seed2"] = train(root, data, "fused", "fused_seed2", ("seed=2",))
    steps = sorted(runs["torch"])
    print("step " + " ".join(f"{k:>17}" for k in runs))
    for s in steps:
        cells = []
        for k, vals in runs.items():
            base = runs["torch_seed2" if "seed2" in k else "torch"][s]
            cells.append(f"{vals[s]:>8.4f} ({(vals[s] / base - 1) * 100:+5.2f}%)")
        print(f"{s:>4} " + " ".join(cells), flush=True)
    print(torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
