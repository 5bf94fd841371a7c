"""The fused MoE path on the CPU with `ReferenceExpertKernels`: the gated combine and its one
autograd function against the torch backend, the FP8 recipe against a float64 computation with
the same quantization and against BF16, the fused elementwise backward, the return of per-row
gate gradients to their (token, slot), and the once-per-step FP8 weight cache.

Every MoE comparison runs three routings: random, one expert that receives no row, and every row
on one expert (the others empty).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nmoe_comm import autograd as comm_autograd
from nmoe_comm import create_dispatcher
from nmoe_core.config import AttentionConfig, ModelConfig, MoEConfig
from nmoe_core.fused import (
    ExpertWeightCache,
    ReferenceExpertKernels,
    fused_expert_forward,
    rows_to_sources,
    swiglu_backward_gated_torch,
)
from nmoe_core.moe import MoE
from nmoe_kernels import reference as ref

CASES = ["random", "empty_expert", "all_to_one"]


def _cfg(backend="torch", recipe="bf16", experts=6, top_k=2, dim=16, inter=12, shared=1):
    return ModelConfig(
        vocab_size=64, dim=dim, n_layers=1, inter_dim=32,
        attention=AttentionConfig(n_heads=2),
        moe=MoEConfig(n_routed_experts=experts, n_activated_experts=top_k,
                      n_shared_experts=shared, moe_inter_dim=inter, n_dense_layers=0,
                      backend=backend, recipe=recipe),
        tokenizer="custom", eos_token_id=0,
    )


def _routing_bias(case: str, experts: int) -> torch.Tensor:
    bias = torch.zeros(experts)
    if case == "empty_expert":
        bias[1] = -100.0  # expert 1 never chosen
    elif case == "all_to_one":
        bias[3] = 100.0  # every token's first choice
    return bias


def _layers(seed: int, case: str, dtype=torch.float64, **cfg):
    """A torch-backend layer and a fused one (reference kernels) with the same weights."""
    gen = torch.Generator().manual_seed(seed)
    torch_layer = MoE(_cfg(**cfg), layer_id=0).to(dtype)
    with torch.no_grad():
        for p in torch_layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
        torch_layer.router.bias.copy_(_routing_bias(case, torch_layer.num_experts))
    fused_cfg = _cfg(backend="fused", **cfg)
    fused_layer = MoE(fused_cfg, layer_id=0).to(dtype)
    fused_layer.load_state_dict(torch_layer.state_dict())
    fused_layer.experts.kernels = ReferenceExpertKernels()
    return torch_layer, fused_layer


def _run(layer, x, grad_out_seed: int, autocast: bool = False):
    """Forward, then the gradients of ``<out, W>`` (W random) w.r.t. x and every parameter."""
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(xi)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed))
    grads = torch.autograd.grad((out.double() * weight.double()).sum(),
                                [xi, *layer.parameters()])
    return out, grads, layer.load_counts.clone()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check_routing(case, counts, num_rows):
    if case == "empty_expert":
        assert counts[1] == 0
    if case == "all_to_one":
        assert counts[3] == num_rows


# --------------------------------------------------------------------------------------------
# The fused elementwise backward and the return of per-row values


def _dgate_magnitude(h_R2F: torch.Tensor, da_RF: torch.Tensor) -> torch.Tensor:
    """``sum_j |a_j da_j|`` per row: the scale of float32 summation error in dgate."""
    h = h_R2F.double()
    return ((F.silu(h[:, 0::2]) * h[:, 1::2]).abs() * da_RF.double().abs()).sum(1)


def test_swiglu_backward_gated_against_autograd():
    """`swiglu_backward_gated_torch` equals autograd of ``<gates * swiglu(h), da>`` (float64:
    same math, so agreement to float64 rounding); in bf16 the outputs are the float64 values
    rounded once (|err| <= 1 bf16 ulp = 2^-8 relative)."""
    seed = torch.seed()
    gen = torch.Generator().manual_seed(seed % 2**63)
    h = torch.randn(37, 24, dtype=torch.float64, generator=gen) * 2
    da = torch.randn(37, 12, dtype=torch.float64, generator=gen)
    gates = torch.rand(37, dtype=torch.float64, generator=gen)
    hv, gv = h.clone().requires_grad_(True), gates.clone().requires_grad_(True)
    a = F.silu(hv[:, 0::2]) * hv[:, 1::2]
    dh_want, dgate_want = torch.autograd.grad((gv[:, None] * a * da).sum(), [hv, gv])
    dh, ag, dgate = swiglu_backward_gated_torch(h, da, gates)
    assert torch.allclose(dh, dh_want, rtol=1e-12, atol=1e-12), f"seed {seed}"
    assert torch.allclose(dgate, dgate_want, rtol=1e-12, atol=1e-12), f"seed {seed}"
    assert torch.allclose(ag, gates[:, None] * a.detach(), rtol=1e-12, atol=1e-12), f"seed {seed}"

    hb, dab = h.bfloat16(), da.bfloat16()
    dh_b, ag_b, dgate_b = swiglu_backward_gated_torch(hb, dab, gates.float())
    dh64, ag64, dgate64 = swiglu_backward_gated_torch(hb.double(), dab.double(), gates)
    assert dh_b.dtype == ag_b.dtype == torch.bfloat16 and dgate_b.dtype == torch.float32
    for got, want in ((dh_b, dh64), (ag_b, ag64)):
        assert torch.all((got.double() - want).abs() <= 2**-8 * want.abs() + 1e-30), f"seed {seed}"
    # dgate: a float32 sum of F products, error <= F * 2^-24 * sum |terms| in any order.
    assert torch.all((dgate_b.double() - dgate64).abs() <= 1e-5 * _dgate_magnitude(hb, dab))


@pytest.mark.skipif(not hasattr(ref, "swiglu_backward_gated"),
                    reason="nmoe_kernels.reference.swiglu_backward_gated not in this build")
def test_kernels_reference_gated_backward_matches_ours():
    """The nmoe-kernels reference op and our torch fallback compute the same float32 math from
    bf16 inputs; outputs rounded to bf16 may differ by 1 ulp (<= 2^-7 relative) where the
    float32 sigmoid differs in its last bit, and dgate, a float32 sum of F = 128 products in
    another order, by <= F * 2^-24 * sum |terms| (bound: 2e-5 * sum |terms|)."""
    seed = torch.seed()
    gen = torch.Generator().manual_seed(seed % 2**63)
    h = (torch.randn(64, 256, generator=gen) * 2).bfloat16()
    da = torch.randn(64, 128, generator=gen).bfloat16()
    gates = torch.rand(64, generator=gen)
    kernels = ReferenceExpertKernels()
    got = kernels.swiglu_backward_gated(h, da, gates)
    want = swiglu_backward_gated_torch(h, da, gates)
    for a, b in zip(got[:2], want[:2], strict=True):
        assert torch.all((a.float() - b.float()).abs() <= 2**-7 * b.float().abs() + 1e-30), seed
    assert torch.all((got.dgate_R - want[2]).abs() <= 2e-5 * _dgate_magnitude(h, da)), seed


def test_rows_to_sources_returns_each_value_bitwise():
    """Values attached to the received rows come back to their (token, slot), bitwise: dispatch
    random per-slot values as gates, send the received ``gates_R`` back, get the input."""
    seed = torch.seed()
    gen = torch.Generator().manual_seed(seed % 2**63)
    tokens, top_k, experts = 29, 3, 5
    ids = torch.randint(0, experts, (tokens, top_k), generator=gen)
    ids[0] = 2  # one token naming the same expert in every slot
    values = torch.randn(tokens, top_k, generator=gen)
    dispatcher = create_dispatcher("local", num_experts=experts, capacity=tokens * top_k)
    x = torch.randn(tokens, 8, generator=gen)
    received = dispatcher.dispatch(x, ids, values)
    slots = torch.arange(top_k, dtype=torch.float32).expand(tokens, -1).contiguous()
    slot_R = dispatcher.dispatch(x, ids, slots).gates_R
    back = rows_to_sources(dispatcher, received.gates_R, slot_R, received.handle)
    assert torch.equal(back, values), f"seed {seed}"


# --------------------------------------------------------------------------------------------
# BF16 recipe: gated combine against the torch backend


@pytest.mark.parametrize("case", CASES)
def test_fused_equals_torch_backend_float64(case):
    """Forward and every gradient (x, router, shared experts, W13, W2) in float64. The reference
    GEMMs multiply in float32 and gates cross the dispatcher as float32, so agreement is to
    float32 rounding: ~1e-7 relative per product, sums of <= 24 terms."""
    seed = torch.seed() % 2**31
    torch_layer, fused_layer = _layers(seed, case, top_k=1 if case == "all_to_one" else 3)
    x = torch.randn(23, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    want, got = _run(torch_layer, x, seed), _run(fused_layer, x, seed)
    assert torch.equal(want[2], got[2]), f"routing differs, seed {seed}"
    _check_routing(case, got[2], 23)
    assert torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-5), f"seed {seed}"
    names = ["x"] + [n for n, _ in torch_layer.named_parameters()]
    for name, a, b in zip(names, got[1], want[1], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), f"grad {name}, seed {seed}"


@pytest.mark.parametrize("case", CASES)
def test_fused_equals_torch_backend_bf16(case):
    """Both paths under bf16 autocast (float32 weights, bf16 rows). The torch backend rounds
    ``h``, ``gate * dOut`` and ``dA`` to bf16 where the fused path keeps float32 (gates applied in
    the float32 combine and the float32 elementwise pass), so values differ by a few bf16 ulps
    (2^-8 relative each): relative Frobenius error <= 2e-2 for the output and every gradient,
    plus 1e-5 of the largest gradient norm for gradients that vanish in exact arithmetic (the
    router's with top-1: the normalised gate is x / x = 1)."""
    seed = torch.seed() % 2**31
    torch_layer, fused_layer = _layers(seed, case, dtype=torch.float32,
                                       top_k=1 if case == "all_to_one" else 3, dim=32, inter=16)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(seed))
    want, got = _run(torch_layer, x, seed, True), _run(fused_layer, x, seed, True)
    assert torch.equal(want[2], got[2]), f"routing differs, seed {seed}"
    _check_routing(case, got[2], 40)
    assert got[0].dtype == want[0].dtype
    assert _rel(got[0], want[0]) < 2e-2, f"forward, seed {seed}"
    scale = max(g.double().norm().item() for g in want[1])
    names = ["x"] + [n for n, _ in torch_layer.named_parameters()]
    for name, a, b in zip(names, got[1], want[1], strict=True):
        err = (a.double() - b.double()).norm().item()
        assert err <= 2e-2 * b.double().norm().item() + 1e-5 * scale, (
            f"grad {name}: rel err {_rel(a, b):.3g}, seed {seed}"
        )


# --------------------------------------------------------------------------------------------
# FP8 recipe


def _dq_rows(x: torch.Tensor) -> torch.Tensor:
    """FP8 1x128 round trip of rows, in float64 (the reference quantizer)."""
    return ref.dequantize_fp8_1x128(*ref.quantize_fp8_1x128(x.float()), torch.float64)


def _dq_weight(w_EKN: torch.Tensor) -> torch.Tensor:
    """FP8 128x128 round trip of ``[E, K, N]`` weights, in float64."""
    nk = ref.dequantize_fp8_128x128(*ref.quantize_fp8_128x128(w_EKN, transpose=True),
                                    torch.float64)
    return nk.transpose(1, 2)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().double()


def fp8_float64(x_TD, ids_TK, gates_TK, w13, w2, dout_TD):
    """The FP8 recipe slot by slot in float64, quantizing and rounding at exactly the points the
    fused path does (module docstring of `nmoe_core.fused`); only the accumulation order and
    width differ. Returns ``(out, dx, dgates, dw13, dw2)``."""
    num_tokens, top_k = ids_TK.shape
    w13q, w2q = _dq_weight(w13), _dq_weight(w2)
    xq, dzq = _dq_rows(x_TD), _dq_rows(dout_TD)
    out = torch.zeros(num_tokens, x_TD.shape[1], dtype=torch.float64)
    dx = torch.zeros_like(out)
    dgates = torch.zeros(num_tokens, top_k, dtype=torch.float64)
    dw13 = torch.zeros(w13.shape, dtype=torch.float64)
    dw2 = torch.zeros(w2.shape, dtype=torch.float64)
    for k in range(top_k):
        e = ids_TK[:, k]
        g = gates_TK[:, k].double()[:, None]
        h = _bf16(torch.einsum("td,tdn->tn", xq, w13q[e]))
        gate, up = h[:, 0::2], h[:, 1::2]
        a64 = F.silu(gate) * up
        y = _bf16(torch.einsum("tf,tfd->td", _dq_rows(_bf16(a64)), w2q[e]))
        out += g * y
        da = _bf16(torch.einsum("td,tfd->tf", dzq, w2q[e]))
        dgates[:, k] = (a64 * da).sum(1)
        sig = torch.sigmoid(gate)
        dh = torch.empty_like(h)
        dh[:, 0::2] = g * da * up * sig * (1 + gate * (1 - sig))
        dh[:, 1::2] = g * da * gate * sig
        dh = _bf16(dh)
        dx += _bf16(torch.einsum("tn,tdn->td", _dq_rows(dh), w13q[e]))
        dw2.index_add_(0, e, torch.einsum("tf,td->tfd", _bf16(g * a64), dout_TD.double()))
        dw13.index_add_(0, e, torch.einsum("td,tn->tdn", x_TD.double(), dh))
    return _bf16(out), _bf16(dx), dgates, dw13, dw2  # combine and dispatch backward round once


def _fused_fp8(x_TD, ids_TK, gates_TK, w13, w2, dout_TD, cache=None):
    dispatcher = create_dispatcher("local", num_experts=w13.shape[0], capacity=ids_TK.numel())
    kernels = ReferenceExpertKernels()
    xi, gi = x_TD.clone().requires_grad_(True), gates_TK.clone().requires_grad_(True)
    w13i, w2i = w13.clone().requires_grad_(True), w2.clone().requires_grad_(True)
    dispatched = comm_autograd.dispatch(dispatcher, xi, ids_TK, gi.detach())
    fp8 = (cache or ExpertWeightCache()).fp8(w13i, w2i, kernels)
    out = fused_expert_forward(dispatcher, dispatched, gi, w13i, w2i, kernels, fp8)
    grads = torch.autograd.grad(out, [xi, gi, w13i, w2i], dout_TD)
    return out, *grads


def _fp8_inputs(seed: int, case: str, tokens=40, top_k=2, experts=4, dim=128, inter=256):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=gen).bfloat16()
    pool = torch.tensor([e for e in range(experts) if case != "empty_expert" or e != 1])
    ids = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:top_k]]
                       for _ in range(tokens)])
    if case == "all_to_one":  # expert 3 in every slot (a token may name it twice)
        ids = torch.full((tokens, top_k), 3)
    gates = torch.rand(tokens, top_k, generator=gen) + 0.1
    w13 = torch.randn(experts, dim, 2 * inter, generator=gen) / dim**0.5
    w2 = torch.randn(experts, inter, dim, generator=gen) / inter**0.5
    dout = torch.randn(tokens, dim, generator=gen).bfloat16()
    return x, ids, gates, w13, w2, dout


@pytest.mark.parametrize("case", CASES)
def test_fp8_fused_equals_float64_with_the_same_quantization(case):
    """FP8 forward and backward against `fp8_float64`: the same quantized operands and bf16
    roundings, float64 instead of float32 accumulation (D = 128 != F = 256, so a swapped operand
    layout cannot pass by shape). A float32/float64 difference (~1e-6 relative) changes a bf16
    rounding only where a value sits that close to a rounding boundary -- a few elements per run,
    by one ulp -- but when that element is the amax of an FP8 1x128 block, the block's scale and
    codes move and that row's output moves by up to ~2%: measured relative Frobenius errors are
    <= 3.4e-3 over 1000 draws. The bound 1e-2 stays 5x below the FP8-vs-BF16 gap (4-6e-2), so a
    missing or misplaced quantization, a wrong scale or layout, or a lost gate fails it (checked
    by mutation: ue8m0 activation scales give 6e-2, ue8m0 dH scales 3.5e-2, ungated ag 0.76)."""
    seed = torch.seed() % 2**31
    inputs = _fp8_inputs(seed, case)
    got = _fused_fp8(*inputs)
    want = fp8_float64(*inputs)
    names = ["out", "dx", "dgates", "dw13", "dw2"]
    for name, a, b in zip(names, got, want, strict=True):
        assert a.shape == b.shape, name
        assert _rel(a, b) < 1e-2, f"{name}: rel err {_rel(a, b):.3g}, case {case}, seed {seed}"
    if case == "all_to_one":
        assert torch.equal(got[3][:3], torch.zeros_like(got[3][:3])), "empty experts got dW13"
    if case == "empty_expert":
        assert not got[4][1].any(), "the empty expert got dW2"


@pytest.mark.parametrize("case", CASES)
def test_fp8_fused_layer_against_bf16(case):
    """The FP8 layer (bf16 autocast) against the torch backend in float64 (exact): E4M3 keeps 3
    mantissa bits, so each quantized operand (x, W13, a, W2; dz, dH in the backward) carries a
    relative error up to 2^-4 per element (~2-3% RMS); measured relative Frobenius errors of the
    output and of the x, W13 and W2 gradients are 4-6.5% (max over 600 draws): bound 1.5e-1.
    The router's gradient is the gate gradients through the normalisation's Jacobian, which
    cancels their common part and so amplifies their relative error (median 6.5%, max 20% over
    600 draws): bound 5e-1 (the gate gradients themselves are checked to 1e-2 against the float64
    computation with the same quantization). A gradient that vanishes in exact arithmetic (the
    router's with top-1) gets 1e-4 of the largest gradient norm. The routing is the same: the
    router runs in float32 outside the recipe."""
    seed = torch.seed() % 2**31
    top_k = 1 if case == "all_to_one" else 2
    torch_layer, _ = _layers(seed, case, dtype=torch.float64, top_k=top_k, dim=128, inter=128)
    fused = MoE(_cfg(backend="fused", recipe="fp8", top_k=top_k, dim=128, inter=128), 0)
    fused.load_state_dict({k: v.float() for k, v in torch_layer.state_dict().items()})
    fused.experts.kernels = ReferenceExpertKernels()
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(seed))
    want, got = _run(torch_layer, x.double(), seed), _run(fused, x, seed, True)
    assert torch.equal(want[2], got[2]), f"routing differs, seed {seed}"
    _check_routing(case, got[2], 32)
    assert _rel(got[0], want[0]) < 1.5e-1, f"forward: {_rel(got[0], want[0]):.3g}, seed {seed}"
    scale = max(g.norm().item() for g in want[1])
    names = ["x"] + [n for n, _ in torch_layer.named_parameters()]
    for name, a, b in zip(names, got[1], want[1], strict=True):
        err = (a.double() - b).norm().item()
        bound = 5e-1 if name == "router.weight" else 1.5e-1
        assert err <= bound * b.norm().item() + 1e-4 * scale, (
            f"grad {name}: rel err {_rel(a, b):.3g}, seed {seed}"
        )


def test_fp8_recipe_needs_128_multiples():
    layer = MoE(_cfg(backend="fused", recipe="fp8", dim=64, inter=128), 0)
    layer.experts.kernels = ReferenceExpertKernels()
    with pytest.raises(ValueError, match=r"model.dim \(64\).*multiples of 128"):
        layer(torch.randn(4, 64))


# --------------------------------------------------------------------------------------------
# The FP8 weight cache


def test_weight_cache_reused_within_a_step_and_rebuilt_after_invalidate():
    """Micro-batches of one step reuse the same FP8 copies (object identity, one build); after
    the weights change and `invalidate_weight_cache`, the copies are the quantization of the new
    weights. Weights are changed through ``.data`` (invisible to the version guard, like ZeRO-2's
    all-gather into a flat buffer), so only the invalidation can refresh them."""
    seed = torch.seed() % 2**31
    torch.manual_seed(seed)
    layer = MoE(_cfg(backend="fused", recipe="fp8", dim=128, inter=128, shared=0), 0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.05)
    layer.experts.kernels = ReferenceExpertKernels()
    experts, cache = layer.experts, layer.experts.weight_cache
    x = torch.randn(16, 128)
    for _ in range(3):  # three micro-batches, forward and backward
        layer(x).square().sum().backward()
    first = cache._fp8
    assert cache.builds == 1, f"seed {seed}"
    assert experts.fp8_weights(experts.kernels) is first

    experts.w13.data.add_(torch.randn_like(experts.w13) * 0.05)  # the "optimizer step"
    experts.w2.data.mul_(1.5)
    assert experts.fp8_weights(experts.kernels) is first, "stale copies must persist until told"
    layer.invalidate_weight_cache()
    layer(x).sum().backward()
    new = cache._fp8
    assert cache.builds == 2 and new is not first, f"seed {seed}"
    for name, w in (("w13", experts.w13), ("w2", experts.w2)):
        codes, scales = ref.quantize_fp8_128x128(w.detach(), transpose=True)
        copy = getattr(new, name)
        assert torch.equal(copy.nk.view(torch.uint8), codes.view(torch.uint8)), name
        assert torch.equal(copy.nk_scales, scales), name
        assert torch.equal(copy.kn.view(torch.uint8), codes.transpose(1, 2).view(torch.uint8))
        assert torch.equal(copy.kn_scales, scales.transpose(1, 2)), name


def test_weight_cache_guard_rebuilds_after_in_place_change():
    """A tracked in-place change (``load_state_dict``, a no-grad edit) rebuilds the copies even
    without an invalidation; an untouched layer keeps them."""
    layer = MoE(_cfg(backend="fused", recipe="fp8", dim=128, inter=128, shared=0), 0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.05)
    layer.experts.kernels = ReferenceExpertKernels()
    cache = layer.experts.weight_cache
    x = torch.randn(8, 128)
    layer(x)
    layer(x)
    assert cache.builds == 1
    with torch.no_grad():
        layer.experts.w2.mul_(2.0)
    layer(x)
    assert cache.builds == 2
    layer.load_state_dict(layer.state_dict())
    layer(x)
    assert cache.builds == 3


def _plain_and_cached(seed: int) -> tuple[MoE, MoE]:
    """An uncached float32 fused layer and a copy of it with ``cache_expert_weights`` on (the
    reference kernels)."""
    _, plain = _layers(seed, "random", dtype=torch.float32)
    cached = MoE(_cfg(backend="fused"), layer_id=0)
    cached.load_state_dict(plain.state_dict())
    cached.experts.kernels = ReferenceExpertKernels()
    cached.cache_expert_weights = True
    return plain, cached


def test_cached_bf16_weights_are_bitwise_the_per_call_casts():
    """``cache_expert_weights`` (BF16 recipe under bf16 autocast): three micro-batches read one
    cast of the float32 masters (one build, no cast of w13/w2 in any forward or backward), and
    outputs and every gradient equal the uncached layer's bitwise; after the weights change and
    `invalidate_weight_cache`, the next micro-batch casts the new weights."""
    seed = torch.seed() % 2**31
    plain, cached = _plain_and_cached(seed)
    cache = cached.experts.weight_cache
    gen = torch.Generator().manual_seed(seed)
    expert_shapes = {tuple(cached.experts.w13.shape), tuple(cached.experts.w2.shape)}
    casts = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        target = kwargs.get("dtype", args[0] if args else None)
        if tuple(self.shape) in expert_shapes and self.dtype == torch.float32 and (
                target == torch.bfloat16):
            casts.append(tuple(self.shape))
        return real_to(self, *args, **kwargs)

    for micro in range(3):
        x = torch.randn(20, 16, generator=gen)
        want_out, want_grads, _ = _run(plain, x, seed + micro, autocast=True)
        torch.Tensor.to = counting_to
        try:
            got_out, got_grads, _ = _run(cached, x, seed + micro, autocast=True)
        finally:
            torch.Tensor.to = real_to
        assert torch.equal(got_out, want_out), f"seed {seed} micro {micro}"
        for i, (g, w) in enumerate(zip(got_grads, want_grads, strict=True)):
            assert (g is None) == (w is None) and (g is None or torch.equal(g, w)), (seed, i)
    assert cache.builds == 1, f"seed {seed}: {cache.builds} builds"
    assert len(casts) == 2, casts  # w13 and w2, once, in the first forward
    first = cache._cast
    with torch.no_grad():
        for layer in (plain, cached):
            layer.experts.w2.data.mul_(1.5)  # bypasses the version guard, like ZeRO-2
    cached.invalidate_weight_cache()
    x = torch.randn(20, 16, generator=gen)
    want_out, _, _ = _run(plain, x, seed, autocast=True)
    got_out, _, _ = _run(cached, x, seed, autocast=True)
    assert cache.builds == 2 and cache._cast is not first
    assert torch.equal(got_out, want_out), f"seed {seed}"


def test_optimizer_step_refreshes_the_cached_bf16_copies():
    """`MoE.weight_copy_targets` hands the cached bf16 copies to nmoe's AdamW, whose update writes
    the new weights into them; after `MoE.after_optimizer_step` the next forward reads them
    without a cast or rebuild and matches an uncached layer stepped the same way bitwise. A step
    that wrote only one of the two weights drops the copies (the next forward casts)."""
    from nmoe_core.optim import AdamW

    seed = torch.seed() % 2**31
    plain, cached = _plain_and_cached(seed)
    cache = cached.experts.weight_cache
    assert cached.weight_copy_targets() == {}  # nothing cast before the first forward
    opts = [AdamW([layer.experts.w13, layer.experts.w2], lr=1e-2, state_dtype=torch.bfloat16)
            for layer in (plain, cached)]
    gen = torch.Generator().manual_seed(seed)
    for step in range(3):
        x = torch.randn(20, 16, generator=gen)
        for layer in (plain, cached):
            out, grads, _ = _run(layer, x, seed + step, autocast=True)
            for p, g in zip(layer.parameters(), grads[1:], strict=True):
                p.grad = g
            if layer is plain:
                want_out = out
        assert torch.equal(out, want_out), f"seed {seed} step {step}"
        targets = cached.weight_copy_targets()
        assert set(map(id, targets)) == {id(cached.experts.w13), id(cached.experts.w2)}
        opts[0].step()
        opts[1].step(param_copies=targets)
        cached.after_optimizer_step({id(p) for p in opts[1].refreshed_copies})
    assert (cache.builds, cache.refreshes, cache.invalidations) == (1, 3, 0)
    assert torch.equal(cache._cast[1], cached.experts.w2.detach().to(torch.bfloat16))
    cached.after_optimizer_step({id(cached.experts.w13)})  # w2 not written: drop, recast
    assert cache.invalidations == 1 and cached.weight_copy_targets() == {}
