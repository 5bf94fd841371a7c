"""The CUDA `router_topk` against `nmoe_kernels.reference.router_topk` on the same GPU, bitwise.

The kernel adds bias to score in float32 exactly as torch does and orders by the result with the
reference's rule (descending, ties to the lower expert, NaN above +inf, -0 equal to +0), so the
ids must be equal, tie-heavy inputs included. Every shape covers: E = 1 and small E (several rows
per warp), E not a multiple of 32, E = 1000 and 1024 (32 values per lane), k up to min(E, 32),
T = 0, T below and above a warp's rows, and T large enough that warps stride over rows. Inputs
are drawn fresh each run (seed printed by conftest).
"""

from __future__ import annotations

import pytest
import torch

import nmoe_kernels
import nmoe_kernels._C as C
from nmoe_kernels import _extension
from nmoe_kernels import reference as ref

pytestmark = pytest.mark.gpu

EXPERTS = [1, 8, 31, 64, 256, 1000, 1024]
ROWS = [0, 1, 5, 4097, 32768]
POISON = -7


def _ks(num_experts: int) -> list[int]:
    return sorted({k for k in (1, 2, 6, 7, 8, min(num_experts, 32)) if k <= num_experts})


CASES = [(t, e, k) for e in EXPERTS for k in _ks(e) for t in ROWS]


@pytest.fixture(autouse=True)
def _require_cuda_build():
    assert C.WITH_CUDA and hasattr(C, "router_topk"), (
        "nmoe_kernels._C lacks the CUDA router_topk; install the CUDA toolkit >= 12.8 and rebuild "
        "(pip install --no-build-isolation -e packages/nmoe-kernels)"
    )


def _binding(scores_TE: torch.Tensor, bias_E: torch.Tensor, k: int) -> torch.Tensor:
    """The raw `_C` binding into a poisoned output: every entry must be overwritten."""
    out = torch.full((scores_TE.shape[0], k), POISON, dtype=torch.int64, device="cuda")
    C.router_topk(_extension.capsule(scores_TE), _extension.capsule(bias_E),
                  _extension.capsule(out), k, _extension.stream_handle(scores_TE.device))
    return out


def _check(scores_TE: torch.Tensor, bias_E: torch.Tensor, k: int, what: str,
           reference_on_cpu: bool = False) -> None:
    if reference_on_cpu:
        want = ref.router_topk(scores_TE.cpu(), bias_E.cpu(), k).cuda()
    else:
        want = ref.router_topk(scores_TE, bias_E, k)
    got = nmoe_kernels.router_topk(scores_TE, bias_E, k)
    raw = _binding(scores_TE, bias_E, k)
    shape = tuple(scores_TE.shape)
    assert got.dtype == torch.int64 and got.is_contiguous()
    assert torch.equal(got, want), f"{what}: {shape}, k={k}: ids differ in " \
        f"{(got != want).any(1).sum().item()} rows"
    assert torch.equal(raw, want), f"{what}: {shape}, k={k}: binding into a poisoned output"


@pytest.mark.parametrize("num_rows,num_experts,k", CASES)
def test_sigmoid_scores(num_rows, num_experts, k):
    """Router-like inputs: sigmoid of normal logits, a small bias (the balancing bias's scale)."""
    scores = torch.randn(num_rows, num_experts, device="cuda").sigmoid_()
    bias = torch.randn(num_experts, device="cuda") * 1e-2
    _check(scores, bias, k, "sigmoid scores")


@pytest.mark.parametrize("num_rows,num_experts,k",
                         [c for c in CASES if c[0] in (5, 4097) and c[1] != 1])
def test_ties(num_rows, num_experts, k):
    """Scores on a grid of 9 values (most of a row's values tie); bias zero, then bias with
    repeated values (multiples of 1/8: every sum exact, so ties survive the add)."""
    scores = (torch.rand(num_rows, num_experts, device="cuda") * 8).round_() / 8
    _check(scores, torch.zeros(num_experts, device="cuda"), k, "ties, zero bias")
    bias = torch.randint(0, 3, (num_experts,), device="cuda").float() / 8
    _check(scores, bias, k, "ties, repeated bias")


@pytest.mark.parametrize("num_experts", [8, 64, 256, 1024])
def test_bias_decides(num_experts):
    """The bias sets the order: with every score 0.5 each row's ids are the bias's stable
    descending order; with scores within 2^-11 of 0.5 and a bias spread over [-1, 1] the result
    differs from the scores' own order (a kernel ignoring or mis-indexing the bias fails)."""
    k = min(num_experts, 8)
    bias = torch.rand(num_experts, device="cuda") * 2 - 1
    flat = torch.full((4097, num_experts), 0.5, device="cuda")
    _check(flat, bias, k, "bias decides, flat scores")
    want = torch.sort(bias, descending=True, stable=True).indices[:k]
    assert torch.equal(nmoe_kernels.router_topk(flat, bias, k), want.expand(4097, k))
    scores = 0.5 + (torch.rand(4097, num_experts, device="cuda") - 0.5) * 2**-10
    _check(scores, bias, k, "bias decides")
    assert not torch.equal(nmoe_kernels.router_topk(scores, bias, k),
                           ref.router_topk(scores, torch.zeros_like(bias), k))


@pytest.mark.parametrize("num_experts", [8, 31, 256, 1024])
def test_special_values(num_experts):
    """NaN, +-inf, -0.0 and +0.0 sprinkled over the scores: torch.sort's order (NaN first, -0
    equal to +0). The reference runs on CPU here, whose comparison sort treats -0 and +0 as
    equal by definition (a GPU radix sort would need to special-case -0)."""
    k = min(num_experts, 32)
    scores = torch.randn(513, num_experts, device="cuda")
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0],
                            device="cuda")
    mask = torch.rand_like(scores) < 0.2
    pick = torch.randint(0, len(specials), scores.shape, device="cuda")
    scores = torch.where(mask, specials[pick], scores)
    # A bias of -0.0 keeps every score's bits (+0 + -0 = +0, -0 + -0 = -0); +0.0 would not.
    _check(scores, torch.full((num_experts,), -0.0, device="cuda"), k, "special values",
           reference_on_cpu=True)


def test_torch_topk_agrees_where_no_ties():
    """The `super` shape against torch.topk itself: the chosen biased values equal topk's values
    bitwise, and the ids equal topk's on every row without a tie among its k + 1 best values."""
    num_rows, num_experts, k = 32768, 256, 7
    scores = torch.randn(num_rows, num_experts, device="cuda").sigmoid_()
    bias = torch.randn(num_experts, device="cuda") * 1e-3
    biased = scores + bias
    top = torch.topk(biased, k + 1)
    ids = nmoe_kernels.router_topk(scores, bias, k)
    assert torch.equal(biased.gather(1, ids), top.values[:, :k])
    untied = (top.values[:, 1:] != top.values[:, :-1]).all(1)
    assert untied.float().mean() > 0.99
    assert torch.equal(ids[untied], top.indices[untied, :k])


def test_side_stream_and_compile():
    """Runs on the current stream (a side stream here), and inside a torch.compile(fullgraph)
    graph as one opaque op."""
    scores = torch.randn(4097, 256, device="cuda").sigmoid_()
    bias = torch.randn(256, device="cuda") * 1e-2
    want = ref.router_topk(scores, bias, 8)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = nmoe_kernels.router_topk(scores, bias, 8)
    side.synchronize()
    assert torch.equal(got, want)

    def route(x, b):
        return torch.ops.nmoe_kernels.router_topk(torch.sigmoid(x), b, 8)

    logits = torch.randn(4097, 256, device="cuda")
    compiled = torch.compile(route, fullgraph=True)
    assert torch.equal(compiled(logits, bias), ref.router_topk(torch.sigmoid(logits), bias, 8))
