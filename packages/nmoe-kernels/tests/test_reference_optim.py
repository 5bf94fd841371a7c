"""`nmoe_kernels.reference.adamw_step_`: float32 moments bitwise torch's single-tensor AdamW over
several steps, the clipping factor, bfloat16 moments rounded once per step, and its errors."""

from __future__ import annotations

import pytest
import torch

import nmoe_kernels
from nmoe_kernels.reference import adamw_step_

SHAPES = [(7, 5), (33,), (3, 4, 6), (1,)]
HYPER = dict(lr=3e-3, beta1=0.85, beta2=0.97, eps=1e-7, weight_decay=0.1)


def _draw(seed: int, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 100 + step)
    # Heavy-tailed gradients: moments over many binades.
    return [torch.randn(s, generator=g) * torch.exp(2 * torch.randn(s, generator=g))
            for s in SHAPES]


def test_float32_moments_are_torch_single_tensor_adamw_bitwise():
    seed = torch.seed() % 2**31
    g0 = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g0) for s in SHAPES]
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(torch_params, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                            eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], foreach=False)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for step in range(1, 5):
        grads = _draw(seed, step)
        for p, g in zip(torch_params, grads):
            p.grad = g.clone()
        opt.step()
        adamw_step_(params, grads, m, v, step=float(step), **HYPER)
    for i, (p, q) in enumerate(zip(params, torch_params)):
        assert torch.equal(p, q.detach()), f"seed {seed} tensor {i}"
        assert torch.equal(m[i], opt.state[q]["exp_avg"])
        assert torch.equal(v[i], opt.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16])
def test_grad_coef_is_the_premultiplied_gradient_and_grads_stay(moments):
    seed = torch.seed() % 2**31
    g0 = torch.Generator().manual_seed(seed)
    a = [torch.randn(s, generator=g0) for s in SHAPES]
    b = [p.clone() for p in a]
    state_a = [[torch.zeros(s, dtype=moments) for s in SHAPES] for _ in range(2)]
    state_b = [[torch.zeros(s, dtype=moments) for s in SHAPES] for _ in range(2)]
    for step in range(1, 4):
        coef = torch.rand((), dtype=torch.float64) * 0.9 + 0.05
        grads = _draw(seed, step)
        kept = [g.clone() for g in grads]
        adamw_step_(a, grads, *state_a, step=step, grad_coef=coef, **HYPER)
        adamw_step_(b, [g * coef.float() for g in grads], *state_b, step=step, **HYPER)
        assert all(torch.equal(g, k) for g, k in zip(grads, kept)), "gradients were written"
    assert all(torch.equal(x, y) for x, y in zip(a, b)), f"seed {seed}"


def test_bfloat16_moments_are_the_rounded_float32_moments():
    # One step from given moments: the stored bfloat16 moments equal the float32 update of the
    # widened moments, rounded once; the parameter uses the unrounded values.
    seed = torch.seed() % 2**31
    g0 = torch.Generator().manual_seed(seed)
    p = [torch.randn(s, generator=g0) for s in SHAPES]
    m = [torch.randn(s, generator=g0).to(torch.bfloat16) for s in SHAPES]
    v = [torch.rand(s, generator=g0).to(torch.bfloat16) for s in SHAPES]
    p32, m32, v32 = [x.clone() for x in p], [x.float() for x in m], [x.float() for x in v]
    grads = _draw(seed, 1)
    adamw_step_(p, grads, m, v, step=3, **HYPER)
    adamw_step_(p32, grads, m32, v32, step=3, **HYPER)
    for i in range(len(SHAPES)):
        assert torch.equal(p[i], p32[i]), f"seed {seed} tensor {i}"
        assert m[i].dtype == torch.bfloat16 and torch.equal(m[i], m32[i].to(torch.bfloat16))
        assert torch.equal(v[i], v32[i].to(torch.bfloat16))


@pytest.mark.parametrize("fn", [adamw_step_, nmoe_kernels.adamw_step_],
                         ids=["reference", "kernel"])
def test_errors_name_the_argument(fn):
    # The kernel's wrapper runs the reference's rules before its CUDA checks: the same errors
    # on CPU tensors, with or without a GPU.
    p, g = [torch.zeros(3)], [torch.zeros(3)]
    m, v = [torch.zeros(3)], [torch.zeros(3)]
    with pytest.raises(ValueError, match="equal lengths"):
        fn(p, [], m, v, step=1, **HYPER)
    with pytest.raises(ValueError, match="step must be >= 1"):
        fn(p, g, m, v, step=0, **HYPER)
    with pytest.raises(ValueError, match=r"params\[0\] and grads\[0\] must be float32"):
        fn([torch.zeros(3, dtype=torch.bfloat16)], g, m, v, step=1, **HYPER)
    with pytest.raises(ValueError, match=r"float32 or bfloat16, got torch.float16 \(exp_avgs"):
        fn(p, g, [torch.zeros(3, dtype=torch.float16)], v, step=1, **HYPER)
    with pytest.raises(ValueError, match=r"must be torch.float32 \(that of exp_avgs\[0\]\); "
                                         r"tensor 0 has torch.float32 and torch.bfloat16"):
        fn(p, g, m, [torch.zeros(3, dtype=torch.bfloat16)], step=1, **HYPER)
    bf = [torch.zeros(3, dtype=torch.bfloat16)]
    with pytest.raises(ValueError, match="tensor 1 has torch.float32 and torch.float32"):
        fn(p * 2, g * 2, bf + m, bf + v, step=1, **HYPER)  # one moment dtype per call
    with pytest.raises(ValueError, match="shapes"):
        fn(p, [torch.zeros(4)], m, v, step=1, **HYPER)
    with pytest.raises(ValueError, match="one entry .* per param, got 2 for 1"):
        fn(p, g, m, v, step=1, param_copies=[None, None], **HYPER)
    with pytest.raises(ValueError, match=r"param_copies\[0\] must be bfloat16 of the param's "
                                         r"shape \(3,\), got torch.float16"):
        fn(p, g, m, v, step=1, param_copies=[torch.zeros(3, dtype=torch.float16)], **HYPER)
    with pytest.raises(ValueError, match=r"param_copies\[0\] must be bfloat16 .* shape \(4,\)"):
        fn(p, g, m, v, step=1, param_copies=[torch.zeros(4, dtype=torch.bfloat16)], **HYPER)


@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16])
def test_param_copies_are_the_rounded_updated_params(moments):
    # The copies receive bf16(p) of the updated params; the update itself is unchanged, and a
    # None entry leaves that tensor without a copy.
    seed = torch.seed() % 2**31
    g0 = torch.Generator().manual_seed(seed)
    p = [torch.randn(s, generator=g0) for s in SHAPES]
    m = [torch.randn(s, generator=g0).to(moments) for s in SHAPES]
    v = [torch.rand(s, generator=g0).to(moments) for s in SHAPES]
    plain = [[x.clone() for x in ts] for ts in (p, m, v)]
    copies = [torch.full(s, float("nan"), dtype=torch.bfloat16) for s in SHAPES]
    copies[1] = None
    grads = _draw(seed, 2)
    adamw_step_(p, grads, m, v, step=2, param_copies=copies, **HYPER)
    adamw_step_(*plain[:1], grads, *plain[1:], step=2, **HYPER)
    for i in range(len(SHAPES)):
        assert torch.equal(p[i], plain[0][i]) and torch.equal(m[i], plain[1][i]), f"seed {seed}"
        if copies[i] is not None:
            assert torch.equal(copies[i], p[i].to(torch.bfloat16)), f"seed {seed} tensor {i}"
