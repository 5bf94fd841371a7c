"""The MoE router on CUDA: nmoe-kernels' `router_topk` kernel picks the experts torch.topk picks.

The router takes the kernel for float32 CUDA scores; a copy with ``topk_kernel = False`` runs
``torch.topk`` on the same scores (the same cuBLAS and sigmoid calls, so the same bits). Both
choose by the same float32 ``scores + bias``; only the order of exactly equal values may differ
(torch.topk leaves it unspecified, the kernel takes the lower expert), so the chosen biased
values must be equal bitwise and the ids equal wherever a row has no tie among its K + 1 best.
Inputs are drawn fresh each run (seed printed in failures).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nmoe_core.moe import Router, router_topk_kernel_available

pytestmark = pytest.mark.gpu


def _router(dim: int, num_experts: int, top_k: int, gen: torch.Generator) -> Router:
    router = Router(dim, num_experts, top_k, 2.5).cuda()
    with torch.no_grad():
        router.weight.copy_(torch.randn(num_experts, dim, generator=gen, device="cuda") * 0.05)
        router.bias.copy_(torch.randn(num_experts, generator=gen, device="cuda") * 1e-3)
    return router


def _biased(router: Router, x_TD: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(F.linear(x_TD.float(), router.weight.float())) + router.bias


def _assert_same_choice(ids_TK, want_TK, biased_TE, margin: float, seed: int) -> None:
    """Equal ids on every row whose K + 1 best biased values are more than ``margin`` (relative)
    apart; everywhere, the chosen values equal (margin 0) or within margin of the wanted ones."""
    k = want_TK.shape[1]
    top = torch.topk(biased_TE, k + 1).values
    gaps = top[:, :-1] - top[:, 1:]
    separated = (gaps > top[:, :-1].abs() * margin).all(1)
    assert separated.float().mean() > 0.99, f"seed {seed}: too many near-ties to check"
    assert torch.equal(ids_TK[separated], want_TK[separated]), f"seed {seed}"
    got_v, want_v = biased_TE.gather(1, ids_TK), biased_TE.gather(1, want_TK)
    if margin == 0:
        assert torch.equal(got_v, want_v), f"seed {seed}"
    else:
        assert ((got_v - want_v).abs() <= want_v.abs() * margin).all(), f"seed {seed}"


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(4096, 256, 7), (4097, 64, 6),
                                                          (1000, 256, 8), (333, 1024, 8)])
def test_kernel_router_matches_torch_topk(num_tokens, num_experts, top_k):
    assert router_topk_kernel_available(), (
        "nmoe_kernels._C lacks the CUDA router_topk; rebuild nmoe-kernels with nvcc "
        "(pip install --no-build-isolation -e packages/nmoe-kernels)")
    seed = torch.seed()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    router = _router(768, num_experts, top_k, gen)
    assert router.topk_kernel
    baseline = copy.deepcopy(router)
    baseline.topk_kernel = False
    x = torch.randn(num_tokens, 768, generator=gen, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        gates, ids, normalised = router(x)
        want_gates, want_ids, want_normalised = baseline(x)
    assert ids.dtype == torch.int64 and ids.shape == (num_tokens, top_k)
    _assert_same_choice(ids, want_ids, _biased(router, x), 0.0, seed)
    same = (ids == want_ids).all(1)
    assert torch.equal(gates[same], want_gates[same]), f"seed {seed}"
    assert torch.equal(normalised[same], want_normalised[same]), f"seed {seed}"


def test_router_gradients_unchanged():
    """The kernel returns ids only; the gate gradients flow through the unbiased scores as on the
    torch.topk path (bitwise, on rows where the ids agree: all of them here without ties)."""
    seed = torch.seed()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    router = _router(256, 64, 6, gen)
    baseline = copy.deepcopy(router)
    baseline.topk_kernel = False
    x = torch.randn(512, 256, generator=gen, device="cuda")
    upstream = torch.randn(512, 6, generator=gen, device="cuda")
    grads = []
    for r in (router, baseline):
        gates, ids, _ = r(x)
        grads.append((ids, torch.autograd.grad((gates * upstream).sum(), r.weight)[0]))
    if torch.equal(grads[0][0], grads[1][0]):
        assert torch.equal(grads[0][1], grads[1][1]), f"seed {seed}"
    else:
        pytest.skip(f"seed {seed}: an exact tie reordered the ids (probability ~1e-5)")


def test_compiled_router_keeps_the_kernel():
    """``torch.compile(router, fullgraph=True)`` runs with the kernel in the graph (no break) and
    picks the eager router's experts wherever the K + 1 best biased values are more than 2^-20
    apart (compiled sigmoid may differ from eager's in the last bits)."""
    import torch._dynamo

    seed = torch.seed()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    router = _router(768, 256, 7, gen)
    x = torch.randn(4096, 768, generator=gen, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch._dynamo.explain(router)(x).graph_break_count == 0
        _, ids, _ = torch.compile(router, fullgraph=True)(x)
        _, want, _ = router(x)
    _assert_same_choice(ids, want, _biased(router, x), 2**-20, seed)
