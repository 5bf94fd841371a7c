"""`nmoe_comm.autograd` against autograd through a naive per-token MoE, and `gradcheck`.

The MoE under test: ``out[t] = sum_k gates[t, k] * (x[t] @ W[e(t, k)])`` with the experts run on
their dispatched segments. The naive side gathers ``W[e(t, k)]`` per slot and lets torch
differentiate it in float64.
Run: ``pytest packages/nmoe-comm/tests/test_autograd.py``.
"""

from __future__ import annotations

import pytest
import torch

from nmoe_comm import LocalDispatcher, reference
from nmoe_comm import autograd as comm_autograd
from nmoe_comm.testing import random_routing


def _moe_via_dispatcher(dispatcher, x_TD, expert_ids_TK, gates_TK, weights_EDF):
    received = comm_autograd.dispatch(dispatcher, x_TD, expert_ids_TK, gates_TK)
    offsets = received.offsets_E1.tolist()
    y_RD = torch.cat([
        received.x_RD[offsets[e]:offsets[e + 1]] @ weights_EDF[e]
        for e in range(weights_EDF.shape[0])
    ])
    return comm_autograd.combine(dispatcher, y_RD, received.handle, gates_TK)


def _moe_naive(x_TD, expert_ids_TK, gates_TK, weights_EDF):
    y_TKF = torch.einsum("td,tkdf->tkf", x_TD, weights_EDF[expert_ids_TK])
    return (gates_TK[..., None] * y_TKF).sum(dim=1)


def _leaves(gen, num_tokens, top_k, num_experts, hidden, out_hidden, dtype, distinct=True):
    ids, gates = random_routing(num_tokens, top_k, num_experts, generator=gen, distinct=distinct)
    x = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64)
    weights = torch.randn(num_experts, hidden, out_hidden, generator=gen, dtype=torch.float64)
    weights = weights / hidden**0.5
    leaves = [t.to(dtype).requires_grad_() for t in (x, gates.double(), weights)]
    return ids, leaves


# Errors are measured relative to each gradient's largest entry. Every entry is a sum of about
# n = hidden + K = 52 rounded products (the expert GEMMs, then the K-slot sums), so its error is at
# most n * u * sum|terms|, and sum|terms| exceeds the entry's scale by about sqrt(hidden) for
# random data: 52 * u * 7 = 364 u. float64 (u = 1.1e-16): 4e-14, tolerance 1e-12 (seen ~5e-16).
# float32 (u = 6e-8, plus the rounding of the float64 leaves): 2.2e-5, tolerance 2e-5 (seen ~2e-7).
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("distinct", [True, False])
def test_gradients_match_naive_float64(gen, dtype, tol, distinct):
    num_tokens, top_k, num_experts, hidden, out_hidden = 33, 4, 6, 48, 40
    ids, leaves = _leaves(gen, num_tokens, top_k, num_experts, hidden, out_hidden, dtype, distinct)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    probe = torch.randn(num_tokens, out_hidden, generator=gen, dtype=torch.float64)

    dispatcher = LocalDispatcher(num_experts, capacity=num_tokens * top_k)
    out = _moe_via_dispatcher(dispatcher, leaves[0], ids, leaves[1], leaves[2])
    (out.double() * probe).sum().backward()
    ref_out = _moe_naive(ref_leaves[0], ids, ref_leaves[1], ref_leaves[2])
    (ref_out * probe).sum().backward()

    assert out.dtype == dtype
    for name, got, want in [("out", out.detach(), ref_out.detach()),
                            ("grad x", leaves[0].grad, ref_leaves[0].grad),
                            ("grad gates", leaves[1].grad, ref_leaves[1].grad),
                            ("grad W", leaves[2].grad, ref_leaves[2].grad)]:
        assert got.dtype == dtype, name
        scale = want.abs().max().clamp_min(1e-30)
        err = (got.double() - want).abs().max() / scale
        assert err <= tol, f"{name}: max error {err:.3e} of scale {scale:.3e} > {tol}"


def test_combine_gradient_wrt_y_and_gates(gen):
    """combine alone, y_RD a leaf: out[t] = sum_k g * y_RD[row(t, k)], rows from the reference."""
    num_tokens, top_k, num_experts, hidden = 21, 3, 4, 17
    ids, gates = random_routing(num_tokens, top_k, num_experts, generator=gen, distinct=False)
    x = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64)
    dispatcher = LocalDispatcher(num_experts, capacity=num_tokens * top_k)
    handle = dispatcher.dispatch(x, ids, gates).handle
    row_TK = reference.dispatch([x], [ids], [gates], num_experts)[0].handle.state.dest_row_TK

    y = torch.randn(num_tokens * top_k, hidden, generator=gen, dtype=torch.float64)
    g = torch.rand(num_tokens, top_k, generator=gen, dtype=torch.float64)
    probe = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64)
    y1, g1, y2, g2 = (t.clone().requires_grad_() for t in (y, g, y, g))
    (comm_autograd.combine(dispatcher, y1, handle, g1) * probe).sum().backward()
    ((g2[..., None] * y2[row_TK]).sum(dim=1) * probe).sum().backward()
    torch.testing.assert_close(y1.grad, y2.grad, rtol=1e-13, atol=0)
    torch.testing.assert_close(g1.grad, g2.grad, rtol=1e-13, atol=1e-14)


def test_bf16_gradient_dtypes_and_router_gradient(gen):
    """bfloat16 rows with float32 router gates: gradients come back in each leaf's dtype."""
    num_tokens, top_k, num_experts, hidden = 16, 2, 4, 32
    ids, leaves = _leaves(gen, num_tokens, top_k, num_experts, hidden, hidden, torch.float64)
    x = leaves[0].detach().to(torch.bfloat16).requires_grad_()
    gates = leaves[1].detach().float().requires_grad_()
    weights = leaves[2].detach().to(torch.bfloat16).requires_grad_()
    dispatcher = LocalDispatcher(num_experts, capacity=num_tokens * top_k)
    out = _moe_via_dispatcher(dispatcher, x, ids, gates, weights)
    out.float().sum().backward()
    assert (x.grad.dtype, gates.grad.dtype, weights.grad.dtype) == (
        torch.bfloat16, torch.float32, torch.bfloat16)
    # dGates[t, k] = <1, y(t, k)> = sum of y's 32 entries. y = x @ W is rounded to bfloat16
    # (at most 2^-9 relative per entry; |y| reaches ~5 here), so the sum is off by at most
    # 2^-9 * sum|y| plus float32 rounding: bound 2^-8 * sum|y| (measured <= 0.39 of it over 3000
    # draws; the former absolute 6e-2 had been reached up to 0.048 over 6000 draws).
    y_TKF = torch.einsum("td,tkdf->tkf", x.detach().double(), weights.detach().double()[ids])
    err = (gates.grad.double() - y_TKF.sum(-1)).abs()
    bound = 2**-8 * y_TKF.abs().sum(-1)
    assert bool((err <= bound).all()), f"dGates error {float((err / bound).max()):.3g} x bound"


def test_gradcheck(gen):
    num_tokens, top_k, num_experts, hidden, out_hidden = 5, 2, 3, 4, 3
    ids, leaves = _leaves(gen, num_tokens, top_k, num_experts, hidden, out_hidden, torch.float64,
                          distinct=False)
    dispatcher = LocalDispatcher(num_experts, capacity=num_tokens * top_k)

    def moe(x, gates, weights):
        return _moe_via_dispatcher(dispatcher, x, ids, gates, weights)

    assert torch.autograd.gradcheck(moe, tuple(leaves), eps=1e-6, atol=1e-8)
