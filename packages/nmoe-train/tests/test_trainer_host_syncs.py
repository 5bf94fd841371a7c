"""The training step's hot path reads nothing back from the device per dispatch: the local
dispatcher the trainer builds skips the expert-id range check (ids come from the router's top-k,
in range by construction), and the step's statistics still count every routed row. Gradient
norm and clipping read nothing either: the step's one host read is its statistics tensor."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import nmoe_comm.local
import nmoe_core.optim
import nmoe_train.distributed
from nmoe_train.config import resolve_config
from nmoe_train.testing import SMALL
from nmoe_train.trainer import Trainer

# Tensor methods that read a value back to the host (a synchronisation on a GPU).
_HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def test_train_step_does_not_check_expert_ids_per_dispatch(tmp_path, monkeypatch):
    cfg = resolve_config("tiny", [*SMALL, "data.synthetic=true", "checkpoints=false",
                                  "resume=false", "val_every=0", "steps=2",
                                  f"runs_root={tmp_path}", "run_name=syncs"])
    trainer = Trainer(cfg, quiet=True)
    calls = []

    def fail(*args, **kwargs):
        calls.append(args)
        raise AssertionError("check_expert_id_range ran on the training hot path")

    monkeypatch.setattr(nmoe_comm.local, "check_expert_id_range", fail)
    stats = trainer.train_step()
    assert not calls
    # The loads still count every routed slot: T * K per layer (global batch x seq_len x top-k).
    tokens = cfg.global_batch * cfg.seq_len
    top_k = cfg.model.moe.n_activated_experts
    num_moe = len(trainer.model.moe_layers())
    assert num_moe >= 1
    # max_load / mean * mean = the busiest expert's rows; mean = T * K / E for every layer.
    mean = tokens * top_k / cfg.model.moe.n_routed_experts
    for layer in range(num_moe):
        busiest = stats[f"router/layer_{layer:02d}/max_load"] * mean
        assert busiest == pytest.approx(round(busiest), abs=1e-6)
        assert mean <= busiest <= tokens


@pytest.mark.parametrize(("name", "device", "world", "local", "want"), [
    ("auto", "cuda", 4, 4, "ipc"),      # one node of GPUs: CUDA IPC
    ("auto", "cuda", 16, 8, "nccl"),    # several nodes
    ("auto", "cpu", 2, 2, "nccl"),      # CPU ranks: nccl backend over gloo
    ("nvshmem", "cuda", 4, 4, "nvshmem"),
    ("nccl", "cuda", 4, 4, "nccl"),
])
def test_auto_dispatcher_is_ipc_inside_one_gpu_node(name, device, world, local, want):
    from nmoe_train.trainer import resolve_dispatcher

    assert resolve_dispatcher(name, torch.device(device), world, local) == want


def test_train_step_reads_the_device_once_with_clipping(tmp_path, monkeypatch):
    """With clipping on, `train_step` and the optimizer wrappers / nmoe-core optimizers it calls
    make no host read of their own (no ``.item()``, no ``if tensor``) except the single ``.cpu()``
    of the step's statistics (on CPU, where nothing synchronises, this counts the calls a GPU
    would wait on). torch's own optimizer internals are not ours and are not counted."""
    cfg = resolve_config("tiny", [*SMALL, "data.synthetic=true", "checkpoints=false",
                                  "resume=false", "val_every=0", "steps=2", "optim.grad_clip=0.05",
                                  f"runs_root={tmp_path}", "run_name=clip_syncs"])
    trainer = Trainer(cfg, quiet=True)
    ours = {Path(nmoe_train.distributed.__file__).resolve(),
            *(p.resolve() for p in Path(nmoe_core.optim.__file__).parent.glob("*.py"))}
    step_code = Trainer.train_step.__code__
    reads: list[tuple[str, str]] = []

    def counting(name, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code is step_code or Path(caller.f_code.co_filename).resolve() in ours:
                reads.append((name, f"{caller.f_code.co_name}:{caller.f_lineno}"))
            return original(self, *args, **kwargs)
        return read

    for name in _HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    stats = trainer.train_step()
    monkeypatch.undo()
    assert stats["train/grad_norm"] > cfg.optim.grad_clip  # the step did clip
    device_reads = [(name, where) for name, where in reads if name != "tolist"]
    # tolist() runs on the statistics once they are on the host; .cpu() is the one read.
    assert [name for name, _ in device_reads] == ["cpu"], device_reads


def test_moe_layers_share_one_dispatcher(tmp_path):
    # One dispatcher (and, for ipc / nvshmem, one set of capacity-sized peer buffers) for all MoE
    # layers; the expert-parallel CPU test in test_trainer.py trains through a shared nccl one.
    cfg = resolve_config("tiny", [*SMALL, "data.synthetic=true", "checkpoints=false",
                                  "resume=false", "val_every=0", "steps=1",
                                  f"runs_root={tmp_path}", "run_name=shared",
                                  "model.n_layers=3"])
    trainer = Trainer(cfg, quiet=True)
    layers = trainer.model.moe_layers()
    assert len(layers) >= 2
    assert len({id(layer.dispatcher) for layer in layers}) == 1
    assert layers[0].dispatcher.capacity == trainer.capacity
    trainer.train_step()  # every layer's dispatch and combine, forward and backward, through it
