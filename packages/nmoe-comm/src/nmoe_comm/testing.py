"""Helpers for testing dispatcher backends: random routing, bitwise comparison, and the
multi-rank checks every expert-parallel backend runs (`check_group_case`).

Shared by this package's tests, the gloo CPU tests of ``nccl`` and the torchrun GPU worker
(``tests/multigpu_worker.py``), so that every backend is checked against `nmoe_comm.reference`
with the same inputs. Letters as in `nmoe_comm.dispatcher`.
"""

from __future__ import annotations

import gc
import hashlib
import weakref
from dataclasses import dataclass

import torch

# Before any process group exists: imported later (torch.optim's first optimizer and torch._dynamo
# import it), its ``group=group.WORLD`` default arguments would keep the default group alive past
# destroy_process_group, and `leave_process_group` would (rightly) fail. Workers that import this
# module before init_process_group are covered.
import torch.distributed.nn.functional  # noqa: F401

from nmoe_comm import reference


def random_routing(
    num_tokens: int,
    top_k: int,
    num_experts: int,
    *,
    generator: torch.Generator,
    distinct: bool = True,
    allowed_experts: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random router output.

    Args:
        num_tokens: ``T`` (may be 0).
        top_k: ``K``.
        num_experts: ``E``.
        generator: a CPU generator; values are drawn on the CPU and then moved to ``device``.
        distinct: each token names K different experts (needs ``K <= E``, or ``K <=`` the number
            of allowed experts); otherwise slots are drawn independently, so a token may name
            one expert in several slots.
        allowed_experts: int64 ``[E']`` ids to draw from (default: all ``E``).
        device: where the results go.

    Returns:
        ``(expert_ids_TK, gates_TK)``: int64 ``[T, K]`` and float32 ``[T, K]`` gates in (0, 1].
    """
    pool = torch.arange(num_experts) if allowed_experts is None else allowed_experts.cpu()
    if distinct:
        if top_k > pool.numel():
            raise ValueError(f"distinct routing needs top_k <= {pool.numel()} experts, got {top_k}")
        scores = torch.rand(num_tokens, pool.numel(), generator=generator)
        choice_TK = torch.argsort(scores, dim=1)[:, :top_k]
    else:
        choice_TK = torch.randint(pool.numel(), (num_tokens, top_k), generator=generator)
    gates_TK = 1.0 - torch.rand(num_tokens, top_k, generator=generator)
    return pool[choice_TK].to(device), gates_TK.to(device)


def _scalar(value: torch.Tensor) -> float | int:
    return value.double().item() if value.is_floating_point() else value.item()


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Raise AssertionError unless the tensors have equal shape, dtype and bits.

    Bits, not values: -0.0 differs from 0.0 and NaNs compare by payload. The message gives the
    number of differing elements, the first differing coordinate and the largest difference.
    """
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(
            f"{what}: got shape {tuple(actual.shape)} {actual.dtype}, expected "
            f"{tuple(expected.shape)} {expected.dtype}"
        )
    a, e = actual.detach().cpu().contiguous(), expected.detach().cpu().contiguous()
    if a.is_floating_point():
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        differ = a.view(bits) != e.view(bits)
    else:
        differ = a != e
    if not bool(differ.any()):
        return
    first = tuple(int(i) for i in torch.nonzero(differ)[0])
    message = (
        f"{what}: {int(differ.sum())} of {a.numel()} elements differ; first at {first}: "
        f"got {_scalar(a[first])!r}, expected {_scalar(e[first])!r}"
    )
    if a.is_floating_point():
        diff = (a.double() - e.double()).abs()
        message += f"; max abs diff {diff.max().item():.3e}"
    raise AssertionError(message)


# ------------------------------------------------------------------------------------------
# Multi-rank checks: one process per rank (gloo on CPU, torchrun on GPUs), every rank's result
# compared bitwise with `nmoe_comm.reference` run over all ranks' inputs.


@dataclass(frozen=True)
class GroupCase:
    """Inputs of one multi-rank check; rank ``r`` gets ``tokens[r % len(tokens)]`` tokens.

    Attributes:
        tokens: tokens per rank (the pattern repeats over ranks); 0 gives a rank without rows.
        top_k: ``K``.
        hidden: ``D`` of the dispatched rows.
        out_hidden: ``D'`` of the combined rows.
        routing: "distinct" (K different experts per token), "repeat" (slots drawn
            independently), "one" (every slot of every rank on expert 1), "avoid_last_rank"
            (no slot names an expert of the last rank, which then receives nothing).
    """

    tokens: tuple[int, ...]
    top_k: int
    hidden: int
    out_hidden: int
    routing: str


#: The cases every multi-rank backend runs (CPU over gloo and GPU); ``E = 4 * W``.
GROUP_CASES: dict[str, GroupCase] = {
    "random": GroupCase((37, 29, 41, 33), 4, 100, 11, "distinct"),
    "repeat": GroupCase((31, 17, 26), 4, 36, 36, "repeat"),
    "avoid_last_rank": GroupCase((25, 30), 2, 64, 40, "avoid_last_rank"),
    "all_on_one": GroupCase((19, 23), 3, 40, 8, "one"),
    "top1": GroupCase((29, 21), 1, 72, 72, "distinct"),
    "top8": GroupCase((23, 27), 8, 136, 130, "distinct"),
    "no_tokens_on_rank1": GroupCase((21, 0, 17), 2, 48, 24, "distinct"),
}

#: Larger cases for the GPU backends (multi-block launches, 16-byte vector paths).
GPU_GROUP_CASES: dict[str, GroupCase] = {
    "decode": GroupCase((128,), 8, 7168, 7168, "distinct"),
    "prefill": GroupCase((1024, 777), 6, 2048, 2048, "distinct"),
}

#: FP8 dispatch cases (``D % 128 == 0``).
FP8_GROUP_CASES: dict[str, GroupCase] = {
    "fp8_random": GroupCase((37, 0, 29), 4, 256, 256, "distinct"),
    "fp8_decode": GroupCase((128,), 8, 7168, 7168, "distinct"),
}


def group_num_experts(world_size: int) -> int:
    """``E`` of the multi-rank checks: 4 experts per rank."""
    return 4 * world_size


def group_capacity(cases: dict[str, GroupCase], world_size: int) -> int:
    """A capacity that holds every case's worst-case routing (``max T * K * W``)."""
    return max(max(c.tokens) * c.top_k for c in cases.values()) * world_size


def _on_owner(dispatcher) -> bool:
    """Whether ``dispatcher`` sums a combine without gates (and the dispatch backward) on the
    owners (``reduce_on_owner``): what the reference must compute to compare bitwise."""
    return bool(getattr(dispatcher, "owner_sums_active", False))


def _case_generator(seed: int, rank: int, name: str, what: str) -> torch.Generator:
    key = f"{seed}/{rank}/{name}/{what}".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:6], "little"))


def rank_inputs(
    case: GroupCase, name: str, rank: int, world_size: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_TD, expert_ids_TK, gates_TK)`` of rank ``rank`` for ``case`` (CPU tensors)."""
    gen = _case_generator(seed, rank, name, "inputs")
    num_tokens = case.tokens[rank % len(case.tokens)]
    num_experts = group_num_experts(world_size)
    if case.routing == "one":
        ids = torch.full((num_tokens, case.top_k), 1, dtype=torch.int64)
        gates = torch.rand(num_tokens, case.top_k, generator=gen)
    else:
        allowed = None
        if case.routing == "avoid_last_rank":
            allowed = torch.arange(num_experts - num_experts // world_size)
        ids, gates = random_routing(num_tokens, case.top_k, num_experts, generator=gen,
                                    distinct=case.routing != "repeat", allowed_experts=allowed)
    x = torch.randn(num_tokens, case.hidden, generator=gen).to(dtype)
    return x, ids, gates


def _rand_rows(gen: torch.Generator, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(rows, cols, generator=gen).to(dtype)


def _padded(rows_RD: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``rows_RD`` followed by NaN rows up to ``num_rows`` (a sync-free dispatch's row count):
    a backend that read a row past R would put NaN into a compared result."""
    pad = torch.full((num_rows - rows_RD.shape[0], rows_RD.shape[1]), float("nan"),
                     dtype=rows_RD.dtype)
    return torch.cat([rows_RD, pad]) if pad.shape[0] else rows_RD


def _received_rows(dispatcher, got, num_rows: int, sync: bool, tag: str) -> int:
    """Check ``got.num_received`` against the reference's R; return ``x_RD``'s row count."""
    if sync:
        assert got.num_received is None, f"{tag}: num_received of a synchronous dispatch"
        assert got.x_RD.shape[0] == num_rows, f"{tag}: x_RD has {got.x_RD.shape[0]} rows"
        return num_rows
    assert got.num_received is not None and got.num_received.dtype == torch.int64, tag
    received = int(got.num_received.cpu()[0])
    assert received == num_rows, f"{tag}: num_received {received}, reference R {num_rows}"
    rows = got.x_RD.shape[0]
    assert num_rows <= rows <= dispatcher.capacity, f"{tag}: x_RD has {rows} rows"
    assert got.gates_R.shape[0] == rows, f"{tag}: gates_R has {got.gates_R.shape[0]} rows"
    return rows


def dot_tolerance(abs_dots: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Worst-case difference of two float32 (float64) dot products of ``length`` terms summed in
    different orders: ``2 * gamma_n * sum |a_i b_i|`` with ``gamma_n = n u / (1 - n u)``
    (recursive summation bound), ``u`` the unit roundoff; ``abs_dots`` holds ``sum |a_i b_i|``."""
    unit = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    gamma = length * unit / (1 - length * unit)
    return 2 * gamma * abs_dots.double() + 1e-30


def check_group_case(
    dispatcher,
    name: str,
    case: GroupCase,
    dtype: torch.dtype,
    seed: int,
    gather,
    device: torch.device | str,
    *,
    fp8: bool = False,
    sync: bool = True,
) -> None:
    """Run every method of ``dispatcher`` (this rank) and compare with the reference.

    Args:
        dispatcher: this rank's multi-rank `Dispatcher` (``E = group_num_experts(W)``).
        name: the case's name (part of the seeds and of every message).
        case: the inputs.
        dtype: row dtype.
        seed: shared by all ranks; each rank draws its own inputs from it.
        gather: ``gather(obj) -> [obj of rank 0, obj of rank 1, ...]`` (an all_gather_object).
        device: where this rank's tensors live.
        fp8: run the FP8 dispatch (rule 6).
        sync: False runs the sync-free dispatch (rule 7): the first R rows of every row tensor
            are compared, ``num_received`` must be R, and the rows past R handed to combine and
            the backwards are NaN (a backend that read them would fail the comparison).

    Raises:
        AssertionError naming the case, dtype, rank, seed and the first differing element.
    """
    rank, world_size = dispatcher.rank, dispatcher.world_size
    tag = f"case {name}, {dtype}, fp8={fp8}, sync={sync}, rank {rank}/{world_size}, seed {seed}"
    num_experts = group_num_experts(world_size)
    x, ids, gates = rank_inputs(case, name, rank, world_size, dtype, seed)
    xs, idss, gatess = zip(*gather((x, ids, gates)))
    want = reference.dispatch(list(xs), list(idss), list(gatess), num_experts, fp8=fp8)
    handles = [w.handle for w in want]
    got = dispatcher.dispatch(x.to(device), ids.to(device), gates.to(device), fp8=fp8,
                              sync=sync)
    mine = want[rank]
    num_rows = mine.x_RD.shape[0]
    rows = _received_rows(dispatcher, got, num_rows, sync, tag)
    for field in ("x_RD", "counts_E", "gates_R", "x_scales_RG"):
        if getattr(mine, field) is None:
            assert getattr(got, field) is None, f"{tag}: {field} should be None"
            continue
        value = getattr(got, field)
        if field != "counts_E":
            assert value.shape[0] == rows, f"{tag}: {field} has {value.shape[0]} rows"
            value = value[:num_rows]
        assert_bitwise_equal(value, getattr(mine, field), f"{tag}: {field}")
    assert_bitwise_equal(got.offsets_E1, mine.offsets_E1, f"{tag}: offsets_E1")
    assert (got.handle.num_tokens, got.handle.top_k, got.handle.hidden, got.handle.dtype) == (
        mine.handle.num_tokens, mine.handle.top_k, mine.handle.hidden, mine.handle.dtype), tag
    dispatcher.check_dispatch(got.handle)  # nothing to raise

    gen = _case_generator(seed, rank, name, "grads")
    y = _rand_rows(gen, num_rows, case.out_hidden, dtype)
    other_gates = torch.rand(x.shape[0], case.top_k, generator=gen).to(torch.bfloat16)
    grad_x = _rand_rows(gen, num_rows, case.hidden, dtype)
    grad_out = _rand_rows(gen, x.shape[0], case.out_hidden, dtype)
    ys, other, grad_xs, grad_outs = zip(*gather((y, other_gates, grad_x, grad_out)))
    y_dev, grad_x_dev = _padded(y, rows).to(device), _padded(grad_x, rows).to(device)

    on_owner = _on_owner(dispatcher)
    assert_bitwise_equal(dispatcher.combine(y_dev, got.handle),
                         reference.combine(ys, handles, reduce_on_owner=on_owner)[rank],
                         f"{tag}: combine")
    assert_bitwise_equal(dispatcher.combine(y_dev, got.handle, other_gates.to(device)),
                         reference.combine(ys, handles, other)[rank],
                         f"{tag}: combine with explicit gates")
    assert_bitwise_equal(dispatcher.dispatch_backward(grad_x_dev, got.handle),
                         reference.dispatch_backward(grad_xs, handles,
                                                     reduce_on_owner=on_owner)[rank],
                         f"{tag}: dispatch_backward")
    grad_y, grad_gates = dispatcher.combine_backward(grad_out.to(device), y_dev,
                                                     got.handle, other_gates.to(device))
    want_grad_ys, want_grad_gates = reference.combine_backward(grad_outs, ys, handles, other)
    assert grad_y.shape[0] == rows, f"{tag}: combine_backward grad_y has {grad_y.shape[0]} rows"
    assert_bitwise_equal(grad_y[:num_rows], want_grad_ys[rank],
                         f"{tag}: combine_backward grad_y")
    abs_dots = reference.combine_backward([g.abs() for g in grad_outs], [v.abs() for v in ys],
                                          handles)[1][rank]
    got_dots, want_dots = grad_gates.detach().cpu().double(), want_grad_gates[rank].double()
    assert grad_gates.dtype == want_grad_gates[rank].dtype, f"{tag}: grad_gates dtype"
    bound = dot_tolerance(abs_dots, case.out_hidden, dtype)
    excess = (got_dots - want_dots).abs() - bound
    assert not bool((excess > 0).any()), (
        f"{tag}: combine_backward grad_gates off by more than the summation-order bound at "
        f"{tuple(torch.nonzero(excess > 0)[0].tolist())}"
    )


def check_capacity_error(dispatcher, seed: int, gather, device, *, sync: bool = True) -> None:
    """A dispatch routing more than ``capacity`` rows to a rank raises `CapacityError` on every
    rank, naming the same owner and row count as the reference; the dispatcher keeps working.
    With ``sync=False`` the dispatch returns, moves nothing (``num_received`` and ``counts_E``
    are 0) and `Dispatcher.check_dispatch` raises the error; combine and the backwards of that
    handle still run on every rank (unspecified values, no fault, no hang).

    ``dispatcher.capacity`` must be below the busiest owner's rows of the "all_on_one" case
    (every slot on expert 1, owned by rank 0).
    """
    from nmoe_comm.dispatcher import CapacityError

    name, case = "all_on_one", GROUP_CASES["all_on_one"]
    rank, world_size = dispatcher.rank, dispatcher.world_size
    x, ids, gates = rank_inputs(case, name, rank, world_size, torch.float32, seed)
    xs, idss, gatess = zip(*gather((x, ids, gates)))
    try:
        reference.dispatch(list(xs), list(idss), list(gatess), group_num_experts(world_size),
                           capacity=dispatcher.capacity)
    except CapacityError as err:
        want = (err.rank, err.rows_needed, err.capacity)
    else:
        raise AssertionError(f"capacity {dispatcher.capacity} is not exceeded by {name}")
    try:
        _dispatch_deferred(dispatcher, x.to(device), ids.to(device), gates.to(device), sync,
                           case.out_hidden)
    except CapacityError as err:
        assert (err.rank, err.rows_needed, err.capacity) == want, (
            f"rank {rank}: CapacityError{(err.rank, err.rows_needed, err.capacity)}, "
            f"reference says {want}")
    else:
        raise AssertionError(f"rank {rank}: no CapacityError (reference: {want})")


def _dispatch_deferred(dispatcher, x, ids, gates, sync: bool, out_hidden: int) -> None:
    """``dispatch``; with ``sync=False`` (a failing plan) check that nothing was delivered, run
    combine and both backwards on the failed handle (every rank, results ignored), then raise
    the deferred error through `Dispatcher.check_dispatch`."""
    got = dispatcher.dispatch(x, ids, gates, sync=sync)
    if sync:
        return
    rows = got.x_RD.shape[0]
    assert int(got.num_received.cpu()[0]) == 0, "a failed sync-free dispatch delivered rows"
    assert not bool(got.counts_E.cpu().any()), "a failed sync-free dispatch has counts"
    y = torch.zeros(rows, out_hidden, dtype=x.dtype, device=x.device)
    dispatcher.combine(y, got.handle)
    dispatcher.dispatch_backward(torch.zeros_like(got.x_RD), got.handle)
    dispatcher.combine_backward(torch.zeros(x.shape[0], out_hidden, dtype=x.dtype,
                                            device=x.device), y, got.handle)
    dispatcher.check_dispatch(got.handle)


def all_gather_objects(group=None):
    """``gather(obj)`` over torch.distributed: every rank's ``obj`` in rank order (tensors are
    moved to the CPU first, so a gloo group can carry them)."""
    import torch.distributed as dist

    def gather(obj):
        obj = tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in obj)
        out = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out

    return gather


def run_group_checks(
    dispatcher,
    seed: int,
    gather,
    device,
    *,
    cases: dict[str, GroupCase],
    dtypes: tuple[torch.dtype, ...],
    fp8_cases: dict[str, GroupCase] | None = None,
    log=None,
    sync: bool = True,
) -> None:
    """`check_group_case` for every case and dtype, then the FP8 cases (bfloat16, float32);
    ``sync=False`` runs them all through the sync-free dispatch."""
    mode = "" if sync else " sync=False"
    for name, case in cases.items():
        for dtype in dtypes:
            check_group_case(dispatcher, name, case, dtype, seed, gather, device, sync=sync)
            if log:
                log(f"ok {dispatcher.name} {name} {dtype}{mode}")
    for name, case in (fp8_cases or {}).items():
        for dtype in (torch.bfloat16, torch.float32):
            check_group_case(dispatcher, name, case, dtype, seed, gather, device, fp8=True,
                             sync=sync)
            if log:
                log(f"ok {dispatcher.name} {name} {dtype} fp8{mode}")


def gloo_worker(rank: int, world_size: int, init_file: str, seed: int) -> None:
    """One CPU rank of the ``nccl``-over-gloo test (``torch.multiprocessing.spawn`` target):
    every `GROUP_CASES` case in bfloat16 and float32, float64 rows, FP8 dispatch, interleaved
    calls, a bad expert id on one rank, the capacity error (then a dispatch that fits), the
    registry path and destroy."""
    import torch.distributed as dist

    import nmoe_comm

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        gather = all_gather_objects()
        num_experts = group_num_experts(world_size)
        capacity = group_capacity({**GROUP_CASES, **FP8_GROUP_CASES}, world_size)
        dispatcher = nmoe_comm.create_dispatcher("nccl", num_experts=num_experts,
                                                 capacity=capacity, world_size=world_size,
                                                 rank=rank)
        fp8_cases = {"fp8_random": FP8_GROUP_CASES["fp8_random"]}
        run_group_checks(dispatcher, seed, gather, "cpu", cases=GROUP_CASES,
                         dtypes=(torch.bfloat16, torch.float32), fp8_cases=fp8_cases)
        check_group_case(dispatcher, "repeat", GROUP_CASES["repeat"], torch.float64, seed,
                         gather, "cpu")
        check_interleaved_calls(dispatcher, seed, gather, "cpu")
        check_collective_errors(dispatcher, seed, gather, "cpu")
        x, ids, gates = rank_inputs(GROUP_CASES["top1"], "top1", rank, world_size,
                                    torch.float32, seed)
        try:  # refused before any communication, on every rank
            dispatcher.dispatch(x, ids, gates, sync=False)
        except NotImplementedError as err:
            assert "sync=True" in str(err), err
        else:
            raise AssertionError("the nccl backend must refuse dispatch(sync=False)")
        small = nmoe_comm.create_dispatcher("nccl", num_experts=num_experts, capacity=40,
                                            world_size=world_size, rank=rank)
        check_capacity_error(small, seed, gather, "cpu")
        check_group_case(small, "top1", GroupCase((13,), 1, 20, 20, "distinct"), torch.float32,
                         seed, gather, "cpu")
        small.destroy()
        try:
            small.combine(torch.zeros(0, 1), None)
        except RuntimeError as err:
            assert "destroyed" in str(err), err
        else:
            raise AssertionError("a destroyed dispatcher must refuse work")
    except BaseException:
        dist.destroy_process_group()  # no barrier: the peers may be elsewhere
        raise
    leave_process_group()


def leave_process_group() -> None:
    """Barrier, destroy the default process group, and check that it is freed.

    The barrier keeps a rank from tearing gloo down while a peer is still inside the last
    collective. A group that outlives ``destroy_process_group`` (something still references it)
    keeps gloo's worker threads into interpreter shutdown, where one of them can abort the
    process ("terminate called without an active exception", about 1 exit in 10 with torch
    2.13): raises AssertionError then. The usual culprit, torch.distributed.nn.functional, is
    imported by this module, so a worker that imports it before init_process_group is safe.
    """
    import torch.distributed as dist

    group = weakref.ref(dist.group.WORLD)
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
    if group() is not None:
        raise AssertionError("the default process group outlived destroy_process_group(): "
                             "something still references it")


def check_interleaved_calls(dispatcher, seed: int, gather, device, *, sync: bool = True) -> None:
    """Two dispatches in a row, then their combines and backwards in reverse order: exercises
    buffer reuse between calls (the entry barriers of `nmoe_comm.rdep`) and handles that stay
    valid while later dispatches run (per-call routing state, never shared scratch), bitwise vs
    reference. With ``sync=False`` the second dispatch is synchronous (mixed modes). A
    ``zero_copy`` dispatcher's ``x_RD`` holds only until the next dispatch: it is compared right
    after its own dispatch, and the first one's must then be overwritten by the second's rows."""
    rank, world_size = dispatcher.rank, dispatcher.world_size
    num_experts = group_num_experts(world_size)
    on_owner = _on_owner(dispatcher)
    zero_copy = getattr(dispatcher, "zero_copy", False)
    runs = []
    for name, mode in (("random", sync), ("top8", True)):
        case = GROUP_CASES[name]
        x, ids, gates = rank_inputs(case, name, rank, world_size, torch.bfloat16, seed)
        xs, idss, gatess = zip(*gather((x, ids, gates)))
        want = reference.dispatch(list(xs), list(idss), list(gatess), num_experts)
        got = dispatcher.dispatch(x.to(device), ids.to(device), gates.to(device), sync=mode)
        tag = f"interleaved {name}, sync={mode}, rank {rank}, seed {seed}"
        num_rows = want[rank].x_RD.shape[0]
        rows = _received_rows(dispatcher, got, num_rows, mode, tag)
        if zero_copy:
            assert_bitwise_equal(got.x_RD[:num_rows], want[rank].x_RD, f"{tag}: x_RD")
        runs.append((name, case, x, got, [w.handle for w in want], want[rank].x_RD, rows, tag))
    if zero_copy:  # the same output rows, now the second dispatch's
        first, second = runs[0][3].x_RD, runs[1][3].x_RD
        assert first.data_ptr() == second.data_ptr(), f"{runs[0][-1]}: zero-copy x_RD moved"
    for name, case, x, got, handles, want_x, rows, tag in reversed(runs):
        num_rows = want_x.shape[0]
        if not zero_copy:
            assert_bitwise_equal(got.x_RD[:num_rows], want_x, f"{tag}: x_RD after later calls")
        gen = _case_generator(seed, rank, name, "interleaved")
        y = _rand_rows(gen, num_rows, case.out_hidden, torch.bfloat16)
        grad_x = _rand_rows(gen, num_rows, case.hidden, torch.bfloat16)
        grad_out = _rand_rows(gen, x.shape[0], case.out_hidden, torch.bfloat16)
        ys, grad_xs, grad_outs = zip(*gather((y, grad_x, grad_out)))
        y_dev, grad_x_dev = _padded(y, rows).to(device), _padded(grad_x, rows).to(device)
        want_grad_y = reference.combine_backward(grad_outs, ys, handles)[0][rank]
        for _ in range(2):  # the same call twice in a row
            assert_bitwise_equal(dispatcher.combine(y_dev, got.handle),
                                 reference.combine(ys, handles, reduce_on_owner=on_owner)[rank],
                                 f"{tag}: combine")
        for _ in range(2):
            assert_bitwise_equal(dispatcher.dispatch_backward(grad_x_dev, got.handle),
                                 reference.dispatch_backward(grad_xs, handles,
                                                             reduce_on_owner=on_owner)[rank],
                                 f"{tag}: dispatch_backward")
        for _ in range(2):
            grad_y, _ = dispatcher.combine_backward(grad_out.to(device), y_dev, got.handle)
            assert_bitwise_equal(grad_y[:num_rows], want_grad_y, f"{tag}: combine_backward")


def check_collective_errors(dispatcher, seed: int, gather, device, *, sync: bool = True,
                            bad_id_tokens: int = 0) -> None:
    """An expert id outside ``[0, E)`` on rank 0 only (its last slot), then too many slots on
    the last rank only: every rank raises ValueError naming the culprit, and the dispatcher keeps
    working. Backends whose errors are collective run this (``ipc``, ``nvshmem``, ``nccl``). With
    ``sync=False`` the errors come from `Dispatcher.check_dispatch` after combine and both
    backwards ran on the failed handles (see `_dispatch_deferred`). ``bad_id_tokens`` > 0: the
    bad-id dispatch has that many tokens per rank (top-1) instead of the "top1" case's, so that
    a multi-block routing kernel meets the bad id outside its first block."""
    rank, world_size = dispatcher.rank, dispatcher.world_size
    name, case = "top1", GROUP_CASES["top1"]
    if bad_id_tokens > 0:
        wide = GroupCase((bad_id_tokens,), 1, case.hidden, case.out_hidden, "distinct")
        x, ids, gates = rank_inputs(wide, name, rank, world_size, torch.float32, seed)
    else:
        x, ids, gates = rank_inputs(case, name, rank, world_size, torch.float32, seed)
    bad_ids = ids.clone()
    if rank == 0 and bad_ids.numel():
        bad_ids[-1, -1] = group_num_experts(world_size)
    try:
        _dispatch_deferred(dispatcher, x.to(device), bad_ids.to(device), gates.to(device), sync,
                           case.out_hidden)
    except ValueError as err:
        assert "expert_ids_TK" in str(err), err
    else:
        raise AssertionError(f"rank {rank}: an out-of-range expert id on rank 0 did not raise")
    limit = getattr(dispatcher, "max_send_rows", None)
    if limit is not None:
        many = limit + 1 if rank == world_size - 1 else 1
        big_x = torch.zeros(many, case.hidden, dtype=torch.float32)
        big_ids = torch.zeros(many, 1, dtype=torch.int64)
        try:
            _dispatch_deferred(dispatcher, big_x.to(device), big_ids.to(device),
                               torch.ones(many, 1).to(device), sync, case.out_hidden)
        except ValueError as err:
            assert "max_send_rows" in str(err), err
        else:
            raise AssertionError(f"rank {rank}: T*K above max_send_rows did not raise")
    check_group_case(dispatcher, name, case, torch.float32, seed, gather, device, sync=sync)


def check_cuda_graph(dispatcher, seed: int, gather, device, *, rounds: int = 3,
                     case_name: str = "decode", log=None) -> None:
    """A sync-free dispatch -> combine cycle captured once in a CUDA graph, replayed on fresh
    inputs, bitwise against the reference (``ipc``, ``nvshmem`` with every peer mapped).

    The inputs of ``GPU_GROUP_CASES[case_name]`` (bfloat16; the decode size by default) are
    drawn anew for every round and copied into the tensors the graph captured; each replay's
    first R rows of ``x_RD``, ``counts_E``, R itself and the combined rows (the dispatched rows
    sent straight back) must equal the reference's. After each replay an eager synchronous
    dispatch + combine of the same inputs must give the same results: the barrier epochs
    counted on the device stay in step across graph replays and eager calls. A synchronous
    dispatch inside a capture must raise. Every rank calls it (collective).
    """
    case = GPU_GROUP_CASES[case_name]
    rank, world_size = dispatcher.rank, dispatcher.world_size
    num_experts = group_num_experts(world_size)
    tag = f"cuda graph, case {case_name}, rank {rank}/{world_size}, seed {seed}"
    dtype = torch.bfloat16

    def draw(round_index: int):
        x, ids, gates = rank_inputs(case, f"{case_name}/graph{round_index}", rank, world_size,
                                    dtype, seed)
        xs, idss, gatess = zip(*gather((x, ids, gates)))
        want = reference.dispatch(list(xs), list(idss), list(gatess), num_experts)
        combined = reference.combine([w.x_RD for w in want], [w.handle for w in want],
                                     reduce_on_owner=_on_owner(dispatcher))[rank]
        return (x, ids, gates), want[rank], combined

    def compare(got, out, want, combined, what: str) -> None:
        rows = want.x_RD.shape[0]
        if got.num_received is not None:
            received = int(got.num_received.cpu()[0])
            assert received == rows, f"{tag}, {what}: num_received {received}, reference {rows}"
        assert_bitwise_equal(got.x_RD[:rows], want.x_RD, f"{tag}, {what}: x_RD")
        assert_bitwise_equal(got.gates_R[:rows], want.gates_R, f"{tag}, {what}: gates_R")
        assert_bitwise_equal(got.counts_E, want.counts_E, f"{tag}, {what}: counts_E")
        assert_bitwise_equal(out, combined, f"{tag}, {what}: combine")

    inputs, want, combined = draw(0)
    static = [t.to(device) for t in inputs]  # the tensors the graph reads
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph advises
        got = dispatcher.dispatch(*static, sync=False)
        out = dispatcher.combine(got.x_RD, got.handle)
    torch.cuda.current_stream(device).wait_stream(side)
    compare(got, out, want, combined, "eager warm-up")

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = dispatcher.dispatch(*static, sync=False)
        out = dispatcher.combine(got.x_RD, got.handle)
    for round_index in range(rounds):
        if round_index:
            inputs, want, combined = draw(round_index)
            for dst, src in zip(static, inputs, strict=True):
                dst.copy_(src)
        graph.replay()
        compare(got, out, want, combined, f"replay {round_index}")
        dispatcher.check_dispatch(got.handle)
        eager = dispatcher.dispatch(*static, sync=True)
        compare(eager, dispatcher.combine(eager.x_RD, eager.handle), want, combined,
                f"eager after replay {round_index}")
    torch.cuda.synchronize(device)
    del graph, got, out

    refused = None
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            dispatcher.dispatch(*static, sync=True)
    except RuntimeError as err:  # ours, or the capture's own error on exit carrying ours
        refused = err
    chain = [refused, getattr(refused, "__context__", None)]
    assert any(e is not None and "sync=False" in str(e) for e in chain), (
        f"{tag}: dispatch(sync=True) during a capture did not raise the sync=False hint: "
        f"{refused!r}")
    if log:
        log(f"ok cuda graph: {rounds} replays of dispatch(sync=False) + combine, {case_name} "
            f"case, eager calls between them")
