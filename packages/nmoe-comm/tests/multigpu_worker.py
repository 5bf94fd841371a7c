"""One rank of the multi-GPU backend check; launched by tests/test_multigpu.py through torchrun:

    NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
    python -m torch.distributed.run --standalone --nproc_per_node 4 \
        packages/nmoe-comm/tests/multigpu_worker.py --backend ipc --seed 1234

Every rank draws its own inputs from ``--seed``, gathers every rank's inputs (over a gloo group)
and compares its results bitwise with `nmoe_comm.reference` run over all of them: every
`GROUP_CASES` case plus the GPU-sized ones in bfloat16, float32 and float16, FP8 dispatch,
interleaved calls (buffer reuse), collective errors (capacity, bad expert id, too many slots)
and destroy; for ``nvshmem`` also ``peer_access="puts"`` (the multi-node path: staged rows moved
by NVSHMEM puts, on-stream fcollect and barriers). Exits non-zero with the first mismatch
(case, dtype, rank, seed, element).
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


def _options(backend: str, cases: dict, world_size: int) -> dict:
    if backend == "nccl":
        return {}
    widest = max(max(c.hidden, c.out_hidden) for c in cases.values())
    send = max(max(c.tokens) * c.top_k for c in cases.values())
    return {"hidden": widest, "dtype": torch.float32, "max_send_rows": send}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, choices=["nccl", "ipc", "nvshmem"])
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args()
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
        rank=rank, **_options(args.backend, everything, world_size))
    if log:
        log(f"moe dispatcher: {dispatcher.describe()} on {torch.cuda.get_device_name(device)}")
    testing.run_group_checks(dispatcher, args.seed, gather, device, cases=cases,
                             dtypes=(torch.bfloat16, torch.float32),
                             fp8_cases=testing.FP8_GROUP_CASES, log=log)
    for name in ("random", "no_tokens_on_rank1"):
        testing.check_group_case(dispatcher, name, testing.GROUP_CASES[name], torch.float16,
                                 args.seed, gather, device)
    testing.check_interleaved_calls(dispatcher, args.seed, gather, device)
    testing.check_collective_errors(dispatcher, args.seed, gather, device)
    if log:
        log("ok interleaved calls and collective errors")

    small = nmoe_comm.create_dispatcher(
        args.backend, num_experts=testing.group_num_experts(world_size), capacity=40,
        world_size=world_size, rank=rank, **_options(args.backend, testing.GROUP_CASES,
                                                     world_size))
    testing.check_capacity_error(small, args.seed, gather, device)
    testing.check_group_case(small, "top1", testing.GroupCase((13,), 1, 20, 20, "distinct"),
                             torch.float32, args.seed, gather, device)
    small.destroy()
    if args.backend == "nvshmem":  # the multi-node data path (staged puts), on this node
        puts = nmoe_comm.create_dispatcher(
            "nvshmem", num_experts=testing.group_num_experts(world_size),
            capacity=testing.group_capacity(testing.GROUP_CASES, world_size),
            world_size=world_size, rank=rank, peer_access="puts",
            **_options(args.backend, {**testing.GROUP_CASES, **testing.FP8_GROUP_CASES},
                       world_size))
        if log:
            log(f"moe dispatcher: {puts.describe()}")
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
        log(f"all checks passed for {args.backend} over {world_size} GPUs in "
            f"{time.time() - start:.1f} s (seed {args.seed})")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
