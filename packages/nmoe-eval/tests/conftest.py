"""Shared fixtures: a fresh seed per test (printed on failure), a tiny gpt2-vocab model, and a
writer of checkpoints in nmoe-train's layout (nmoe-train itself is never imported)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nmoe_core.config import AttentionConfig, ModelConfig, MoEConfig
from nmoe_core.model import Transformer


@pytest.fixture
def seed():
    s = torch.seed() % (2**31)
    torch.manual_seed(s)
    return s


def tiny_config(vocab_size: int = 50304, **overrides) -> ModelConfig:
    """A 2-layer MoE small enough for CPU tests, with GPT-2's padded vocabulary."""
    base = dict(
        vocab_size=vocab_size, dim=32, n_layers=2, inter_dim=48,
        attention=AttentionConfig(kind="sdpa", local_kind="swa", global_every=2, local_window=8,
                                  n_heads=2, max_position_embeddings=512),
        moe=MoEConfig(n_routed_experts=4, n_activated_experts=2, n_shared_experts=1,
                      moe_inter_dim=16, n_dense_layers=1),
        tokenizer="gpt2", eos_token_id=50256,
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def tiny_model(seed):
    return Transformer(tiny_config(), seed=seed % 1000).eval()


def write_checkpoint(run_dir: Path, model: Transformer, world_size: int = 1, step: int = 7,
                     seq_len: int = 128) -> Path:
    """A finalised checkpoint of ``model`` as ``world_size`` expert-parallel ranks would write
    it (experts split along dim 0 when ``world_size > 1``), plus optimizer/rng extras."""
    step_dir = run_dir / "checkpoints" / f"step_{step:07d}"
    step_dir.mkdir(parents=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    expert = {k for k in state if ".experts." in k} if world_size > 1 else set()
    save_file({k: v for k, v in state.items() if k not in expert}, step_dir / "shared.safetensors")
    for rank in range(world_size):
        own = {}
        for k in expert:
            part = state[k].shape[0] // world_size
            own[k] = state[k][rank * part : (rank + 1) * part].clone()
        own["optimizer/adamw.state.0.exp_avg"] = torch.zeros(3)
        own["rng/cpu"] = torch.get_rng_state()
        save_file(own, step_dir / f"rank_{rank:05d}.safetensors")
        (step_dir / f"rank_{rank:05d}.json").write_text("{}")
    meta = {"step": step, "run_id": "test-run",
            "config": {"model": model.cfg.model_dump(mode="json"), "seq_len": seq_len}}
    (step_dir / "meta.json").write_text(json.dumps(meta))
    files = {}
    for path in sorted(step_dir.iterdir()):
        files[path.name] = {"size": path.stat().st_size,
                            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    manifest = {"format": "nmoe-checkpoint", "format_version": 1, "step": step,
                "world_size": world_size, "files": files}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    (run_dir / "checkpoints" / "latest").write_text(step_dir.name + "\n")
    return step_dir


@pytest.fixture
def make_config():
    return tiny_config


@pytest.fixture
def write_ckpt():
    return write_checkpoint
