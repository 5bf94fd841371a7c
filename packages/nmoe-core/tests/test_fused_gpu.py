"""The fused MoE path on a Hopper GPU: BF16 and FP8 against the torch backend, the Hopper kernels
against `ReferenceExpertKernels` on the same inputs, and bitwise determinism.

BF16 tolerance: both paths compute in BF16 with float32 accumulation but round at different
places -- the fused epilogue rounds silu(gate)*up once where the torch path rounds h first; the
fused path applies the gates in the float32 combine and the float32 elementwise backward where
the torch path rounds gate*dOut and dA to bf16 -- so per-element differences are a few BF16 ulps
(2^-8 relative each); we bound the relative Frobenius error by 2e-2 for outputs and gradients
(the CPU twin in test_fused.py measures <= 7e-3), with an absolute term for gradients that vanish
in exact arithmetic.

FP8 tolerances are those of test_fused.py (measured there with the reference kernels): FP8 vs
BF16 1.5e-1 (router gradient 5e-1), Hopper vs reference kernels on the same FP8 inputs 1e-2.
"""

from __future__ import annotations

import pytest
import torch

from nmoe_core.config import AttentionConfig, ModelConfig, MoEConfig
from nmoe_core.moe import MoE

pytestmark = pytest.mark.gpu


def _cfg(backend: str, experts: int = 64, top_k: int = 6, recipe: str = "bf16") -> ModelConfig:
    return ModelConfig(
        vocab_size=512, dim=256, n_layers=1, inter_dim=512,
        attention=AttentionConfig(n_heads=4),
        moe=MoEConfig(n_routed_experts=experts, n_activated_experts=top_k, n_shared_experts=1,
                      moe_inter_dim=128, n_dense_layers=0, backend=backend, recipe=recipe),
        tokenizer="custom", eos_token_id=0,
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _pair(experts: int, top_k: int, seed: int, bias: torch.Tensor | None = None,
          recipe: str = "bf16"):
    torch.manual_seed(seed)
    ref = MoE(_cfg("torch", experts, top_k), layer_id=0).cuda()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
        if bias is not None:
            ref.router.bias.copy_(bias)
    fused = MoE(_cfg("fused", experts, top_k, recipe), layer_id=0).cuda()
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _case(case: str, seed: int, recipe: str = "bf16"):
    experts, top_k = (64, 6) if case != "all_to_one" else (16, 1)
    bias = None
    if case == "empty_expert":
        bias = torch.zeros(experts)
        bias[5] = -100.0  # expert 5 never chosen
    if case == "all_to_one":
        bias = torch.zeros(experts)
        bias[3] = 100.0
    return _pair(experts, top_k, seed, bias, recipe)


def _run(layer, x, seed: int):
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(xi)
    grad_out = torch.randn(out.shape, device="cuda",
                           generator=torch.Generator("cuda").manual_seed(seed))
    grads = torch.autograd.grad((out.float() * grad_out.float()).sum(), [xi, *layer.parameters()])
    return out, grads, layer.load_counts.clone()


def _compare(case, seed, ref, results, bound, router_bound=None, zero_scale=1e-5):
    assert torch.equal(results[0][2], results[1][2]), f"routing differs, seed {seed}"
    if case == "empty_expert":
        assert results[1][2][5] == 0
    if case == "all_to_one":
        assert results[1][2][3] == results[1][2].sum()
    assert _rel(results[1][0], results[0][0]) < bound, (
        f"forward: rel err {_rel(results[1][0], results[0][0]):.3g}, seed {seed}"
    )
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    # A gradient that is zero in exact arithmetic (the router's with top-1: the normalised gate
    # is x/x = 1) is rounding noise in both paths; the absolute term covers it.
    scale = max(g.float().norm().item() for g in results[0][1])
    for name, a, b in zip(names, results[1][1], results[0][1], strict=True):
        limit = router_bound if name == "router.weight" and router_bound else bound
        err = (a.float() - b.float()).norm().item()
        assert err <= limit * b.float().norm().item() + zero_scale * scale, (
            f"grad {name}: rel err {_rel(a, b):.3g}, seed {seed}"
        )


@pytest.mark.parametrize("case", ["random", "empty_expert", "all_to_one"])
def test_fused_bf16_matches_torch_backend(case):
    seed = torch.seed() % 2**31
    ref, fused = _case(case, seed)
    x = torch.randn(2, 1024, 256, device="cuda")
    _compare(case, seed, ref, [_run(ref, x, seed), _run(fused, x, seed)], 2e-2)


@pytest.mark.parametrize("case", ["random", "empty_expert", "all_to_one"])
def test_fused_fp8_against_torch_bf16(case):
    """FP8 recipe (Hopper kernels) against the torch backend in BF16."""
    seed = torch.seed() % 2**31
    ref, fused = _case(case, seed, "fp8")
    x = torch.randn(2, 1024, 256, device="cuda")
    _compare(case, seed, ref, [_run(ref, x, seed), _run(fused, x, seed)], 1.5e-1,
             router_bound=5e-1, zero_scale=1e-4)


@pytest.mark.parametrize("recipe", ["bf16", "fp8"])
@pytest.mark.parametrize("case", ["random", "empty_expert", "all_to_one"])
def test_hopper_kernels_match_reference_kernels(case, recipe):
    """The same fused layer with `HopperExpertKernels` and with `ReferenceExpertKernels` (on the
    GPU): the same quantization and rounding points, only accumulation order differs (a rare
    rounding flip moves an FP8 block scale; see test_fused.py), so 1e-2."""
    from nmoe_core.fused import HopperExpertKernels, ReferenceExpertKernels

    seed = torch.seed() % 2**31
    _, fused = _case(case, seed, recipe)
    x = torch.randn(2, 512, 256, device="cuda")
    results = []
    for kernels in (ReferenceExpertKernels(), HopperExpertKernels(x.device)):
        fused.experts.kernels = kernels
        fused.invalidate_weight_cache()
        fused.load_counts.zero_()
        results.append(_run(fused, x, seed))
    _compare(case, seed, fused, results, 1e-2, zero_scale=1e-4)


def test_hopper_uses_the_cuda_gated_backward():
    """The installed nmoe-kernels has the fused elementwise backward (else the fused path falls
    back to torch elementwise ops, correct but slower)."""
    from nmoe_core.fused import HopperExpertKernels

    assert HopperExpertKernels(torch.device("cuda"))._gated_backward is not None


@pytest.mark.parametrize("recipe", ["bf16", "fp8"])
def test_fused_is_bitwise_deterministic(recipe):
    seed = torch.seed() % 2**31
    _, fused = _pair(64, 6, seed, recipe=recipe)
    x = torch.randn(4096, 256, device="cuda")
    outs = []
    for _ in range(2):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fused(xi)
        g = torch.autograd.grad(out.float().square().sum(),
                                [xi, fused.router.weight, fused.experts.w13, fused.experts.w2])
        outs.append((out, *g))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b), f"not bitwise reproducible, seed {seed}"


def test_hopper_fp8_weight_layouts_are_transposes_of_each_other():
    """`HopperExpertKernels.quantize_weight` quantizes the master weights twice (once per
    layout); the 128x128 grid is symmetric, so the dgrad copy must be bitwise the transpose of
    the forward copy, scales included."""
    from nmoe_core.fused import HopperExpertKernels

    kernels = HopperExpertKernels(torch.device("cuda"))
    for shape in ((4, 256, 384), (3, 384, 128)):
        w = torch.randn(shape, device="cuda") * torch.rand(shape[0], 1, 1, device="cuda") * 3
        copy = kernels.quantize_weight(w)
        assert torch.equal(copy.kn.view(torch.uint8), copy.nk.transpose(1, 2).view(torch.uint8))
        assert torch.equal(copy.kn_scales, copy.nk_scales.transpose(1, 2))
