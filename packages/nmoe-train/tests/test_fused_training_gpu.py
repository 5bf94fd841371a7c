"""Training on the fused MoE path (GPU): bitwise reproducible, and tracking the torch path."""

from __future__ import annotations

import pytest
import torch

from nmoe_train.config import resolve_config
from nmoe_train.trainer import Trainer

pytestmark = pytest.mark.gpu

SMALL_GPU = ["model.dim=256", "model.attention.n_heads=4", "model.moe.n_routed_experts=32",
             "model.moe.n_activated_experts=4", "model.moe.moe_inter_dim=256", "seq_len=256",
             "global_batch=32", "checkpoints=false", "resume=false", "log_every=1000"]


def _train(tmp_path, data_root, backend: str, steps: int, val_every: int, name: str):
    cfg = resolve_config("tiny", [*SMALL_GPU, f"model.moe.backend={backend}", f"steps={steps}",
                                  f"val_every={val_every}", f"runs_root={tmp_path}",
                                  f"run_name={name}", f"data.data_root={data_root}",
                                  "target_loss=null"])
    trainer = Trainer(cfg, quiet=True)
    result = trainer.run()
    return result, trainer.val_history


def test_fused_training_is_bitwise_reproducible(tmp_path, data_root):
    first, _ = _train(tmp_path, data_root, "fused", 50, 0, "a")
    second, _ = _train(tmp_path, data_root, "fused", 50, 0, "b")
    assert first.losses == second.losses


@pytest.mark.slow
def test_fused_tracks_torch_within_one_percent(tmp_path, data_root):
    _, torch_val = _train(tmp_path, data_root, "torch", 200, 25, "torch")
    _, fused_val = _train(tmp_path, data_root, "fused", 200, 25, "fused")
    assert [s for s, _ in torch_val] == [s for s, _ in fused_val]
    for (step, want), (_, got) in zip(torch_val, fused_val, strict=True):
        assert abs(got - want) <= 0.01 * want, f"step {step}: fused {got:.4f} vs torch {want:.4f}"
    torch.cuda.empty_cache()
