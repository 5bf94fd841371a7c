"""The CUDA permute / unpermute / gather_rows ops against the torch references, bitwise (one GPU).

Routings are drawn fresh per run and cover T = 0, K in {1, 2, 8}, all rows on one expert, empty
experts, tokens that pick one expert twice, D not a multiple of 8 or 128 (D = 100, 3) and several
sort chunks (T * K > 2048). The references run on CPU. The ops allocate their outputs; before each
call the caching allocator is handed back blocks of the same sizes filled with 0xFF, so a kernel
that skips an element leaves garbage that the comparison catches.
"""

from __future__ import annotations

import pytest
import torch

import nmoe_kernels
import nmoe_kernels._C as C
from nmoe_kernels import reference as ref

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _require_cuda_build():
    assert C.WITH_CUDA, (
        "nmoe_kernels._C was built without nvcc; install the CUDA toolkit >= 12.8 and rebuild "
        "(pip install --no-build-isolation -e packages/nmoe-kernels)"
    )


def poison_allocator(*nbytes: int) -> None:
    """Leave freed 0xFF-filled blocks of these sizes in torch's caching allocator."""
    blocks = [torch.full((max(n, 1),), 0xFF, dtype=torch.uint8, device="cuda") for n in nbytes]
    del blocks


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.cpu(), want.cpu()
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got_bytes = got.contiguous().view(torch.uint8).reshape(-1)
    want_bytes = want.contiguous().view(torch.uint8).reshape(-1)
    bad = (got_bytes != want_bytes).nonzero()
    if bad.numel():
        first = bad[0].item() // got.element_size()
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), got.shape))
        raise AssertionError(
            f"{what}: {bad.shape[0]} bytes differ; first at {index}: got {got[index].item()!r}, "
            f"want {want[index].item()!r}"
        )


def routing(case: str):
    """(expert_ids_TK int64, num_experts, D) for a named routing."""
    if case == "t0":
        return torch.zeros(0, 2, dtype=torch.int64), 4, 64
    if case == "k1_all_on_one":
        return torch.full((300, 1), 3, dtype=torch.int64), 5, 100
    if case == "k2_repeats_empty_expert":
        ids = torch.randint(0, 16, (3000, 2))
        ids[ids == 7] = 8  # expert 7 gets no rows
        return ids, 16, 100
    if case == "k8_distinct":
        num_tokens, num_experts = 1000, 64
        ids = torch.rand(num_tokens, num_experts).argsort(dim=1)[:, :8]
        return ids, num_experts, 768
    if case == "k8_many_chunks":
        return torch.randint(0, 256, (4100, 8)), 256, 128
    if case == "k2_max_experts":
        return torch.randint(0, 1024, (1500, 2)), 1024, 3
    raise ValueError(case)


CASES = [
    "t0",
    "k1_all_on_one",
    "k2_repeats_empty_expert",
    "k8_distinct",
    "k8_many_chunks",
    "k2_max_experts",
]


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_permute_unpermute_are_bitwise_equal_to_reference(case, dtype, ids_dtype):
    expert_ids, num_experts, hidden = routing(case)
    expert_ids = expert_ids.to(ids_dtype)
    num_tokens, top_k = expert_ids.shape
    num_rows = num_tokens * top_k
    x = torch.randn(num_tokens, hidden).to(dtype)
    want_rows, want_counts, want_src = ref.permute(x, expert_ids, num_experts)

    size = torch.tensor([], dtype=dtype).element_size()
    poison_allocator(num_rows * hidden * size, num_experts * 8, num_rows * 8)
    got_rows, got_counts, got_src = nmoe_kernels.permute(x.cuda(), expert_ids.cuda(), num_experts)
    assert_bitwise_equal(got_rows, want_rows, f"x_RD ({case})")
    assert_bitwise_equal(got_counts, want_counts, f"counts_E ({case})")
    assert_bitwise_equal(got_src, want_src, f"src_index_R ({case})")
    if case in ("k1_all_on_one", "k2_repeats_empty_expert"):
        assert (want_counts == 0).any()

    y = torch.randn(num_rows, hidden).to(dtype)
    for gates in (torch.rand(num_tokens, top_k), torch.rand(num_tokens, top_k).bfloat16()):
        for out_dtype in (None, torch.float32, torch.bfloat16):
            want = ref.unpermute(y, want_src, gates, num_tokens, out_dtype=out_dtype)
            poison_allocator(num_tokens * hidden * 4, num_rows * 4)
            got = nmoe_kernels.unpermute(
                y.cuda(), got_src, gates.cuda(), num_tokens, out_dtype=out_dtype
            )
            assert_bitwise_equal(got, want, f"unpermute ({case}, gates {gates.dtype}, {out_dtype})")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_unpermute_with_missing_slots_and_tokens_without_rows(dtype):
    num_tokens, top_k, hidden = 500, 4, 100
    kept = torch.randperm(num_tokens * top_k)[: num_tokens * top_k // 3]  # many tokens get none
    y = torch.randn(kept.numel(), hidden).to(dtype)
    gates = torch.randn(num_tokens, top_k)
    want = ref.unpermute(y, kept, gates, num_tokens)
    assert (want == 0).all(dim=1).any()
    for index in (kept, kept.int()):
        poison_allocator(num_tokens * hidden * 4)
        got = nmoe_kernels.unpermute(y.cuda(), index.cuda(), gates.cuda(), num_tokens)
        assert_bitwise_equal(got, want, f"unpermute with missing slots ({index.dtype})")


def test_permute_round_trip_with_unit_gates_is_exact():
    x = torch.randn(2048, 256, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 32, (2048, 1), device="cuda")
    rows, counts, src = nmoe_kernels.permute(x, ids, 32)
    assert int(counts.sum()) == 2048
    back = nmoe_kernels.unpermute(rows, src, torch.ones(2048, 1, device="cuda"), 2048)
    assert torch.equal(back, x)


def test_permute_places_out_of_range_ids_last():
    """Not checked on the GPU (no host sync): such slots follow every expert, in slot order."""
    ids = torch.randint(0, 6, (700, 3))
    ids[::5, 1] = -1
    ids[::7, 2] = 6
    x = torch.randn(700, 40)
    rows, counts, src = nmoe_kernels.permute(x.cuda(), ids.cuda(), 6)
    flat = ids.reshape(-1)
    invalid = (flat < 0) | (flat >= 6)
    buckets = torch.where(invalid, torch.full_like(flat, 6), flat)
    want_src = torch.sort(buckets, stable=True).indices
    assert torch.equal(src.cpu(), want_src)
    assert torch.equal(counts.cpu(), torch.bincount(flat[~invalid], minlength=6))
    assert torch.equal(rows.cpu(), x[want_src // 3])


@pytest.mark.parametrize(
    "dtype,hidden",
    [(torch.bfloat16, 100), (torch.float32, 768), (torch.uint8, 3), (torch.float8_e4m3fn, 200)],
)
def test_gather_rows_is_bitwise_equal_to_reference(dtype, hidden):
    x = torch.randn(333, hidden).mul(8).to(dtype)
    index = torch.randint(0, 333, (1000,))  # repeats
    want = ref.gather_rows(x, index)
    for idx in (index, index.int(), index[:0]):
        poison_allocator(idx.numel() * hidden * x.element_size())
        got = nmoe_kernels.gather_rows(x.cuda(), idx.cuda())
        assert_bitwise_equal(got, ref.gather_rows(x, idx), f"gather_rows {dtype} {idx.dtype}")
    assert want.shape == (1000, hidden)
    bad = torch.tensor([0, -1, 333, 5])
    got = nmoe_kernels.gather_rows(x.cuda(), bad.cuda()).cpu()
    assert_bitwise_equal(got[[0, 3]], x[[0, 5]], "in-range rows")
    assert (got[1:3].view(torch.uint8) == 0).all(), "out-of-range rows must be zeros"


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(16, 128, device="cuda")
    ids = torch.randint(0, 4, (16, 2), device="cuda")
    with pytest.raises(ValueError, match="num_experts must lie in"):
        nmoe_kernels.permute(x, ids, 2000)
    with pytest.raises(ValueError, match="int32 or int64"):
        nmoe_kernels.permute(x, ids.float(), 4)
    with pytest.raises(ValueError, match="T = 16"):
        nmoe_kernels.permute(x, ids[:8], 4)
    with pytest.raises(ValueError, match="contiguous"):
        nmoe_kernels.permute(x.t(), ids, 4)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        nmoe_kernels.permute(x, ids.cpu(), 4)
    rows, _, src = nmoe_kernels.permute(x, ids, 4)
    gates = torch.rand(16, 2, device="cuda")
    with pytest.raises(ValueError, match="num_tokens is 15"):
        nmoe_kernels.unpermute(rows, src, gates, 15)
    with pytest.raises(ValueError, match="src_index_R must have 32 entries"):
        nmoe_kernels.unpermute(rows, src[:5], gates, 16)
    with pytest.raises(ValueError, match="out_dtype"):
        nmoe_kernels.unpermute(rows, src, gates, 16, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="16-byte aligned"):
        nmoe_kernels.gather_rows(x.view(-1)[1 : 1 + 15 * 128].view(15, 128), src[:3])
