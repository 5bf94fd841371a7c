"""CPU checks of the GPU transport's host side: the compiled module, the buffer layout, and the
chunk lists the nvshmem backend puts for peers it cannot store to.

The kernels themselves run only on GPUs (tests/test_multigpu.py). Run:
``pytest packages/nmoe-comm/tests/test_transport.py``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import nmoe_comm
from nmoe_comm import _extension
from nmoe_comm.rdep import BufferLayout, RdepDispatcher


def test_compiled_module_reports_its_build():
    c_module = importlib.import_module("nmoe_comm._C")
    assert c_module.ABI_VERSION == 10 and isinstance(c_module.WITH_CUDA, bool)
    if c_module.WITH_CUDA:
        assert {"Rdep", "alloc", "ipc_handle", "ipc_open", "sum_slots"} <= set(dir(c_module))
        assert {"dispatch_stream", "combine_stream"} <= set(dir(c_module.Rdep))
        assert (c_module.STREAM_FLAG_ROWS, c_module.STREAM_PHASES_MAX, c_module.COUNTER_WORDS,
                c_module.STREAM_CHUNK_ROWS_MAX) == (8, 64, 80, 256)
        assert _extension.slot_sum_kernel() is c_module.sum_slots
        assert _extension.missing_slot_sum() is None
    else:
        assert _extension.slot_sum_kernel() is None
        assert "without nvcc" in _extension.missing_slot_sum()
        assert c_module.TRAILER_BYTES == 16
    reason = _extension.missing_transport()
    if not torch.cuda.is_available():
        assert reason is not None and ("GPU" in reason or "nvcc" in reason), reason


def test_sum_slots_binding_rejects_bad_arguments():
    """The checks of `_C.sum_slots` that run before any launch (the kernel itself: GPU tests)."""
    kernel = _extension.slot_sum_kernel()
    if kernel is None:
        pytest.skip(_extension.missing_slot_sum())
    args = dict(device=0, dtype=1, num_tokens=4, top_k=2, hidden=8, rows=0, row_of_slot=0,
                gates=0, out=0, stream=0)
    with pytest.raises(ValueError, match="rows dtype code 7 is not 0"):
        kernel(**{**args, "dtype": 7})
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sum_slots: no CUDA GPU is visible"):
            kernel(**args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_buffer_layout_regions(gen, dtype):
    world, experts = 4, 32
    capacity = int(torch.randint(1, 5000, (1,), generator=gen))
    send = int(torch.randint(1, 3000, (1,), generator=gen))
    hidden = int(torch.randint(1, 9000, (1,), generator=gen))
    layout = BufferLayout.plan(capacity=capacity, hidden=hidden, dtype=dtype, world_size=world,
                               num_experts=experts, max_send_rows=send)
    item = torch.empty(0, dtype=dtype).element_size()
    assert layout.row_bytes % 16 == 0 and hidden * item <= layout.row_bytes < hidden * item + 16
    assert layout.recv_stride == layout.row_bytes + 16 and layout.ret_stride == layout.row_bytes
    regions = [  # (offset, bytes) in buffer order
        (layout.signal_off, 8 * world), (layout.counter_off, 4 * 80),
        (layout.counts_off, 4 * world * (experts + 1)), (layout.counts_src_off, 4 * (experts + 1)),
        (layout.recv_off, capacity * layout.recv_stride), (layout.ret_off, send * layout.row_bytes),
        (layout.dots_off, 4 * send), (layout.dflags_off, 8 * world * layout.dflag_chunks),
        (layout.cflags_off, 8 * world * 64)]
    # The pipelined dispatch: one flag per 8 rows of capacity per source (chunks of 8 rows and up).
    assert layout.dflag_chunks == (capacity + 7) // 8
    for (offset, size), (next_offset, _) in zip(regions, regions[1:] + [(layout.total_bytes, 0)]):
        assert offset % 128 == 0 and offset + size <= next_offset, (offset, size, next_offset)
    assert layout.total_bytes - (regions[-1][0] + regions[-1][1]) < 128
    # An FP8 row (D bytes + D/128 float32 scales) fits the payload of a 2-byte row.
    fp8_hidden = hidden // 128 * 128
    if fp8_hidden and item == 2:
        assert (fp8_hidden + 15) // 16 * 16 + fp8_hidden // 32 <= layout.row_bytes
    hint = nmoe_comm.buffer_size_hint("ipc", capacity=capacity, hidden=hidden, dtype=dtype,
                                      world_size=world, max_send_rows=send)
    # The registry's hint assumes 256 experts for the (few-KiB) count matrix.
    assert hint == BufferLayout.plan(capacity=capacity, hidden=hidden, dtype=dtype,
                                     world_size=world, num_experts=256,
                                     max_send_rows=send).total_bytes
    assert 0 <= hint - layout.total_bytes <= 4 * (world + 1) * 257 + 256


def test_put_chunks_match_the_routing(gen):
    """`RdepDispatcher._chunks`: what rank s puts to owner o (rows, start in s's send order,
    start in o's landing order) equals what o expects back from s, from first principles."""
    world, local = 4, 3
    experts = world * local
    counts = torch.randint(0, 7, (world, experts), generator=gen)
    chunks = {}
    for rank in range(world):
        engine = object.__new__(RdepDispatcher)
        engine.rank, engine.world_size, engine.num_experts = rank, world, experts
        engine._unmapped = tuple(range(world))
        chunks[rank] = engine._chunks(counts)
    to_owner = counts.view(world, world, local).sum(dim=2)  # [source, owner]
    for s in range(world):
        send, _ = chunks[s]
        for o, rows, send_start, land_start in send:
            assert rows == int(to_owner[s, o])
            assert send_start == int(to_owner[s, :o].sum())  # slots of s for owners before o
            assert land_start == int(to_owner[:s, o].sum())  # rows o gets from sources before s
            _, recv = chunks[o]
            back = [c for c in recv if c[0] == s][0]
            assert back == (s, rows, land_start, send_start)


def _kernel_math(ids_per_rank, world, experts):
    """The index arithmetic of csrc/rdep_kernels.cu in plain torch, one formula per kernel:
    route (send positions), plan (landing rows), unpack (contract row -> landing row, return
    index). Returns, per owner, ``(landing_source, landing_slot, land_row_R, ret_index_R)``
    plus every source's send positions."""
    local = experts // world
    counts = torch.stack([torch.bincount(i.flatten(), minlength=experts) for i in ids_per_rank])
    send_pos, landing = [], [dict() for _ in range(world)]
    for s, ids in enumerate(ids_per_rank):
        flat = ids.flatten()
        start = torch.cumsum(counts[s], 0) - counts[s]  # route: prefix over experts
        seen = torch.zeros(experts, dtype=torch.int64)
        pos = torch.empty_like(flat)
        for i, e in enumerate(flat.tolist()):  # stable rank inside the expert
            pos[i] = start[e] + seen[e]
            seen[e] += 1
        send_pos.append(pos)
        for i, e in enumerate(flat.tolist()):  # plan: landing row on the owner
            o = e // local
            land_off = int(counts[:s, o * local:(o + 1) * local].sum())
            land = land_off + int(pos[i]) - int(start[o * local])
            landing[o][land] = (s, i)
    per_owner = []
    for o in range(world):
        block = counts[:, o * local:(o + 1) * local]  # [source, local expert]
        land_start = (torch.cumsum(block.flatten(), 0) - block.flatten()).view_as(block)
        contract_sizes = block.t().flatten()  # (local expert, source) order
        contract_start = torch.cumsum(contract_sizes, 0) - contract_sizes
        send_off = [int(counts[s, :o * local].sum()) for s in range(world)]
        land_rows, ret_index = [], []
        for r in range(int(block.sum())):  # unpack: the last block starting at or before r
            b = int(torch.nonzero(contract_start <= r).max())
            e, s = b // world, b % world
            land = int(land_start[s, e]) + r - int(contract_start[b])
            land_rows.append(land)
            ret_index.append(send_off[s] + land - int(land_start[s, 0]))
        per_owner.append((landing[o], land_rows, ret_index))
    return per_owner, send_pos


@pytest.mark.parametrize("world", [2, 3])
def test_kernel_index_math_matches_the_reference(gen, world):
    """Executable spec of the RDEP kernels' indices: contract row r of owner o lands in the
    landing row that holds exactly the (source, token, slot) the reference puts at r, and its
    return index is that slot's send position on the source."""
    from nmoe_comm import reference
    from nmoe_comm.testing import random_routing

    experts, top_k = 3 * world, 3
    ids = [random_routing(int(torch.randint(0, 9, (1,), generator=gen)), top_k, experts,
                          generator=gen, distinct=False)[0] for _ in range(world)]
    xs = [torch.zeros(i.shape[0], 1) for i in ids]
    want = reference.dispatch(xs, ids, [torch.ones(i.shape) for i in ids], experts)
    per_owner, send_pos = _kernel_math(ids, world, experts)
    for o, (landing, land_rows, ret_index) in enumerate(per_owner):
        state = want[o].handle.state
        assert len(land_rows) == state.src_rank_R.numel()
        for r, land in enumerate(land_rows):
            s, flat = landing[land]
            token, slot = divmod(flat, top_k)
            assert (s, token, slot) == (int(state.src_rank_R[r]), int(state.src_token_R[r]),
                                        int(state.src_slot_R[r])), (o, r)
            assert ret_index[r] == int(send_pos[s][flat])


@pytest.mark.parametrize("field", ["STREAM_FLAG_ROWS", "STREAM_PHASES_MAX", "COUNTER_WORDS",
                                   "STREAM_CHUNK_ROWS_MAX"])
def test_attach_refuses_a_build_with_other_transport_constants(monkeypatch, field):
    """A stale `nmoe_comm._C` whose transport constants differ from the Python side's is refused
    when a dispatcher attaches, with the rebuild command, before any kernel object is made."""
    from types import SimpleNamespace

    from nmoe_comm import rdep

    constants = dict(STREAM_FLAG_ROWS=rdep._STREAM_FLAG_ROWS,
                     STREAM_PHASES_MAX=rdep._STREAM_PHASES_MAX, COUNTER_WORDS=rdep._COUNTER_WORDS,
                     STREAM_CHUNK_ROWS_MAX=rdep._STREAM_CHUNK_ROWS_MAX)
    constants[field] *= 2

    def no_rdep(*args, **kwargs):
        raise AssertionError("Rdep must not be constructed from a mismatched build")

    fake = SimpleNamespace(Rdep=no_rdep, **constants)
    monkeypatch.setattr(rdep._extension, "compiled_module", lambda: fake)
    engine = object.__new__(rdep.RdepDispatcher)
    with pytest.raises(RuntimeError, match="rebuild with `pip install") as err:
        engine._attach(torch.device("cpu"), 0, [0], 0)
    assert str(constants[field]) in str(err.value)
