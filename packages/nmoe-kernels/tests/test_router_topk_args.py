"""`router_topk` without a GPU: argument errors, the custom op's CPU path (the reference) and the
op inside a torch.compile(fullgraph=True) graph. Kernel values: test_router_topk_gpu.py."""

from __future__ import annotations

import pytest
import torch

import nmoe_kernels
import nmoe_kernels._C as C
from nmoe_kernels import _extension
from nmoe_kernels import reference as ref
from nmoe_kernels.router import router_topk

E = 64


def _args(num_rows=5, num_experts=E, dtype=torch.float32):
    scores = torch.rand(num_rows, num_experts, dtype=dtype)
    bias = torch.randn(num_experts) * 1e-2
    return scores, bias


@pytest.mark.parametrize("build,match", [
    (lambda s, b: (s.double(), b, 7), "scores_TE must be float32, got torch.float64"),
    (lambda s, b: (s[0], b, 7), r"scores_TE must be \[T, E\] with E >= 1, got shape \(64,\)"),
    (lambda s, b: (s[:, :0], b[:0], 1), r"E >= 1, got shape \(5, 0\)"),
    (lambda s, b: (torch.rand(5, 1025), torch.zeros(1025), 7),
     "E = 1025 experts, the kernel takes at most 1024; use torch.topk for E > 1024"),
    (lambda s, b: (torch.rand(E, 5).t(), b, 7), r"scores_TE must be contiguous.*\.contiguous\(\)"),
    (lambda s, b: (s, b.half(), 7), "bias_E must be float32, got torch.float16"),
    (lambda s, b: (s, b[:-1], 7), r"bias_E must be \[E\] = \[64\], got \(63,\)"),
    (lambda s, b: (s, torch.zeros(2 * E)[::2], 7), "bias_E must be contiguous"),
    (lambda s, b: (s, b, 0), r"k must be an int with 1 <= k <= min\(E, 32\) = 32, got 0"),
    (lambda s, b: (s, b, 33), "got 33; use torch.topk for k > 32"),
    (lambda s, b: (s[:, :6].contiguous(), b[:6], 7), r"1 <= k <= min\(E, 32\) = 6, got 7"),
    (lambda s, b: (s, b, 2.0), "k must be an int"),
])
def test_argument_errors(build, match):
    scores, bias = _args()
    with pytest.raises(ValueError, match=match):
        router_topk(*build(scores, bias))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="bias_E must be a torch.Tensor, got list"):
        router_topk(torch.rand(3, 4), [0.0] * 4, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cpu_tensors_point_to_the_reference():
    with pytest.raises(RuntimeError) as err:
        router_topk(*_args(), 7)
    assert "scores_TE is on cpu and no CUDA GPU is visible" in str(err.value)
    assert "nmoe_kernels.reference.router_topk on CPU" in str(err.value)


def test_binding_checks_its_arguments():
    """The `_C` binding's own checks (it is reached only through the wrapper's)."""
    if not C.WITH_CUDA:
        pytest.skip("_C was built without CUDA ops (the error names the rebuild instead)")
    scores, bias = _args()
    out = torch.empty(5, 7, dtype=torch.int64)
    caps = [_extension.capsule(t) for t in (scores.bfloat16(), bias, out)]
    with pytest.raises(ValueError, match="scores_TE: expected dtype float32, got bfloat16"):
        C.router_topk(*caps, 7, 0)
    caps = [_extension.capsule(t) for t in (scores, bias, out)]
    with pytest.raises(ValueError, match="scores_TE: expected a CUDA tensor"):
        C.router_topk(*caps, 7, 0)
    assert (C.ROUTER_MAX_EXPERTS, C.ROUTER_MAX_TOP_K) == (1024, 32)


@pytest.mark.parametrize("num_rows,num_experts,k", [(0, 8, 3), (1, 1, 1), (37, 31, 31),
                                                    (200, 256, 7), (9, 1100, 40)])
def test_cpu_custom_op_is_the_reference(num_rows, num_experts, k):
    """On CPU the custom op runs the reference (no kernel limits: E > 1024, k > 32 work)."""
    scores = (torch.rand(num_rows, num_experts) * 16).round() / 16  # many ties
    bias = torch.randint(0, 3, (num_experts,)).float() / 16
    got = torch.ops.nmoe_kernels.router_topk(scores, bias, k)
    assert got.dtype == torch.int64 and got.shape == (num_rows, k)
    assert torch.equal(got, ref.router_topk(scores, bias, k))


def test_compiled_graph_keeps_the_op():
    """torch.compile(fullgraph=True) of a router-like function with the op: no graph break, and
    the compiled result equals the reference on the same inputs."""
    import torch._dynamo

    def route(x_TD, w_ED, bias_E):
        scores_TE = torch.sigmoid(x_TD @ w_ED.t())
        ids_TK = torch.ops.nmoe_kernels.router_topk(scores_TE, bias_E, 6)
        return ids_TK, scores_TE.gather(1, ids_TK)

    x, w, bias = torch.randn(33, 16), torch.randn(E, 16), torch.randn(E) * 1e-2
    torch._dynamo.reset()
    ids, gates = torch.compile(route, fullgraph=True)(x, w, bias)
    want = ref.router_topk(torch.sigmoid(x @ w.t()), bias, 6)
    assert torch.equal(ids, want)
    assert torch.equal(gates, torch.sigmoid(x @ w.t()).gather(1, want))
    assert torch._dynamo.explain(route)(x, w, bias).graph_break_count == 0
    assert nmoe_kernels.router_topk is router_topk
