"""The fused MoE path on a Hopper GPU against the torch backend (BF16), and its determinism.

Tolerance: both paths compute in BF16 with float32 accumulation but round at different places
(the fused epilogue rounds silu(gate)*up once; the torch path rounds h, then the product), so
per-element differences are a few BF16 ulps of the output (2^-8 relative each); we bound the
relative Frobenius error by 2e-2 for outputs and gradients, and check the max abs error against
the output scale.
"""

from __future__ import annotations

import pytest
import torch

from nmoe_core.config import AttentionConfig, ModelConfig, MoEConfig
from nmoe_core.moe import MoE

pytestmark = pytest.mark.gpu


def _cfg(backend: str, experts: int = 64, top_k: int = 6) -> ModelConfig:
    return ModelConfig(
        vocab_size=512, dim=256, n_layers=1, inter_dim=512,
        attention=AttentionConfig(n_heads=4),
        moe=MoEConfig(n_routed_experts=experts, n_activated_experts=top_k, n_shared_experts=1,
                      moe_inter_dim=128, n_dense_layers=0, backend=backend),
        tokenizer="custom", eos_token_id=0,
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _pair(experts: int, top_k: int, seed: int, bias: torch.Tensor | None = None):
    torch.manual_seed(seed)
    ref = MoE(_cfg("torch", experts, top_k), layer_id=0).cuda()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
        if bias is not None:
            ref.router.bias.copy_(bias)
    fused = MoE(_cfg("fused", experts, top_k), layer_id=0).cuda()
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize("case", ["random", "empty_expert", "all_to_one"])
def test_fused_bf16_matches_torch_backend(case):
    seed = torch.seed() % 2**31
    experts, top_k = (64, 6) if case != "all_to_one" else (16, 1)
    bias = None
    if case == "empty_expert":
        bias = torch.zeros(experts)
        bias[5] = -100.0  # expert 5 never chosen
    if case == "all_to_one":
        bias = torch.zeros(experts)
        bias[3] = 100.0
    ref, fused = _pair(experts, top_k, seed, bias)
    x = torch.randn(2, 1024, 256, device="cuda")
    results = []
    for layer in (ref, fused):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(xi)
        grad_out = torch.randn_like(out, generator=torch.Generator("cuda").manual_seed(seed))
        grads = torch.autograd.grad((out.float() * grad_out.float()).sum(),
                                    [xi, *layer.parameters()])
        results.append((out, grads, layer.load_counts.clone()))
    assert torch.equal(results[0][2], results[1][2]), "routing differs"
    if case == "empty_expert":
        assert results[1][2][5] == 0
    if case == "all_to_one":
        assert results[1][2][3] == x.shape[0] * x.shape[1]
    assert _rel(results[1][0], results[0][0]) < 2e-2, f"forward, seed {seed}"
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    # A gradient that is zero in exact arithmetic (the router's with top-1: the normalised gate
    # is x/x = 1) is rounding noise in both paths; the absolute term covers it.
    scale = max(g.float().norm().item() for g in results[0][1])
    for name, a, b in zip(names, results[1][1], results[0][1], strict=True):
        err = (a.float() - b.float()).norm().item()
        assert err <= 2e-2 * b.float().norm().item() + 1e-5 * scale, (
            f"grad {name}: rel err {_rel(a, b):.3g}, seed {seed}"
        )


def test_fused_is_bitwise_deterministic():
    seed = torch.seed() % 2**31
    _, fused = _pair(64, 6, seed)
    x = torch.randn(4096, 256, device="cuda")
    outs = []
    for _ in range(2):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fused(xi)
        g = torch.autograd.grad(out.float().square().sum(), [xi, fused.experts.w13])
        outs.append((out, *g))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b), f"not bitwise reproducible, seed {seed}"
