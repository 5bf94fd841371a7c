"""The ``local`` backend against `nmoe_comm.reference` with one rank: bitwise, every method.

Also covers capacity, determinism, bad input, the backend registry, and (marker ``gpu``) the same
comparison on a CUDA device plus the workspace bound of ``buffer_size_hint``.
Run: ``pytest packages/nmoe-comm/tests/test_local.py``.
"""

from __future__ import annotations

import pytest
import torch

import nmoe_comm
from nmoe_comm import BackendUnavailableError, CapacityError, LocalDispatcher, reference
from nmoe_comm.testing import assert_bitwise_equal, random_routing

# (num_tokens, top_k, num_experts, hidden, routing): routing is "distinct" (K different experts
# per token), "repeat" (slots drawn independently, so tokens name an expert twice), "one" (every
# slot on one expert) or "gap" (experts 1 and 3 get nothing).
CASES = {
    "random": (37, 4, 8, 100, "distinct"),
    "no_tokens": (0, 2, 4, 64, "distinct"),
    "top1": (29, 1, 5, 100, "distinct"),
    "top8": (23, 8, 16, 100, "distinct"),
    "repeat": (31, 4, 3, 36, "repeat"),
    "all_on_one": (19, 3, 4, 100, "one"),
    "empty_experts": (25, 2, 6, 100, "gap"),
}


def _inputs(gen, case, dtype, device="cpu"):
    num_tokens, top_k, num_experts, hidden, routing = CASES[case]
    if routing == "one":
        expert = int(torch.randint(num_experts, (1,), generator=gen))
        ids = torch.full((num_tokens, top_k), expert)
        gates = torch.rand(num_tokens, top_k, generator=gen)
    else:
        allowed = torch.tensor([0, 2, 4, 5]) if routing == "gap" else None
        ids, gates = random_routing(num_tokens, top_k, num_experts, generator=gen,
                                    distinct=routing != "repeat", allowed_experts=allowed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    return x.to(device), ids.to(device), gates.to(device), num_experts


def _check_against_reference(gen, x, ids, gates, num_experts, dispatcher, *, exact_dots=True):
    """Run every method of ``dispatcher`` and of the reference and compare."""
    dtype, device = x.dtype, x.device
    got = dispatcher.dispatch(x, ids, gates)
    want = reference.dispatch([x.cpu()], [ids.cpu()], [gates.cpu()], num_experts)[0]
    for name in ("x_RD", "counts_E", "gates_R"):
        assert_bitwise_equal(getattr(got, name), getattr(want, name), name)
    assert_bitwise_equal(got.handle.gates_TK, want.handle.gates_TK, "handle.gates_TK")
    assert_bitwise_equal(got.handle.expert_ids_TK, want.handle.expert_ids_TK, "handle.expert_ids")
    assert (got.handle.num_tokens, got.handle.top_k, got.handle.hidden, got.handle.dtype) == (
        want.handle.num_tokens, want.handle.top_k, want.handle.hidden, want.handle.dtype)
    assert_bitwise_equal(got.offsets_E1, want.offsets_E1, "offsets_E1")

    num_rows, out_hidden = got.x_RD.shape[0], 11  # combine may change the width (D' != D)
    y = torch.randn(num_rows, out_hidden, generator=gen).to(dtype)
    other_gates = torch.rand(gates.shape, generator=gen).to(torch.bfloat16)
    assert_bitwise_equal(dispatcher.combine(y.to(device), got.handle),
                         reference.combine([y], [want.handle])[0], "combine")
    assert_bitwise_equal(dispatcher.combine(y.to(device), got.handle, other_gates.to(device)),
                         reference.combine([y], [want.handle], [other_gates])[0],
                         "combine with explicit gates")

    grad_x = torch.randn(got.x_RD.shape, generator=gen).to(dtype)
    assert_bitwise_equal(dispatcher.dispatch_backward(grad_x.to(device), got.handle),
                         reference.dispatch_backward([grad_x], [want.handle])[0],
                         "dispatch_backward")

    grad_out = torch.randn(x.shape[0], out_hidden, generator=gen).to(dtype)
    grad_y, grad_gates = dispatcher.combine_backward(grad_out.to(device), y.to(device), got.handle,
                                                     other_gates.to(device))
    ref_grad_ys, ref_grad_gates = reference.combine_backward([grad_out], [y], [want.handle],
                                                             [other_gates])
    assert_bitwise_equal(grad_y, ref_grad_ys[0], "grad_y")
    if exact_dots:
        assert_bitwise_equal(grad_gates, ref_grad_gates[0], "grad_gates")
    else:  # rule 3: the order of the dot product over D' is the backend's own.
        torch.testing.assert_close(grad_gates.cpu(), ref_grad_gates[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_local_equals_reference(gen, case, dtype):
    x, ids, gates, num_experts = _inputs(gen, case, dtype)
    dispatcher = LocalDispatcher(num_experts, capacity=max(1, ids.numel()))
    _check_against_reference(gen, x, ids, gates, num_experts, dispatcher)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_local_equals_reference_float64_and_int32_ids(gen, id_dtype):
    x, ids, gates, num_experts = _inputs(gen, "repeat", torch.float64)
    dispatcher = LocalDispatcher(num_experts, capacity=ids.numel(), validate=False)
    _check_against_reference(gen, x, ids.to(id_dtype), gates.double(), num_experts, dispatcher)


def test_routing_edge_cases_are_what_the_cases_claim(gen):
    """Guard the edge-case inputs themselves: a case that stopped covering its edge would
    silently weaken `test_local_equals_reference`."""
    x, ids, gates, num_experts = _inputs(gen, "empty_experts", torch.float32)
    counts = LocalDispatcher(num_experts, capacity=ids.numel()).dispatch(x, ids, gates).counts_E
    assert counts[1] == 0 and counts[3] == 0 and counts.sum() == ids.numel()
    x, ids, gates, num_experts = _inputs(gen, "all_on_one", torch.float32)
    counts = LocalDispatcher(num_experts, capacity=ids.numel()).dispatch(x, ids, gates).counts_E
    assert int(counts.max()) == ids.numel()
    assert x.shape[0] > 0 and _inputs(gen, "no_tokens", torch.float32)[0].shape[0] == 0


def test_capacity_boundary(gen):
    x, ids, gates, num_experts = _inputs(gen, "random", torch.bfloat16)
    rows = ids.numel()
    at_capacity = LocalDispatcher(num_experts, capacity=rows).dispatch(x, ids, gates)
    assert at_capacity.x_RD.shape[0] == rows
    with pytest.raises(CapacityError, match=f"routes {rows} rows to rank 0") as info:
        LocalDispatcher(num_experts, capacity=rows - 1).dispatch(x, ids, gates)
    assert (info.value.rows_needed, info.value.capacity) == (rows, rows - 1)


def test_deterministic(gen):
    x, ids, gates, num_experts = _inputs(gen, "repeat", torch.bfloat16)
    y = torch.randn(ids.numel(), 40, generator=gen).to(torch.bfloat16)
    grad_out = torch.randn(x.shape[0], 40, generator=gen).to(torch.bfloat16)
    runs = []
    for _ in range(2):
        dispatcher = LocalDispatcher(num_experts, capacity=ids.numel())
        received = dispatcher.dispatch(x, ids, gates)
        runs.append((received.x_RD, dispatcher.combine(y, received.handle),
                     *dispatcher.combine_backward(grad_out, y, received.handle),
                     dispatcher.dispatch_backward(received.x_RD, received.handle)))
    for name, a, b in zip(("x_RD", "combine", "grad_y", "grad_gates", "grad_x"), *runs):
        assert_bitwise_equal(a, b, name)


def _bad_dispatch_inputs(x, ids, gates):
    """(argument name, x, ids, gates) with exactly that argument broken."""
    meta = torch.device("meta")
    return [
        ("x_TD", x.to(torch.int32), ids, gates),
        ("x_TD", x[None], ids, gates),
        ("x_TD", x.t().contiguous().t(), ids, gates),
        ("x_TD", x.tolist(), ids, gates),
        ("expert_ids_TK", x, ids.float(), gates),
        ("expert_ids_TK", x, ids[:-1], gates),
        ("expert_ids_TK", x, ids.to(meta), gates),
        ("expert_ids_TK", x, ids[:, :0], gates[:, :0]),
        ("expert_ids_TK", x, ids * 0 + 8, gates),
        ("expert_ids_TK", x, ids * 0 - 1, gates),
        ("gates_TK", x, ids, gates[:, :-1]),
        ("gates_TK", x, ids, gates.to(torch.int64)),
        ("gates_TK", x, ids, gates.to(meta)),
    ]


def test_bad_input_names_the_argument(gen):
    x, ids, gates, num_experts = _inputs(gen, "random", torch.float32)
    dispatcher = LocalDispatcher(num_experts, capacity=10_000)
    for name, bad_x, bad_ids, bad_gates in _bad_dispatch_inputs(x, ids, gates):
        with pytest.raises((ValueError, TypeError), match=name):
            dispatcher.dispatch(bad_x, bad_ids, bad_gates)

    received = dispatcher.dispatch(x, ids, gates)
    handle, num_rows = received.handle, received.x_RD.shape[0]
    y = torch.randn(num_rows, 5, generator=gen)
    with pytest.raises(ValueError, match="y_RD"):
        dispatcher.combine(y[1:], handle)
    with pytest.raises(ValueError, match="y_RD"):
        dispatcher.combine(y.to(torch.int32), handle)
    with pytest.raises(ValueError, match="gates_TK"):
        dispatcher.combine(y, handle, gates[1:])
    with pytest.raises(ValueError, match="handle"):
        LocalDispatcher(num_experts, capacity=10_000).combine(y, handle)
    with pytest.raises(ValueError, match="grad_x_RD"):
        dispatcher.dispatch_backward(y, handle)
    with pytest.raises(ValueError, match="grad_out_TD"):
        dispatcher.combine_backward(torch.zeros(x.shape[0], 6), y, handle)
    dispatcher.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        dispatcher.dispatch(x, ids, gates)


def test_registry(gen):
    assert "local" in nmoe_comm.available_backends()
    x, ids, gates, num_experts = _inputs(gen, "random", torch.bfloat16)
    dispatcher = nmoe_comm.create_dispatcher("local", num_experts=num_experts,
                                             capacity=ids.numel(), validate=False)
    assert isinstance(dispatcher, LocalDispatcher) and not dispatcher.validate
    assert dispatcher.describe().startswith("local (rank 0/1")
    _check_against_reference(gen, x, ids, gates, num_experts, dispatcher)

    with pytest.raises(ValueError, match="unknown dispatcher backend 'deepep'.*available: ipc, "
                                         "local, nccl, nvshmem"):
        nmoe_comm.create_dispatcher("deepep", num_experts=8, capacity=8)
    if not torch.cuda.is_available():  # the GPU backends say what is missing, no fallback
        for name in ("ipc", "nvshmem"):
            with pytest.raises(BackendUnavailableError, match=f"'{name}' cannot run here: "):
                nmoe_comm.create_dispatcher(name, num_experts=8, capacity=8, world_size=2,
                                            hidden=16)
    with pytest.raises(ValueError, match="no option.*fast.*options are: validate"):
        nmoe_comm.create_dispatcher("local", num_experts=8, capacity=8, fast=True)
    with pytest.raises(ValueError, match="world_size=2"):
        nmoe_comm.create_dispatcher("local", num_experts=8, capacity=8, world_size=2, rank=1)
    with pytest.raises(ValueError, match="capacity"):
        nmoe_comm.create_dispatcher("local", num_experts=8, capacity=0)
    hint = nmoe_comm.buffer_size_hint("local", capacity=4096, hidden=1024, dtype=torch.bfloat16)
    assert hint == LocalDispatcher.buffer_size_hint(capacity=4096, hidden=1024,
                                                    dtype=torch.bfloat16)
    assert hint >= 4096 * 1024 * 2  # at least x_RD itself


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_local_on_cuda_equals_reference(gen, case, dtype):
    """On a GPU the data movement and the slot sums are elementwise IEEE ops, so they match the
    CPU reference bitwise; grad_gates' dot products reduce in another order (rule 3)."""
    x, ids, gates, num_experts = _inputs(gen, case, dtype, device="cuda")
    dispatcher = LocalDispatcher(num_experts, capacity=max(1, ids.numel()))
    _check_against_reference(gen, x, ids, gates, num_experts, dispatcher, exact_dots=False)


@pytest.mark.gpu
def test_buffer_size_hint_bounds_cuda_workspace(gen):
    num_tokens, top_k, num_experts, hidden, dtype = 4096, 8, 64, 1024, torch.bfloat16
    ids, gates = random_routing(num_tokens, top_k, num_experts, generator=gen, device="cuda")
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype).cuda()
    dispatcher = LocalDispatcher(num_experts, capacity=num_tokens * top_k)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    received = dispatcher.dispatch(x, ids, gates)
    dispatcher.combine(received.x_RD, received.handle)
    torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated() - base
    hint = LocalDispatcher.buffer_size_hint(capacity=num_tokens * top_k, hidden=hidden,
                                            dtype=dtype)
    assert used <= hint, f"dispatch + combine used {used} bytes, hint says {hint}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_local_sync_free_equals_reference(gen, dtype):
    """``dispatch(..., sync=False)`` (contract rule 7) on one rank: every one-rank case of
    `testing.GROUP_CASES` plus a rank without tokens and an FP8 dispatch, bitwise against the
    reference, ``num_received`` = R; the id range check moves to ``check_dispatch``."""
    from nmoe_comm import testing

    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    # One rank has 4 experts: nothing to avoid, and K = 8 distinct experts do not exist.
    cases = {name: case for name, case in testing.GROUP_CASES.items()
             if case.routing != "avoid_last_rank" and case.top_k <= 4}
    cases["no_tokens"] = testing.GroupCase((0,), 2, 48, 24, "distinct")
    dispatcher = LocalDispatcher(testing.group_num_experts(1),
                                 capacity=testing.group_capacity(cases, 1))
    gather = lambda obj: [obj]  # noqa: E731 (one rank)
    for name, case in cases.items():
        testing.check_group_case(dispatcher, name, case, dtype, seed, gather, "cpu", sync=False)
    testing.check_group_case(dispatcher, "fp8", testing.FP8_GROUP_CASES["fp8_random"], dtype,
                             seed, gather, "cpu", fp8=True, sync=False)
    x, ids, gates = testing.rank_inputs(cases["random"], "random", 0, 1, dtype, seed)
    ids[0, 0] = dispatcher.num_experts
    got = dispatcher.dispatch(x, ids, gates, sync=False)  # no check here, no host sync
    with pytest.raises(ValueError, match="expert_ids_TK holds expert id"):
        dispatcher.check_dispatch(got.handle)
    with pytest.raises(ValueError, match="handle was not produced by this"):
        LocalDispatcher(4, capacity=8).check_dispatch(got.handle)
