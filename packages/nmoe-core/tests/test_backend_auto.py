"""``moe.backend = "auto"`` (the default): which path `resolve_backend` picks and why, the FP8
recipe's error where auto falls back to torch, and that auto on CPU runs the torch path bitwise."""

from __future__ import annotations

import pytest
import torch

from nmoe_core import fused
from nmoe_core.config import AttentionConfig, ModelConfig, MoEConfig
from nmoe_core.moe import MoE, resolve_backend

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


def _cfg(backend: str, recipe: str = "bf16") -> ModelConfig:
    return ModelConfig(
        vocab_size=256, dim=64, n_layers=1, inter_dim=128, attention=AttentionConfig(n_heads=4),
        moe=MoEConfig(n_routed_experts=8, n_activated_experts=2, n_shared_experts=1,
                      moe_inter_dim=32, n_dense_layers=0, backend=backend, recipe=recipe),
        tokenizer="custom", eos_token_id=0,
    )


def test_default_is_auto_and_fp8_refuses_only_the_torch_backend():
    sizes = dict(n_routed_experts=8, n_activated_experts=2, moe_inter_dim=128)
    assert MoEConfig(**sizes).backend == "auto"
    assert MoEConfig(**sizes, recipe="fp8").backend == "auto"
    with pytest.raises(ValueError, match="moe.recipe='fp8' needs moe.backend='fused' or 'auto'"):
        MoEConfig(**sizes, backend="torch", recipe="fp8")


def test_explicit_backends_are_taken_as_given():
    for name in ("torch", "fused"):
        assert resolve_backend(name, CPU, torch.float32, 7, 3) == (name, "configured")


def test_auto_falls_back_to_torch_and_says_why(monkeypatch):
    backend, why = resolve_backend("auto", CPU, torch.bfloat16, 64, 32)
    assert backend == "torch" and "not a CUDA GPU" in why
    backend, why = resolve_backend("auto", CUDA, torch.float32, 64, 32)
    assert backend == "torch" and "torch.float32" in why
    backend, why = resolve_backend("auto", CUDA, torch.bfloat16, 60, 32)
    assert backend == "torch" and "multiples of 8" in why and "model.dim=60" in why
    monkeypatch.setattr(fused, "fused_unavailable", lambda device: "the GPU is sm_100")
    assert resolve_backend("auto", CUDA, torch.bfloat16, 64, 32) == (
        "torch", "auto: the GPU is sm_100")
    monkeypatch.setattr(fused, "fused_unavailable", lambda device: None)
    assert resolve_backend("auto", CUDA, torch.bfloat16, 64, 32) == ("fused", "auto")


def test_auto_on_cpu_runs_the_torch_path_bitwise():
    seed = torch.seed()
    torch.manual_seed(seed)
    auto, plain = MoE(_cfg("auto"), 0), MoE(_cfg("torch"), 0)
    with torch.no_grad():
        for p in auto.parameters():
            p.normal_(0, 0.1)
    plain.load_state_dict(auto.state_dict())
    x = torch.randn(2, 16, 64)
    outs = []
    for layer in (auto, plain):
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        grads = torch.autograd.grad(out.square().sum(), [xi, *layer.parameters()])
        outs.append((out, *grads))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b), f"seed {seed}"


def test_fp8_with_auto_on_cpu_names_the_reason():
    layer = MoE(_cfg("auto", "fp8"), 0)
    with pytest.raises(RuntimeError, match="needs the fused backend.*rows are torch.float32"):
        layer(torch.randn(1, 4, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
            RuntimeError, match="needs the fused backend.*not a CUDA GPU"):
        layer(torch.randn(1, 4, 64))
