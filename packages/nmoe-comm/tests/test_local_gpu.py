"""The ``local`` backend's CUDA slot sum (`nmoe_comm._C.sum_slots`) against the torch loop, bitwise
(marker ``gpu``; one GPU).

`_sum_slots_cuda` is compared with `_sum_slots_torch` (its reference, run on the same GPU, where
torch's per-slot ops round exactly as rule 2 says) on rows drawn fresh each run: bf16, fp16 and
fp32; D in {1, 7, 128, 768, 7168, 2050} (16-byte, 4-byte and 1-element accesses); K in
{1, 2, 7, 8, 9, 17} (9 and 17 cross the kernel's batch of 8 slots); T in {0, 1, 1000}; with and
without gates; routings from real dispatches (random, every row on one expert) and arbitrary row
indices that repeat rows. Values mix ordinary magnitudes with exact zeros, negative zeros,
subnormals and a wide exponent range, so rounding, the sign of zero and denormal handling all
show. Before each kernel call the caching allocator is handed a 0xFF-filled block of the
output's size, so a skipped element cannot pass by reusing the reference's memory. Also:
unaligned and non-contiguous rows, the current stream, and `combine` / `dispatch_backward`
through the public API against `nmoe_comm.reference`.

Run: ``pytest -m gpu packages/nmoe-comm/tests/test_local_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from nmoe_comm import LocalDispatcher, _extension, reference
from nmoe_comm.local import _sum_slots_cuda, _sum_slots_torch
from nmoe_comm.testing import assert_bitwise_equal, random_routing

pytestmark = pytest.mark.gpu

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HIDDENS = (1, 7, 128, 768, 7168, 2050)
TOP_KS = (1, 2, 7, 8, 9, 17)
NUM_TOKENS = (0, 1, 1000)
ROUTINGS = ("random", "one_expert", "any_rows")


@pytest.fixture
def kernel():
    """The compiled kernel; a GPU run without it would compare the torch loop with itself."""
    found = _extension.slot_sum_kernel()
    assert found is not None, _extension.missing_slot_sum()
    return found


@pytest.fixture
def cuda_gen(gen) -> torch.Generator:
    """A CUDA generator seeded from the test's (printed, replayable) CPU generator."""
    seed = int(torch.randint(2**62, (1,), generator=gen))
    return torch.Generator(device="cuda").manual_seed(seed)


def spread_rows(gen: torch.Generator, num_rows: int, hidden: int, dtype: torch.dtype):
    """``[num_rows, hidden]`` on the GPU: half normal values, a quarter spread over the dtype's
    finite exponent range (subnormals included), the rest exact +0 and -0. Sums of up to 17 such
    values times a normal gate stay finite (fp16: |x| < 2**8 * 6)."""
    shape = (num_rows, hidden)
    normal = torch.randn(shape, generator=gen, device="cuda")
    low, high = (-24, 8) if dtype == torch.float16 else (-135, 60)
    scale = torch.exp2(torch.randint(low, high, shape, generator=gen, device="cuda").float())
    pick = torch.rand(shape, generator=gen, device="cuda")
    signed_zero = torch.where(pick < 0.875, 0.0, -0.0)
    x = torch.where(pick < 0.5, normal, torch.where(pick < 0.75, normal * scale, signed_zero))
    return x.to(dtype)


def row_of_slot(gen: torch.Generator, routing: str, num_tokens: int, top_k: int):
    """(int64 ``[T, K]`` row index per slot, number of rows R) for a named routing."""
    num_experts = 32
    if routing == "any_rows":  # any index in [0, R), rows gathered by several slots
        num_rows = 37
        rows = torch.randint(num_rows, (num_tokens, top_k), generator=gen, device="cuda")
        return rows, num_rows
    if routing == "one_expert":
        ids = torch.full((num_tokens, top_k), 5, dtype=torch.int64, device="cuda")
    else:
        cpu_gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=gen,
                                                                  device="cuda")))
        ids = random_routing(num_tokens, top_k, num_experts, generator=cpu_gen, distinct=False,
                             device="cuda")[0]
    gates = torch.ones(num_tokens, top_k, device="cuda")
    x = torch.zeros(num_tokens, 1, device="cuda")  # only the routing matters
    dispatcher = LocalDispatcher(num_experts, capacity=max(1, num_tokens * top_k))
    handle = dispatcher.dispatch(x, ids, gates).handle
    return handle.state.row_of_slot_TK, num_tokens * top_k


def poison_allocator(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Leave a freed 0xFF-filled block of this tensor size in torch's caching allocator."""
    nbytes = max(1, torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size())
    block = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device="cuda")
    del block


def check_case(kernel, y_RD, rows_TK, gates_TK, tag):
    want = _sum_slots_torch(y_RD, rows_TK, gates_TK)
    poison_allocator(want.shape, want.dtype)
    got = _sum_slots_cuda(kernel, y_RD, rows_TK, gates_TK)
    assert_bitwise_equal(got, want, tag)


@pytest.mark.parametrize("hidden", HIDDENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_equals_torch_loop(kernel, cuda_gen, dtype, hidden):
    for routing in ROUTINGS:
        for top_k in TOP_KS:
            for num_tokens in NUM_TOKENS:
                rows_TK, num_rows = row_of_slot(cuda_gen, routing, num_tokens, top_k)
                y_RD = spread_rows(cuda_gen, num_rows, hidden, dtype)
                gates_TK = torch.randn(num_tokens, top_k, generator=cuda_gen, device="cuda")
                tag = f"{dtype} D={hidden} K={top_k} T={num_tokens} {routing}"
                check_case(kernel, y_RD, rows_TK, None, f"{tag}, no gates")
                check_case(kernel, y_RD, rows_TK, gates_TK, f"{tag}, gates")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_and_strided_rows(kernel, cuda_gen, dtype):
    """Rows at an odd element offset (no vector access is aligned), rows that are a transposed
    view (copied), and bf16 gates (rounded to float32 as the loop does)."""
    num_tokens, top_k, hidden = 300, 7, 768
    rows_TK, num_rows = row_of_slot(cuda_gen, "random", num_tokens, top_k)
    flat = spread_rows(cuda_gen, 1, num_rows * hidden + 1, dtype).view(-1)
    offset_RD = flat[1:].view(num_rows, hidden)
    assert offset_RD.data_ptr() % 16 != 0
    transposed_RD = spread_rows(cuda_gen, hidden, num_rows, dtype).t()
    gates_TK = torch.rand(num_tokens, top_k, generator=cuda_gen, device="cuda")
    for name, y_RD in (("offset", offset_RD), ("transposed", transposed_RD)):
        check_case(kernel, y_RD, rows_TK, gates_TK, f"{dtype} {name} rows")
        check_case(kernel, y_RD, rows_TK, gates_TK.to(torch.bfloat16),
                   f"{dtype} {name} rows, bf16 gates")


def test_runs_on_the_current_stream(kernel, cuda_gen):
    num_tokens, top_k, hidden = 4096, 8, 2048
    rows_TK, num_rows = row_of_slot(cuda_gen, "random", num_tokens, top_k)
    y_RD = spread_rows(cuda_gen, num_rows, hidden, torch.bfloat16)
    want = _sum_slots_torch(y_RD, rows_TK, None)
    target = torch.zeros_like(y_RD)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)  # the copy below lands well after a wrong-stream launch
        target.copy_(y_RD)
        got = _sum_slots_cuda(kernel, target, rows_TK, None)
    torch.cuda.current_stream().wait_stream(stream)
    assert_bitwise_equal(got, want, "slot sum on a side stream")


@pytest.mark.parametrize("hidden", HIDDENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_combine_and_dispatch_backward_equal_reference(gen, cuda_gen, dtype, hidden):
    """Through the public API (which takes the kernel on CUDA): combine with the dispatch's gates
    and with explicit gates, and dispatch_backward, against the reference with one rank."""
    num_experts, top_k = 16, 8
    for num_tokens, routing in ((1000, "random"), (1000, "one_expert"), (1, "random"),
                                (0, "random")):
        if routing == "one_expert":
            ids = torch.full((num_tokens, top_k), 3, dtype=torch.int64)
            gates = torch.rand(num_tokens, top_k, generator=gen)
        else:
            ids, gates = random_routing(num_tokens, top_k, num_experts, generator=gen)
        x = spread_rows(cuda_gen, num_tokens, hidden, dtype)
        dispatcher = LocalDispatcher(num_experts, capacity=max(1, ids.numel()))
        got = dispatcher.dispatch(x, ids.cuda(), gates.cuda())
        want = reference.dispatch([x.cpu()], [ids], [gates], num_experts)[0]
        y = spread_rows(cuda_gen, got.x_RD.shape[0], hidden, dtype)
        other_gates = torch.randn(num_tokens, top_k, generator=gen)
        tag = f"{dtype} D={hidden} T={num_tokens} {routing}"
        assert_bitwise_equal(dispatcher.combine(y, got.handle),
                             reference.combine([y.cpu()], [want.handle])[0], f"{tag}: combine")
        assert_bitwise_equal(dispatcher.combine(y, got.handle, other_gates.cuda()),
                             reference.combine([y.cpu()], [want.handle], [other_gates])[0],
                             f"{tag}: combine with explicit gates")
        assert_bitwise_equal(dispatcher.dispatch_backward(y, got.handle),
                             reference.dispatch_backward([y.cpu()], [want.handle])[0],
                             f"{tag}: dispatch_backward")


def test_describe_reports_the_kernel(kernel):
    assert LocalDispatcher(8, capacity=8).describe().endswith("CUDA slot sums: nmoe_comm._C kernel")
