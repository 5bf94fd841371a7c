"""One rank of the multi-GPU backend check; launched by tests/test_multigpu.py through torchrun:

    NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
    python -m torch.distributed.run --standalone --nproc_per_node 4 \
        packages/nmoe-comm/tests/multigpu_worker.py --backend ipc --seed 1234 [--mode sync_free]

Every rank draws its own inputs from ``--seed``, gathers every rank's inputs (over a gloo group)
and compares its results bitwise with `nmoe_comm.reference` run over all of them: every
`GROUP_CASES` case plus the GPU-sized ones in bfloat16, float32 and float16, FP8 dispatch,
interleaved calls (buffer reuse, several live handles), collective errors (capacity, bad expert
id, too many slots), a decode-sized sync-free dispatch + combine captured in a CUDA graph and
replayed on fresh inputs between eager calls (``ipc``, ``nvshmem``), and destroy; for
``nvshmem`` also ``peer_access="puts"`` (the multi-node path: staged rows moved by NVSHMEM puts,
on-stream fcollect and barriers) and a second dispatcher with ``dedup_rows=True`` and
``reduce_on_owner=True`` (one row per token and owner, both ways: the combine without gates and
the dispatch backward sum on the owners); for ``ipc`` also a ``pipelined=False`` dispatcher (the
two-kernel path; the others run the pipelined kernels, the default) and a ``zero_copy=True`` one
(views of the buffer, each row stored by its source straight at its contract row). ``--mode
sync_free`` runs the checks through ``dispatch(..., sync=False)`` on ``dedup_rows=True`` dispatchers
(rule 7: padded rows whose tail is NaN when handed back, ``num_received``, errors deferred to
``check_dispatch`` after combine and both backwards ran on the failed handle), mixed with
synchronous calls, then the same with ``reduce_on_owner=True`` (its decode step captured in a CUDA
graph too); ``nccl`` and the nvshmem puts path must refuse it. Exits non-zero with the first
mismatch (case, dtype, rank, seed, element).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("NVSHMEM_DISABLE_NVLS", "1"),
                      ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import nmoe_comm  # noqa: E402
from nmoe_comm import testing  # noqa: E402


def _options(backend: str, cases: dict, world_size: int, dedup: bool = False,
             reduce_on_owner: bool = False, pipelined: bool = True) -> dict:
    """Options of an ipc / nvshmem dispatcher for ``cases``: the pipelined kernels unless asked
    otherwise (the test sizes are below the automatic choice's threshold)."""
    if backend == "nccl":
        return {}
    widest = max(max(c.hidden, c.out_hidden) for c in cases.values())
    send = max(max(c.tokens) * c.top_k for c in cases.values())
    return {"hidden": widest, "dtype": torch.float32, "max_send_rows": send,
            "dedup_rows": dedup, "reduce_on_owner": reduce_on_owner, "pipelined": pipelined}


def _check_sync_free_refused(dispatcher, seed: int, device) -> None:
    """``dispatch(..., sync=False)`` raises NotImplementedError naming sync=True before any
    communication (so every rank raises and none waits)."""
    case = testing.GROUP_CASES["top1"]
    x, ids, gates = testing.rank_inputs(case, "top1", dispatcher.rank, dispatcher.world_size,
                                        torch.float32, seed)
    try:
        dispatcher.dispatch(x.to(device), ids.to(device), gates.to(device), sync=False)
    except NotImplementedError as err:
        assert "sync=True" in str(err), err
    else:
        raise AssertionError(f"{dispatcher.name} accepted dispatch(sync=False)")


def _check_chunk_sizes(dispatcher, cases: dict, seed: int, gather, device, sync: bool,
                       log) -> None:
    """The pipelined dispatch with its smallest and largest chunks (``dispatch_grid[2]``, rows
    per published chunk), and its combine in 1 and 64 token phases (``stream_phases``), on a
    small and a multi-block case, bitwise against the reference."""
    for chunk_rows, phases in ((8, 1), (256, 64)):
        dispatcher.dispatch_grid = (*type(dispatcher).dispatch_grid[:2], chunk_rows)
        dispatcher.stream_phases = phases
        for name in ("random", "prefill"):
            testing.check_group_case(dispatcher, name, cases[name], torch.bfloat16, seed, gather,
                                     device, sync=sync)
    del dispatcher.dispatch_grid, dispatcher.stream_phases
    if log:
        log("ok pipelined dispatch chunks of 8 and 256 rows, combine in 1 and 64 phases")


def _check_zero_copy(cases: dict, everything: dict, seed: int, gather, device, sync: bool,
                     log) -> None:
    """An ipc dispatcher with zero-copy outputs (each row stored by its source straight at its
    contract row): every case, FP8, interleaved calls, collective errors and a CUDA graph."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    direct = nmoe_comm.create_dispatcher(
        "ipc", num_experts=testing.group_num_experts(world_size),
        capacity=testing.group_capacity(everything, world_size), world_size=world_size,
        rank=rank, zero_copy=True, **_options("ipc", everything, world_size))
    if log:
        log(f"moe dispatcher: {direct.describe()}")
    testing.run_group_checks(direct, seed, gather, device, cases=cases,
                             dtypes=(torch.bfloat16, torch.float32),
                             fp8_cases=testing.FP8_GROUP_CASES, log=log, sync=sync)
    testing.check_interleaved_calls(direct, seed, gather, device, sync=sync)
    testing.check_collective_errors(direct, seed, gather, device, sync=sync, bad_id_tokens=4096)
    testing.check_cuda_graph(direct, seed, gather, device, log=log)
    direct.destroy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, choices=["nccl", "ipc", "nvshmem"])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--mode", choices=["sync", "sync_free"], default="sync",
                        help="sync_free: every check through dispatch(..., sync=False)")
    args = parser.parse_args()
    sync = args.mode == "sync"
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    gather = testing.all_gather_objects(dist.new_group(backend="gloo"))
    log = (lambda msg: print(f"[rank {rank}] {msg}", flush=True)) if rank == 0 else None
    start = time.time()

    cases = {**testing.GROUP_CASES, **testing.GPU_GROUP_CASES}
    everything = {**cases, **testing.FP8_GROUP_CASES}
    dispatcher = nmoe_comm.create_dispatcher(
        args.backend, num_experts=testing.group_num_experts(world_size),
        capacity=testing.group_capacity(everything, world_size), world_size=world_size,
        rank=rank, **_options(args.backend, everything, world_size, dedup=not sync))
    if log:
        log(f"moe dispatcher: {dispatcher.describe()} on {torch.cuda.get_device_name(device)}, "
            f"mode {args.mode}")
    if not sync and args.backend == "nccl":
        _check_sync_free_refused(dispatcher, args.seed, device)
        dispatcher.destroy()
        if log:
            log(f"nccl refuses sync=False on every rank ({world_size} GPUs, seed {args.seed})")
        dist.destroy_process_group()
        return 0
    testing.run_group_checks(dispatcher, args.seed, gather, device, cases=cases,
                             dtypes=(torch.bfloat16, torch.float32),
                             fp8_cases=testing.FP8_GROUP_CASES, log=log, sync=sync)
    for name in ("random", "no_tokens_on_rank1"):
        testing.check_group_case(dispatcher, name, testing.GROUP_CASES[name], torch.float16,
                                 args.seed, gather, device, sync=sync)
    testing.check_interleaved_calls(dispatcher, args.seed, gather, device, sync=sync)
    testing.check_collective_errors(dispatcher, args.seed, gather, device, sync=sync,
                                    bad_id_tokens=4096)  # a multi-block routing kernel
    if log:
        log("ok interleaved calls and collective errors")
    if args.backend != "nccl":  # a decode step captured in a CUDA graph (every peer mapped)
        testing.check_cuda_graph(dispatcher, args.seed, gather, device, log=log)
        _check_chunk_sizes(dispatcher, cases, args.seed, gather, device, sync, log)

    small = nmoe_comm.create_dispatcher(
        args.backend, num_experts=testing.group_num_experts(world_size), capacity=40,
        world_size=world_size, rank=rank, **_options(args.backend, testing.GROUP_CASES,
                                                     world_size, dedup=not sync))
    testing.check_capacity_error(small, args.seed, gather, device, sync=sync)
    testing.check_group_case(small, "top1", testing.GroupCase((13,), 1, 20, 20, "distinct"),
                             torch.float32, args.seed, gather, device, sync=sync)
    small.destroy()
    if args.backend == "ipc":  # the two-kernel path (scatter, barrier, unpack; return, reduce)
        plain_cases = {**testing.GROUP_CASES, "fp8_random": testing.FP8_GROUP_CASES["fp8_random"]}
        plain = nmoe_comm.create_dispatcher(
            "ipc", num_experts=testing.group_num_experts(world_size),
            capacity=testing.group_capacity(plain_cases, world_size), world_size=world_size,
            rank=rank,
            **_options(args.backend, plain_cases, world_size, dedup=not sync, pipelined=False))
        if log:
            log(f"moe dispatcher: {plain.describe()}")
        testing.run_group_checks(plain, args.seed, gather, device, cases=testing.GROUP_CASES,
                                 dtypes=(torch.bfloat16,),
                                 fp8_cases={"fp8_random": testing.FP8_GROUP_CASES["fp8_random"]},
                                 log=log, sync=sync)
        testing.check_interleaved_calls(plain, args.seed, gather, device, sync=sync)
        plain.destroy()
    if args.backend == "ipc":
        _check_zero_copy(cases, everything, args.seed, gather, device, sync, log)
    if args.backend != "nccl":  # one row per token and owner both ways (reduce_on_owner)
        # Small enough to fit beside the first dispatcher in a heap sized for it (nvshmem).
        dedup_cases = {**testing.GROUP_CASES, "decode": testing.GPU_GROUP_CASES["decode"]}
        dedup_all = {**dedup_cases, **testing.FP8_GROUP_CASES}
        dedup = nmoe_comm.create_dispatcher(
            args.backend, num_experts=testing.group_num_experts(world_size),
            capacity=testing.group_capacity(dedup_all, world_size), world_size=world_size,
            rank=rank, **_options(args.backend, dedup_all, world_size, dedup=True,
                                  reduce_on_owner=True))
        if log:
            log(f"moe dispatcher: {dedup.describe()}")
        testing.run_group_checks(dedup, args.seed, gather, device, cases=dedup_cases,
                                 dtypes=(torch.bfloat16, torch.float32),
                                 fp8_cases=testing.FP8_GROUP_CASES, log=log, sync=sync)
        testing.check_interleaved_calls(dedup, args.seed, gather, device, sync=sync)
        if not sync:
            testing.check_cuda_graph(dedup, args.seed, gather, device, log=log)
        dedup.destroy()
    if args.backend == "nvshmem":  # the multi-node data path (staged puts), on this node
        puts = nmoe_comm.create_dispatcher(
            "nvshmem", num_experts=testing.group_num_experts(world_size),
            capacity=testing.group_capacity(testing.GROUP_CASES, world_size),
            world_size=world_size, rank=rank, peer_access="puts",
            **_options(args.backend, {**testing.GROUP_CASES, **testing.FP8_GROUP_CASES},
                       world_size))
        if log:
            log(f"moe dispatcher: {puts.describe()}")
        if not sync:  # the host sizes the puts: sync-free is refused, on every rank
            _check_sync_free_refused(puts, args.seed, device)
        testing.run_group_checks(puts, args.seed, gather, device, cases=testing.GROUP_CASES,
                                 dtypes=(torch.bfloat16,),
                                 fp8_cases={"fp8_random": testing.FP8_GROUP_CASES["fp8_random"]},
                                 log=log)
        testing.check_interleaved_calls(puts, args.seed, gather, device)
        testing.check_collective_errors(puts, args.seed, gather, device)
        puts.destroy()
    dispatcher.destroy()
    torch.cuda.synchronize()
    if args.backend == "nvshmem":
        from nmoe_comm import nvshmem

        nvshmem.finalize()
    if log:
        log(f"all checks passed for {args.backend} ({args.mode}) over {world_size} GPUs in "
            f"{time.time() - start:.1f} s (seed {args.seed})")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
