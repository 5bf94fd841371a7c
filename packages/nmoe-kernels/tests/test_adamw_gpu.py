"""The CUDA `adamw_step_` against `nmoe_kernels.reference.adamw_step_` on the same GPU.

Each step starts both from the same state (the kernel's, cloned), so differences never compound.
The kernel runs the reference's float32 operations per element, except that nvcc may contract a
multiply and an add into one FMA (one rounding instead of two). Bounds, per element:

- float32 moments: |dm| <= 2^-21 (|m_prev| + |g|) and |dv| <= 2^-21 (|v_prev| + g^2) (a few ulps
  of the terms that are summed, so cancellation in m = m + w (g - m) is covered; g includes the
  clipping factor);
- bfloat16 moments: that bound plus one bfloat16 ulp of the stored value, 2^-7 |m_ref| (+2^-126):
  two float32 values a few ulps apart can round to neighbouring bfloat16 values;
- parameters: |dp| <= 2^-21 |p_prev| + 2^-18 |u| + 2 step_size bound(dm) / denom, with u the
  reference's update p_ref - p_prev: a few ulps of each term, plus the first moment's absolute
  error carried through m / denom (m may have cancelled to far below its terms).

Gradients must come back bitwise unchanged. Inputs are drawn fresh each run (seed printed).
"""

from __future__ import annotations

import pytest
import torch

import nmoe_kernels
import nmoe_kernels._C as C
from nmoe_kernels import reference as ref

pytestmark = pytest.mark.gpu

# Shapes around the vector width (4) and the per-CTA chunk (8192), one large stack, an empty one.
SHAPES = [(1,), (3,), (4,), (129,), (8191,), (8192,), (8193,), (3, 4097), (0,), (64, 96, 97),
          (256, 48, 64)]
HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


@pytest.fixture(autouse=True)
def _require_cuda_build():
    assert C.WITH_CUDA and hasattr(C, "adamw_step"), (
        "nmoe_kernels._C lacks the CUDA adamw_step; install the CUDA toolkit >= 12.8 and rebuild "
        "(pip install --no-build-isolation -e packages/nmoe-kernels)"
    )


def _fresh(shape, dtype, misaligned: bool, fill) -> torch.Tensor:
    if not misaligned:
        return fill(torch.empty(shape, device="cuda", dtype=dtype))
    buf = torch.empty(torch.Size(shape).numel() + 1, device="cuda", dtype=dtype)
    return fill(buf[1:].view(shape))


def _tensors(moments: torch.dtype, misaligned: bool):
    """Params, grads (heavy-tailed: moments over many binades) and nonzero moments. With
    ``misaligned`` every tensor is a contiguous view at element offset 1 of a larger buffer, so
    no pointer is 16-byte aligned (the kernel's scalar path)."""
    out = []
    for shape in SHAPES:
        p = _fresh(shape, torch.float32, misaligned, lambda t: t.normal_())
        g = _fresh(shape, torch.float32, misaligned,
                   lambda t: t.normal_().mul_(torch.randn_like(t).mul_(2).exp_()))
        m = _fresh(shape, moments, misaligned,
                   lambda t: t.copy_(torch.randn(t.shape, device="cuda") * 0.1))
        v = _fresh(shape, moments, misaligned,
                   lambda t: t.copy_(torch.rand(t.shape, device="cuda") * 0.01))
        out.append((p, g, m, v))
    return [list(x) for x in zip(*out)]


def _check(moments, got, want, before, coef, step):
    p, m, v = got
    p_ref, m_ref, v_ref = want
    p0, g, m0, v0 = before
    step_size = HYPER["lr"] / (1 - HYPER["beta1"] ** step)
    bc2_sqrt = (1 - HYPER["beta2"] ** step) ** 0.5
    for i in range(len(p)):
        if p[i].numel() == 0:
            continue
        gc = g[i] if coef is None else g[i] * coef
        bm = 2**-21 * (m0[i].float().abs() + gc.abs())  # float32 moments before any rounding
        bv = 2**-21 * (v0[i].float().abs() + gc * gc)
        # The update u = step_size m / denom inherits m's absolute error (large relative to m
        # where m = m + w (g - m) cancels) and a few ulps of its own.
        denom = v_ref[i].float().sqrt() / bc2_sqrt + HYPER["eps"]
        u = (p_ref[i] - p0[i]).abs()
        bp = 2**-21 * p0[i].abs() + 2**-18 * u + 2 * step_size * bm / denom
        assert bool(((p[i] - p_ref[i]).abs() <= bp).all()), (
            f"param {i} {tuple(p[i].shape)}: max diff {float((p[i] - p_ref[i]).abs().max()):.3g}")
        if moments == torch.bfloat16:  # |rn(a) - rn(b)| <= |a - b| + one ulp
            bm = bm + 2**-7 * m_ref[i].float().abs() + 2**-126
            bv = bv + 2**-7 * v_ref[i].float().abs() + 2**-126
        assert bool(((m[i].float() - m_ref[i].float()).abs() <= bm).all()), f"exp_avg {i}"
        assert bool(((v[i].float() - v_ref[i].float()).abs() <= bv).all()), f"exp_avg_sq {i}"


@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16])
def test_matches_reference(moments, clip, misaligned):
    params, grads, exp_avgs, exp_avg_sqs = _tensors(moments, misaligned)
    for step in (1, 2, 7):
        coef = (torch.rand((), device="cuda") * 0.9 + 0.05) if clip else None
        before = [[t.clone() for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
        p_ref, m_ref, v_ref = ([t.clone() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs))
        ref.adamw_step_(p_ref, grads, m_ref, v_ref, step=step, grad_coef=coef, **HYPER)
        nmoe_kernels.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, step=step,
                                 grad_coef=coef, **HYPER)
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(grads, before[1])), "gradients written"
        assert all(m.dtype == moments for m in exp_avgs + exp_avg_sqs)
        _check(moments, (params, exp_avgs, exp_avg_sqs), (p_ref, m_ref, v_ref), before, coef,
               step)


@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16])
def test_param_copies_are_the_rounded_update_bitwise(moments, misaligned):
    """With bf16 copies the params and moments are bitwise those of the same kernel without
    them, and each copy is bitwise ``param.to(torch.bfloat16)`` of the result; tensors without a
    copy (None) are untouched by it. Misaligned copies (element offset 1) take the scalar path;
    the copies' buffers are poisoned with NaN first."""
    a = _tensors(moments, misaligned)
    # The same alignment as ``a`` (a plain clone is aligned): the scalar and the vector paths
    # may contract different multiply-adds, so only the same path is bitwise comparable.
    b = [[_fresh(t.shape, t.dtype, misaligned, lambda x, t=t: x.copy_(t)) for t in ts]
         for ts in a]
    copies = [_fresh(p.shape, torch.bfloat16, misaligned, lambda t: t.fill_(float("nan")))
              for p in a[0]]
    copies[2] = None
    coef = torch.rand((), device="cuda") * 0.9 + 0.05
    nmoe_kernels.adamw_step_(*a, step=4, grad_coef=coef, param_copies=copies, **HYPER)
    nmoe_kernels.adamw_step_(*b, step=4, grad_coef=coef, **HYPER)
    torch.cuda.synchronize()
    for x, y in zip(sum(a, []), sum(b, [])):
        assert torch.equal(x, y), "the copies changed the update"
    for i, (p, c) in enumerate(zip(a[0], copies)):
        if c is not None:
            assert torch.equal(c, p.to(torch.bfloat16)), f"copy {i} {tuple(p.shape)}"
    # The reference with copies gives the same copies of its own params.
    p_ref = [t.clone() for t in b[0]]
    ref_copies = [None if c is None else torch.empty_like(c) for c in copies]
    ref.adamw_step_(p_ref, b[1], [t.clone() for t in b[2]], [t.clone() for t in b[3]], step=5,
                    param_copies=ref_copies, **HYPER)
    for p, c in zip(p_ref, ref_copies):
        if c is not None:
            assert torch.equal(c, p.to(torch.bfloat16))


def test_param_copy_errors_name_the_tensor():
    p, g, m, v = ([t] for t in (torch.zeros(8, device="cuda") for _ in range(4)))
    with pytest.raises(ValueError, match=r"param_copies\[0\] must be contiguous"):
        nmoe_kernels.adamw_step_(p, g, m, v, step=1, **HYPER, param_copies=[
            torch.zeros(16, device="cuda", dtype=torch.bfloat16)[::2]])
    with pytest.raises(ValueError, match=r"param_copies\[0\] must be bfloat16"):
        nmoe_kernels.adamw_step_(p, g, m, v, step=1, **HYPER,
                                 param_copies=[torch.zeros(8, device="cuda")])
    with pytest.raises(ValueError, match=r"param_copies\[0\] is on cpu"):
        nmoe_kernels.adamw_step_(p, g, m, v, step=1, **HYPER,
                                 param_copies=[torch.zeros(8, dtype=torch.bfloat16)])


def test_coefficient_of_one_is_the_plain_step_bitwise():
    a = _tensors(torch.bfloat16, False)
    b = [[t.clone() for t in ts] for ts in a]
    nmoe_kernels.adamw_step_(*a, step=3, grad_coef=torch.ones((), device="cuda"), **HYPER)
    nmoe_kernels.adamw_step_(*b, step=3, **HYPER)
    for x, y in zip(sum(a, []), sum(b, [])):
        assert torch.equal(x, y)


def test_empty_and_zero_sized_lists_do_nothing():
    nmoe_kernels.adamw_step_([], [], [], [], step=1, **HYPER)
    z = [torch.empty(0, device="cuda") for _ in range(4)]
    nmoe_kernels.adamw_step_([z[0]], [z[1]], [z[2]], [z[3]], step=1, **HYPER)


def test_errors_name_the_tensor():
    p, g, m, v = ([t] for t in (torch.zeros(8, device="cuda") for _ in range(4)))
    with pytest.raises(ValueError, match=r"params\[0\] and grads\[0\] must be float32"):
        nmoe_kernels.adamw_step_([p[0].half()], g, m, v, step=1, **HYPER)
    with pytest.raises(ValueError, match="must be torch.float32"):
        nmoe_kernels.adamw_step_(p, g, m, [v[0].bfloat16()], step=1, **HYPER)
    with pytest.raises(ValueError, match=r"grads\[0\] must be contiguous"):
        nmoe_kernels.adamw_step_(p, [torch.zeros(16, device="cuda")[::2]], m, v, step=1,
                                 **HYPER)
    with pytest.raises(ValueError, match="shapes"):
        nmoe_kernels.adamw_step_(p, [torch.zeros(9, device="cuda")], m, v, step=1, **HYPER)
    with pytest.raises(ValueError, match="grad_coef must be a 0-dim"):
        nmoe_kernels.adamw_step_(p, g, m, v, step=1, grad_coef=torch.ones(1, device="cuda"),
                                 **HYPER)
    with pytest.raises(ValueError, match="on cpu"):
        nmoe_kernels.adamw_step_([torch.zeros(8)], g, m, v, step=1, **HYPER)
