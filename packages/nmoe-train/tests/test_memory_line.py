"""The start-up line's static memory per rank: weights, gradients and optimizer state, known
before the first step and equal to what the step then allocates."""

from __future__ import annotations

import re

import pytest

from nmoe_train.config import resolve_config
from nmoe_train.testing import SMALL
from nmoe_train.trainer import Trainer

GIB = 2**30


def _state_bytes(trainer) -> int:
    opts = trainer.optimizer.inner
    return sum(v.numel() * v.element_size() for o in opts.optimizers.values()
               for st in o.state.values() for k, v in st.items() if k != "step")


@pytest.mark.parametrize("moments", ["float32", "bfloat16"])
def test_memory_line_matches_what_the_first_step_allocates(tmp_path, moments):
    cfg = resolve_config("tiny", [*SMALL, "data.synthetic=true", "checkpoints=false",
                                  "resume=false", "val_every=0", "steps=1",
                                  f"runs_root={tmp_path}", f"run_name=mem-{moments}",
                                  f"optim.adamw_state_dtype={moments}"])
    trainer = Trainer(cfg, quiet=True)
    line = trainer.memory_line()
    assert line in trainer.startup_report()
    found = re.search(r"weights ([\d.]+) GiB \+ grads ([\d.]+) \+ optimizer state ([\d.]+) "
                      rf"\(AdamW moments {moments}\) = ([\d.]+) GiB", line)
    assert found, line
    weights, grads, state, total = (float(x) for x in found.groups())
    params = [p for p in trainer.model.parameters()]
    assert weights == round(sum(p.numel() * 4 for p in params) / GIB, 2)
    assert grads == weights  # float32 gradients of float32 parameters, all trainable
    planned = sum(trainer.optimizer.state_bytes().values())
    assert state == round(planned / GIB, 2)
    assert abs(total - (weights + grads + state)) <= 0.011
    # The local dispatcher keeps nothing between calls; ipc / nvshmem would add their buffers.
    assert [d.persistent_bytes for d in trainer.dispatchers()] == [0]
    assert "dispatcher buffers" not in line
    trainer.train_step()
    assert _state_bytes(trainer) == planned
    opts = trainer.optimizer.inner
    adamw_numel = sum(p.numel() for g in opts.adamw.param_groups for p in g["params"])
    muon_numel = sum(p.numel() for g in opts.muon.param_groups for p in g["params"])
    per_moment = 4 if moments == "float32" else 2
    assert planned == 2 * per_moment * adamw_numel + 4 * muon_numel


@pytest.mark.parametrize("fused", [False, True])
def test_cached_expert_copies_are_reported_where_they_take_effect(tmp_path, monkeypatch, fused):
    """``cache_expert_weights`` adds the bf16 expert copies (2 bytes per expert parameter) to the
    memory line and says so at start-up only where the fused BF16 path runs (the backend is
    forced here: the CPU runs the torch path, which has no cast to keep)."""
    if fused:
        monkeypatch.setattr("nmoe_train.trainer.resolve_backend",
                            lambda *args: ("fused", "forced by the test"))
    cfg = resolve_config("tiny", [*SMALL, "data.synthetic=true", "checkpoints=false",
                                  "resume=false", "val_every=0", "steps=1", "precision=bf16-mixed",
                                  "cache_expert_weights=true", f"runs_root={tmp_path}",
                                  f"run_name=cache-{fused}"])
    trainer = Trainer(cfg, quiet=True)
    experts = sum(p.numel() for _, p in trainer.model.param_kinds()["expert"])
    copies = (f"+ bf16 expert weight copies {2 * experts / GIB:.2f} GiB kept across steps, "
              "refreshed by the optimizer")
    assert (copies in trainer.memory_line()) is fused
    report = "\n".join(trainer.startup_report())
    assert ("bf16 expert weights cached per step" in report) is fused
