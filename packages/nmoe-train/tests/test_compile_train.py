"""`compile=true`: the trainer compiles the model's regions, says so at start-up, and its steps
track the eager trainer's (same seed, same batches) on the CPU."""

from __future__ import annotations

import math

import torch

from nmoe_train.config import resolve_config
from nmoe_train.testing import SMALL
from nmoe_train.trainer import Trainer


def _trainer(tmp_path, name: str, compile_: bool) -> Trainer:
    cfg = resolve_config("tiny", [*SMALL, "data.synthetic=true", "checkpoints=false",
                                  "resume=false", "val_every=0", "steps=3",
                                  f"runs_root={tmp_path}", f"run_name={name}",
                                  f"compile={str(compile_).lower()}"])
    return Trainer(cfg, quiet=True)


def test_compiled_training_tracks_eager(tmp_path):
    torch._dynamo.reset()
    eager, compiled = _trainer(tmp_path, "eager", False), _trainer(tmp_path, "compiled", True)
    assert eager.compiled_regions == []
    assert "compile: off (eager)" in eager.startup_report()
    n = len(compiled.compiled_regions)
    assert n >= compiled.cfg.model.n_layers  # an attention half per block at least
    assert f"compile: {n} regions (attention halves, MLPs, routers)" in compiled.startup_report()
    assert eager.fingerprint == compiled.fingerprint  # execution, not arithmetic: resumable
    for step in range(3):
        a, b = eager.train_step(), compiled.train_step()
        # Same batches and weights; the fused regions round a few float32 operations differently,
        # so the losses agree to float32 noise amplified by 3 optimizer steps.
        assert math.isclose(a["train/loss"], b["train/loss"], rel_tol=1e-4), (step, a, b)
