"""The CUDA gated SwiGLU backward against its torch reference, bitwise (one GPU).

The kernel performs the reference's float32 operations one by one (expf, __f*_rn, no FMA
contraction) and sums dgate in the reference's documented order, so against the reference
evaluated on the same GPU (torch.exp on CUDA is the same expf) every output is expected to match
bit for bit: dh, ag (bf16), dgate (fp32), and with quantize_dh the FP8 bytes and scales (the
scale pad entries included). Outputs are poisoned (0xFF bytes: NaN in bf16/fp32) before the
call through `_C`, so unwritten elements cannot pass. Inputs are drawn fresh each run.
"""

from __future__ import annotations

import pytest
import torch

import nmoe_kernels
import nmoe_kernels._C as C
from nmoe_kernels import _extension
from nmoe_kernels import reference as ref

pytestmark = pytest.mark.gpu

FEATURES = [128, 384, 1408, 2048]
ROWS = [0, 1, 7, 1000, "random"]


@pytest.fixture(autouse=True)
def _require_cuda_build():
    assert C.WITH_CUDA, (
        "nmoe_kernels._C was built without nvcc; install the CUDA toolkit >= 12.8 and rebuild "
        "(pip install --no-build-isolation -e packages/nmoe-kernels)"
    )


def make_inputs(num_rows: int, num_features: int):
    """h over [-16, 16] (sigmoid tails, the zero of silu' near -1.28), da with per-row
    magnitudes 2^-20..2^20, gates in [0, 1) with zero gates, one all-zero da row."""
    h = (torch.randn(num_rows, 2 * num_features, device="cuda") * 4).clamp(-16, 16)
    row_scale = torch.exp2(torch.randint(-20, 21, (num_rows, 1), device="cuda").float())
    da = torch.randn(num_rows, num_features, device="cuda") * row_scale
    gates = torch.rand(num_rows, device="cuda")
    if num_rows > 2:
        gates[1] = 0.0
        da[2] = 0.0
    return h.to(torch.bfloat16), da.to(torch.bfloat16), gates


def poisoned(shape, dtype):
    t = torch.empty(shape, dtype=dtype, device="cuda")
    t.view(torch.uint8).fill_(0xFF)
    return t


def run_poisoned(h, da, gates, quantize_dh: bool, ue8m0: bool, mn_major: bool):
    """Call `_C` directly on outputs filled with 0xFF bytes; returns the reference's tuple."""
    num_rows, num_features = h.shape[0], h.shape[1] // 2
    dh = poisoned((num_rows, 2 * num_features), torch.bfloat16)
    ag = poisoned((num_rows, num_features), torch.bfloat16)
    dgate = poisoned((num_rows,), torch.float32)
    dh_fp8 = storage = scales = None
    if quantize_dh:
        blocks = 2 * num_features // 128
        dh_fp8 = poisoned((num_rows, 2 * num_features), torch.uint8)
        if mn_major:
            storage = poisoned((blocks, (num_rows + 3) // 4 * 4), torch.float32)
            scales = storage[:, :num_rows].t()
        else:
            storage = scales = poisoned((num_rows, blocks), torch.float32)
    cap = _extension.capsule
    C.swiglu_backward_gated(
        cap(h), cap(da), cap(gates), cap(dh), cap(ag), cap(dgate),
        None if dh_fp8 is None else cap(dh_fp8), None if storage is None else cap(storage),
        ue8m0, mn_major, _extension.stream_handle(h.device),
    )
    if not quantize_dh:
        return dh, ag, dgate
    return dh, ag, dgate, dh_fp8.view(torch.float8_e4m3fn), scales, storage


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{what}: {got.dtype}{tuple(got.shape)} != {want.dtype}{tuple(want.shape)}"
    )
    if got.numel() == 0:
        return
    # Fresh row-major copies: .contiguous() keeps odd strides on size-1 dims, which view() rejects.
    got_bytes = torch.empty(got.shape, dtype=got.dtype, device=got.device).copy_(got)
    want_bytes = torch.empty(want.shape, dtype=want.dtype, device=want.device).copy_(want)
    got_bytes = got_bytes.view(torch.uint8).reshape(got.shape[0], -1)
    want_bytes = want_bytes.view(torch.uint8).reshape(want.shape[0], -1)
    bad = (got_bytes != want_bytes).nonzero()
    if bad.numel():
        row, byte = bad[0].tolist()
        index = (row,) if got.dim() == 1 else (row, byte // got.element_size())
        raise AssertionError(
            f"{what}: {bad.shape[0]} bytes differ; first at {index}: got "
            f"{got[index].item()!r}, want {want[index].item()!r}"
        )


def resolve_rows(rows) -> int:
    if rows == "random":
        rows = int(torch.randint(1, 50001, ()).item())
        print(f"random R = {rows}")
    return rows


@pytest.mark.parametrize("num_features", FEATURES)
@pytest.mark.parametrize("rows", ROWS)
def test_swiglu_backward_gated_matches_reference_bitwise(rows, num_features):
    num_rows = resolve_rows(rows)
    h, da, gates = make_inputs(num_rows, num_features)
    want = ref.swiglu_backward_gated(h, da, gates)
    got = run_poisoned(h, da, gates, quantize_dh=False, ue8m0=False, mn_major=True)
    for name, g, w in zip(("dh", "ag", "dgate"), got, want):
        assert_bitwise(g, w, name)
    # The public wrapper (its own allocation) gives the same bits, and so does a second run.
    for again in (nmoe_kernels.swiglu_backward_gated(h, da, gates),
                  nmoe_kernels.swiglu_backward_gated(h, da, gates)):
        for name, g, w in zip(("dh", "ag", "dgate"), again, want):
            assert_bitwise(g, w, f"wrapper {name}")


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("mn_major", [True, False])
@pytest.mark.parametrize("num_features", FEATURES)
@pytest.mark.parametrize("rows", [0, 1, 7, 1000, "random"])
def test_swiglu_backward_gated_quantize_dh_bitwise(rows, num_features, mn_major, ue8m0):
    num_rows = resolve_rows(rows)
    h, da, gates = make_inputs(num_rows, num_features)
    layout = "mn_major_tma_aligned" if mn_major else "row_major"
    want = ref.swiglu_backward_gated(h, da, gates, quantize_dh=True, ue8m0=ue8m0,
                                     scale_layout=layout)
    *got, storage = run_poisoned(h, da, gates, quantize_dh=True, ue8m0=ue8m0, mn_major=mn_major)
    for name, g, w in zip(("dh", "ag", "dgate", "dh_fp8", "dh_scales"), got, want):
        assert_bitwise(g, w, name)
    if mn_major:  # the TMA pad columns of the storage are zeros
        assert torch.equal(storage[:, num_rows:], torch.zeros_like(storage[:, num_rows:]))
    wrapped = nmoe_kernels.swiglu_backward_gated(h, da, gates, quantize_dh=True, ue8m0=ue8m0,
                                                 scale_layout=layout)
    for name, g, w in zip(("dh", "ag", "dgate", "dh_fp8", "dh_scales"), wrapped, want):
        assert_bitwise(g, w, f"wrapper {name}")
    assert wrapped[4].stride() == want[4].stride() or num_rows <= 1


def test_swiglu_backward_gated_is_close_to_float64():
    """The kernel's math checked independently of the reference's formula, against float64
    autograd of sum(gates * silu(g) * u * da); tolerances as in the CPU reference test
    (test_reference_activation.py): bf16 rounding 2^-8 relative plus 2^-18 of the term sizes
    for dh (silu' cancels near g = -1.28), and (F/32 + 11) float32 ulps of sum |a * d|, doubled,
    for dgate."""
    num_features = 384
    h, da, gates = make_inputs(333, num_features)
    dh, ag, dgate = nmoe_kernels.swiglu_backward_gated(h, da, gates)
    h64 = h.double().requires_grad_(True)
    g64 = gates.double().requires_grad_(True)
    a64 = torch.nn.functional.silu(h64[:, 0::2]) * h64[:, 1::2]
    z = g64[:, None] * a64
    (z * da.double()).sum().backward()
    g, u = h.double()[:, 0::2].abs(), h.double()[:, 1::2].abs()
    term = ((gates.double()[:, None] * da.double()).abs() * (u * (1 + g) + g))
    term = term.repeat_interleave(2, dim=1)
    assert ((dh.double() - h64.grad).abs() <= h64.grad.abs() * 2.0**-8 + term * 2.0**-18).all()
    assert ((ag.double() - z.detach()).abs() <= z.detach().abs() * (2.0**-8 + 2.0**-18)).all()
    magnitude = (a64.detach() * da.double()).abs().sum(dim=1)
    tol = 2 * (num_features / 32 + 11) * 2.0**-24 * magnitude
    assert ((dgate.double() - g64.grad).abs() <= tol).all()


def test_swiglu_backward_gated_argument_errors():
    h, da, gates = make_inputs(8, 128)
    with pytest.raises(ValueError, match="h_R2F must be .*F % 128"):
        nmoe_kernels.swiglu_backward_gated(h[:, :192].contiguous(), da[:, :96].contiguous(), gates)
    with pytest.raises(ValueError, match="da_RF must be bfloat16"):
        nmoe_kernels.swiglu_backward_gated(h, da.float(), gates)
    with pytest.raises(ValueError, match=r"da_RF must be \[R, F\]"):
        nmoe_kernels.swiglu_backward_gated(h, da[:4], gates)
    with pytest.raises(ValueError, match="gates_R must be float32"):
        nmoe_kernels.swiglu_backward_gated(h, da, gates.to(torch.bfloat16))
    with pytest.raises(ValueError, match="h_R2F must be contiguous"):
        nmoe_kernels.swiglu_backward_gated(h.t().contiguous().t(), da, gates)
    with pytest.raises(ValueError, match="da_RF must be a CUDA tensor"):
        nmoe_kernels.swiglu_backward_gated(h, da.cpu(), gates)
    with pytest.raises(ValueError, match="scale_layout"):
        nmoe_kernels.swiglu_backward_gated(h, da, gates, quantize_dh=True, scale_layout="x")
