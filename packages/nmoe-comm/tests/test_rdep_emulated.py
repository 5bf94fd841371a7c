"""The ``ipc`` / ``nvshmem`` engine (`nmoe_comm.rdep.RdepDispatcher`) on CPU threads, with the
compiled kernels replaced by a plain-torch emulation (`EmulatedRdep`).

What this checks without a GPU: the host side of every call (argument order and pointers passed
to ``_C.Rdep``, the per-call allocations split into views, handle state that stays valid while
later calls run, the entry barriers, sync-free dispatch with padded rows and deferred errors)
together with the kernels' index arithmetic, written again here from csrc/rdep_kernels.cu one
kernel per method. Each rank is a thread; a kernel's in-kernel barrier is a `threading.Barrier`
over the ranks. Results go through the same `nmoe_comm.testing` checks as the GPU worker, bitwise
against `nmoe_comm.reference`. The GPU run (tests/test_multigpu.py) remains the real test of the
kernels; run this with ``pytest packages/nmoe-comm/tests/test_rdep_emulated.py``.
"""

from __future__ import annotations

import ctypes
import threading
import time

import pytest
import torch

from nmoe_comm import rdep, testing
from nmoe_comm.rdep import RdepDispatcher

_DTYPES = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16}
_TRAILER = 16


def _mem(ptr: int, nbytes: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A tensor over ``nbytes`` of CPU memory at address ``ptr`` (shares the memory)."""
    if nbytes == 0:
        return torch.empty(0, dtype=dtype)
    raw = (ctypes.c_uint8 * nbytes).from_address(ptr)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype)


class _Group:
    """What the ranks share: every rank's buffer (uint8 tensors) and the barrier."""

    def __init__(self, world: int, total_bytes: int):
        self.buffers = [torch.zeros(total_bytes, dtype=torch.uint8) for _ in range(world)]
        self.barrier = threading.Barrier(world, timeout=60)


class EmulatedRdep:
    """The methods of ``nmoe_comm._C.Rdep`` (same signatures) in plain torch for one rank."""

    def __init__(self, group: _Group, layout: rdep.BufferLayout, rank: int, world: int,
                 num_experts: int, capacity: int, max_send_rows: int):
        self.group, self.g, self.rank, self.world = group, layout, rank, world
        self.E, self.L = num_experts, num_experts // world
        self.capacity, self.max_send_rows = capacity, max_send_rows

    # buffer regions, bounds-checked
    def _region(self, rank: int, offset: int, nbytes: int, dtype=torch.uint8) -> torch.Tensor:
        buf = self.group.buffers[rank]
        assert 0 <= offset and offset + nbytes <= buf.numel(), (rank, offset, nbytes)
        return buf[offset:offset + nbytes].view(dtype)

    def _counts(self) -> torch.Tensor:
        width = self.E + 1
        return self._region(self.rank, self.g.counts_off, 4 * self.world * width,
                            torch.int32).view(self.world, width)

    def _sync(self, epoch: int) -> None:
        if epoch:
            self.group.barrier.wait()

    def route_plan(self, ids, ids_int64, num_slots, local_flags, send_pos, land_index,
                   slot_of_send, counts_E, info, flags, epoch, stream):
        assert flags == 7, "CUDA IPC path: route, exchange and plan in one launch"
        E, L, W, me = self.E, self.L, self.world, self.rank
        ids_N = _mem(ids, num_slots * (8 if ids_int64 else 4),
                     torch.int64 if ids_int64 else torch.int32).long()
        pos_N = _mem(send_pos, 4 * num_slots, torch.int32)
        valid = (ids_N >= 0) & (ids_N < E)
        counts = torch.bincount(ids_N[valid], minlength=E)
        start = torch.cumsum(counts, 0) - counts
        seen = torch.zeros(E, dtype=torch.int64)
        for i, e in enumerate(ids_N.tolist()):  # stable inside an expert: (token, slot) order
            if 0 <= e < E:
                pos_N[i] = int(start[e] + seen[e])
                seen[e] += 1
            else:
                pos_N[i] = -1
        if slot_of_send:
            inverse = _mem(slot_of_send, 4 * num_slots, torch.int32)
            for i, pos in enumerate(pos_N.tolist()):
                if pos >= 0:
                    inverse[pos] = i
        row_flags = local_flags | (0 if bool(valid.all()) else 1)
        for p in range(W):  # this rank's count row into every peer's matrix
            width = E + 1
            row = self._region(p, self.g.counts_off + 4 * me * width, 4 * width, torch.int32)
            row[:E] = counts.to(torch.int32)
            row[E] = row_flags
        self._sync(epoch)
        C = self._counts().long()
        owner_rows = [int(C[:, o * L:(o + 1) * L].sum()) for o in range(W)]
        land_off = [int(C[:me, o * L:(o + 1) * L].sum()) for o in range(W)]
        code, arg1, arg2 = 0, 0, 0
        for flag, status in ((1, 2), (2, 3), (4, 4)):
            culprits = [s for s in range(W) if int(C[s, E]) & flag]
            if culprits:
                code, arg1 = status, culprits[0]
                break
        if code == 0:
            over = [o for o in range(W) if owner_rows[o] > self.capacity]
            if over:
                code, arg1, arg2 = 1, over[0], owner_rows[over[0]]
        info_8 = _mem(info, 64, torch.int64)
        info_8[:4] = torch.tensor([code, arg1, arg2, owner_rows[me] if code == 0 else 0])
        mine = C[:, me * L:(me + 1) * L].sum(dim=0)
        _mem(counts_E, 8 * L, torch.int64)[:] = mine if code == 0 else 0
        if code != 0:
            return
        send_start = torch.cumsum(C[me, :E], 0) - C[me, :E]
        land_N = _mem(land_index, 4 * num_slots, torch.int32)
        for i, e in enumerate(ids_N.tolist()):
            o = e // L
            land_N[i] = land_off[o] + int(pos_N[i]) - int(send_start[o * L])

    def scatter_slots(self, ids, ids_int64, num_slots, top_k, send_pos, land_index, src0,
                      stride0, bytes0, src1, stride1, bytes1, gates, info, dedup, head_N, epoch,
                      stream, phase_tokens=0, phases=0):
        skip = info != 0 and int(_mem(info, 8, torch.int64)[0]) != 0
        if not skip:
            ids_N = _mem(ids, num_slots * (8 if ids_int64 else 4),
                         torch.int64 if ids_int64 else torch.int32).long()
            land_N = _mem(land_index, 4 * num_slots, torch.int32)
            gates_N = _mem(gates, 4 * num_slots, torch.float32)
            p1_offset = (bytes0 + 15) // 16 * 16
            stride = self.g.recv_stride
            for i in range(num_slots):
                owner, token = int(ids_N[i]) // self.L, i // top_k
                row = self._region(owner, self.g.recv_off + int(land_N[i]) * stride, stride)
                payload_row = int(land_N[i])
                next_row = -1
                if dedup:  # the token's first slot (lowest k) with this owner carries the row
                    earlier = [j for j in range(token * top_k, i)
                               if int(ids_N[j]) // self.L == owner]
                    payload_row = int(land_N[earlier[0]]) if earlier else payload_row
                    later = [j for j in range(i + 1, (token + 1) * top_k)
                             if int(ids_N[j]) // self.L == owner]
                    next_row = int(land_N[later[0]]) if later else -1
                if payload_row == int(land_N[i]):
                    row[:bytes0] = _mem(src0 + token * stride0, bytes0)
                    if bytes1:
                        row[p1_offset:p1_offset + bytes1] = _mem(src1 + token * stride1, bytes1)
                trailer = row[stride - _TRAILER:]
                trailer[:4] = gates_N[i:i + 1].view(torch.uint8)
                if dedup:
                    trailer[4:12] = torch.tensor([payload_row, next_row], dtype=torch.int32).view(
                        torch.uint8)
                if phase_tokens:  # the pipelined dispatch: the token's phase at byte 12
                    phase = token * phases // phase_tokens
                    trailer[12:16] = torch.tensor([phase], dtype=torch.int32).view(torch.uint8)
                if head_N:
                    _mem(head_N + 4 * i, 4, torch.int32)[0] = int(payload_row == int(land_N[i]))
        self._sync(epoch)

    def _walk(self, num_rows: int, num_rows_dev: int) -> int:
        if num_rows_dev == 0:
            return num_rows
        return min(num_rows, int(_mem(num_rows_dev, 8, torch.int64)[0]))

    def unpack(self, num_rows, num_rows_dev, dedup, out0, bytes0, out1, bytes1, gates_R,
               src_rank_R, ret_index_R, land_row_R, chain_R, head_R, row_of_land, stream,
               phase_R=0, direct=False):
        if num_rows == 0:
            return
        L, W, me = self.L, self.world, self.rank
        C = self._counts().long()
        block = C[:, me * L:(me + 1) * L]  # [source, local expert]
        land_start = (torch.cumsum(block.flatten(), 0) - block.flatten()).view(W, L)
        sizes = block.t().flatten()  # (local expert, source) order
        contract_start = torch.cumsum(sizes, 0) - sizes
        send_off = [int(C[s, :me * L].sum()) for s in range(W)]
        p1_offset = (bytes0 + 15) // 16 * 16
        stride = self.g.recv_stride
        rows = self._walk(num_rows, num_rows_dev)
        for r in range(rows):
            b = int(torch.nonzero(contract_start <= r).max())  # the last block starting <= r
            e, s = b // W, b % W
            land = int(land_start[s, e]) + r - int(contract_start[b])
            src = self._region(me, self.g.recv_off + land * stride, stride)
            payload = src
            if dedup:
                row = int(src[stride - _TRAILER + 4:stride - _TRAILER + 8].view(torch.int32)[0])
                payload = self._region(me, self.g.recv_off + row * stride, stride)
            if not direct or s == me:  # direct: the source stored the payload at row r
                _mem(out0 + r * bytes0, bytes0)[:] = payload[:bytes0]
                if bytes1:
                    _mem(out1 + r * bytes1, bytes1)[:] = payload[p1_offset:p1_offset + bytes1]
            _mem(gates_R + 4 * r, 4)[:] = src[stride - _TRAILER:stride - _TRAILER + 4]
            _mem(src_rank_R + 4 * r, 4, torch.int32)[0] = s
            _mem(ret_index_R + 4 * r, 4, torch.int32)[0] = send_off[s] + land - int(
                land_start[s, 0])
            _mem(land_row_R + 4 * r, 4, torch.int32)[0] = land
            if phase_R:
                _mem(phase_R + 4 * r, 4, torch.int32)[0] = int(
                    src[stride - _TRAILER + 12:stride - _TRAILER + 16].view(torch.int32)[0])
            if chain_R:
                assert dedup and head_R and row_of_land
                head, nxt = src[stride - _TRAILER + 4:stride - _TRAILER + 12].view(torch.int32)
                _mem(chain_R + 4 * r, 4, torch.int32)[0] = int(nxt)
                _mem(head_R + 4 * r, 4, torch.int32)[0] = int(int(head) == land)
                _mem(row_of_land + 4 * land, 4, torch.int32)[0] = r

    def return_rows(self, num_rows, num_rows_dev, rows, row_bytes, src_rank_R, ret_index_R,
                    land_row_R, epoch, stream):
        for r in range(self._walk(num_rows, num_rows_dev)):
            src = int(_mem(src_rank_R + 4 * r, 4, torch.int32)[0])
            ret = int(_mem(ret_index_R + 4 * r, 4, torch.int32)[0])
            dst = self._region(src, self.g.ret_off + ret * self.g.ret_stride, row_bytes)
            dst[:] = _mem(rows + r * row_bytes, row_bytes)
        self._sync(epoch)

    def owner_reduce(self, dtype, num_rows, num_rows_dev, hidden, rows, gates_R, src_rank_R,
                     ret_index_R, chain_R, head_R, row_of_land, top_k, epoch, stream):
        row_dtype = _DTYPES[dtype]
        item = torch.empty(0, dtype=row_dtype).element_size()

        def i32(ptr, r):
            return int(_mem(ptr + 4 * r, 4, torch.int32)[0])

        for r in range(self._walk(num_rows, num_rows_dev)):
            if not i32(head_R, r):
                continue
            acc, row = None, r
            for _ in range(top_k):  # the chain: the token's slots here in slot order
                y = _mem(rows + row * hidden * item, hidden * item, row_dtype).float()
                term = y if not gates_R else _mem(gates_R + 4 * row, 4, torch.float32)[0] * y
                acc = term if acc is None else acc + term
                nxt = i32(chain_R, row)
                if nxt < 0:
                    break
                row = i32(row_of_land, nxt)
            dst = self._region(i32(src_rank_R, r),
                               self.g.ret_off + i32(ret_index_R, r) * self.g.ret_stride,
                               hidden * item, row_dtype)
            dst[:] = acc.to(row_dtype)
        self._sync(epoch)

    def reduce_slots(self, dtype, num_tokens, top_k, hidden, send_pos, gates, head_N, out,
                     stream):
        if num_tokens == 0:
            return
        row_dtype = _DTYPES[dtype]
        item = torch.empty(0, dtype=row_dtype).element_size()
        pos_N = _mem(send_pos, 4 * num_tokens * top_k, torch.int32).long()
        gates_N = _mem(gates, 4 * num_tokens * top_k, torch.float32) if gates else None
        out_TD = _mem(out, num_tokens * hidden * item, row_dtype).view(num_tokens, hidden)
        for t in range(num_tokens):
            acc = None
            for k in range(top_k):
                if head_N and not int(_mem(head_N + 4 * (t * top_k + k), 4, torch.int32)[0]):
                    continue
                offset = self.g.ret_off + int(pos_N[t * top_k + k]) * self.g.ret_stride
                y = self._region(self.rank, offset, hidden * item, row_dtype).float()
                term = y if gates_N is None else gates_N[t * top_k + k] * y
                acc = term if acc is None else acc + term
            # No slot flagged (head_N of a failed sync-free plan is never written): zeros.
            out_TD[t] = torch.zeros(hidden) if acc is None else acc.to(row_dtype)

    def owner_grad(self, y_dtype, grad_out_dtype, num_rows, num_rows_dev, hidden, y, src_rank_R,
                   ret_index_R, land_row_R, grad_y, epoch, stream):
        ty, tgo = _DTYPES[y_dtype], _DTYPES[grad_out_dtype]
        iy, igo = (torch.empty(0, dtype=t).element_size() for t in (ty, tgo))
        stride = self.g.recv_stride
        for r in range(self._walk(num_rows, num_rows_dev)):
            land = int(_mem(land_row_R + 4 * r, 4, torch.int32)[0])
            landed = self._region(self.rank, self.g.recv_off + land * stride, stride)
            grad_out = landed[:hidden * igo].view(tgo).float()
            gate = landed[stride - _TRAILER:stride - _TRAILER + 4].view(torch.float32)[0]
            y_row = _mem(y + r * hidden * iy, hidden * iy, ty).float()
            _mem(grad_y + r * hidden * iy, hidden * iy, ty)[:] = (gate * grad_out).to(ty)
            src = int(_mem(src_rank_R + 4 * r, 4, torch.int32)[0])
            ret = int(_mem(ret_index_R + 4 * r, 4, torch.int32)[0])
            self._region(src, self.g.dots_off + 4 * ret, 4, torch.float32)[0] = (
                grad_out * y_row).sum()
        self._sync(epoch)

    def gather_dots(self, num_slots, send_pos, out, stream):
        pos_N = _mem(send_pos, 4 * num_slots, torch.int32).long()
        out_N = _mem(out, 4 * num_slots, torch.float32)
        for i in range(num_slots):
            out_N[i] = self._region(self.rank, self.g.dots_off + 4 * int(pos_N[i]), 4,
                                    torch.float32)[0]

    def barrier(self, epoch, stream):
        self._sync(epoch)

    # The pipelined kernels (csrc/rdep_stream.cu): the same writes, and the flags a kernel
    # publishes and waits for, with the stream epoch; a wait polls (other ranks are threads).
    def _stream_epoch(self) -> int:
        word = self._region(self.rank, self.g.counter_off + 8 * 2, 8, torch.int64)
        return int(word[0]) + 1

    def _end_stream(self, epoch: int) -> None:
        self._region(self.rank, self.g.counter_off + 8 * 2, 8, torch.int64)[0] = epoch

    def _wait(self, flag: torch.Tensor, epoch: int, what: str) -> None:
        deadline = time.monotonic() + 60
        while int(flag[0]) < epoch:
            if self.group.barrier.broken or time.monotonic() > deadline:
                raise threading.BrokenBarrierError(f"rank {self.rank}: no {what}")
            time.sleep(1e-4)

    def _dflag(self, rank: int, source: int, chunk: int) -> torch.Tensor:
        assert 0 <= chunk < self.g.dflag_chunks
        return self._region(rank, self.g.dflags_off + 8 * (source * self.g.dflag_chunks + chunk),
                            8, torch.int64)

    def _cflag(self, rank: int, owner: int, phase: int) -> torch.Tensor:
        offset = self.g.cflags_off + 8 * (owner * rdep._STREAM_PHASES_MAX + phase)
        return self._region(rank, offset, 8, torch.int64)

    def dispatch_stream(self, ids, ids_int64, num_slots, num_tokens, top_k, send_pos, land_index,
                        slot_of_send, src0, stride0, bytes0, src1, stride1, bytes1, gates, info,
                        dedup, head_N, num_rows, out0, out1, gates_R, src_rank_R, ret_index_R,
                        land_row_R, chain_R, head_R, row_of_land, phase_R, phases, direct,
                        blocks_per_sm, send_percent, chunk_rows, stream):
        assert chunk_rows % rdep._STREAM_FLAG_ROWS == 0, chunk_rows
        assert not (direct and dedup) and (not direct or self.g.view_off >= 0)
        L, W, me = self.L, self.world, self.rank
        epoch = self._stream_epoch()
        ok = int(_mem(info, 8, torch.int64)[0]) == 0
        C = self._counts().long()
        if ok:
            self.scatter_slots(ids, ids_int64, num_slots, top_k, send_pos, land_index, src0,
                               stride0, bytes0, src1, stride1, bytes1, gates, info, dedup,
                               head_N, 0, stream, phase_tokens=num_tokens, phases=phases)
            if direct:
                self._direct_rows(ids, ids_int64, num_slots, send_pos, land_index, bytes0,
                                  bytes1)
            for o in range(W):  # publish every chunk of this rank's rows for each owner
                rows = int(C[me, o * L:(o + 1) * L].sum())
                for chunk in range(-(-rows // chunk_rows)):
                    self._dflag(o, me, chunk)[0] = epoch
            for s in range(W):  # wait for every chunk the count matrix announces
                rows = int(C[s, me * L:(me + 1) * L].sum())
                for chunk in range(-(-rows // chunk_rows)):
                    self._wait(self._dflag(me, s, chunk), epoch, "dispatch chunk")
            received = int(C[:, me * L:(me + 1) * L].sum())
            self.unpack(min(num_rows, received), 0, dedup, out0, bytes0, out1, bytes1, gates_R,
                        src_rank_R, ret_index_R, land_row_R, chain_R, head_R, row_of_land,
                        stream, phase_R=phase_R, direct=direct)
        self._end_stream(epoch)

    def _direct_rows(self, ids, ids_int64, num_slots, send_pos, land_index, bytes0, bytes1):
        """``direct``: each remote slot's payload moved from its landing row (then poisoned) to
        the owner's zero-copy outputs at its contract row there, found from the count matrix
        independently of the kernel's direct_base."""
        E, L, me = self.E, self.L, self.rank
        C = self._counts().long()[:, :E]
        ids_N = _mem(ids, num_slots * (8 if ids_int64 else 4),
                     torch.int64 if ids_int64 else torch.int32).long()
        pos_N = _mem(send_pos, 4 * num_slots, torch.int32).long()
        land_N = _mem(land_index, 4 * num_slots, torch.int32).long()
        first_pos = torch.cumsum(C[me], 0) - C[me]  # each expert's first send position
        stride, p1_offset = self.g.recv_stride, (bytes0 + 15) // 16 * 16
        for i in range(num_slots):
            x = int(ids_N[i])
            o, e = x // L, x % L
            r = int(C[:, o * L:o * L + e].sum()) + int(C[:me, x].sum()) + int(
                pos_N[i] - first_pos[x])
            if o != me:
                landed = self._region(o, self.g.recv_off + int(land_N[i]) * stride, stride)
                view = self._region(o, self.g.view_off, self.g.view_bytes)
                p1 = self.g.view_p1_off(self.capacity, bytes0)
                view[r * bytes0:(r + 1) * bytes0] = landed[:bytes0]
                if bytes1:
                    view[p1 + r * bytes1:p1 + (r + 1) * bytes1] = landed[
                        p1_offset:p1_offset + bytes1]
                landed[:stride - _TRAILER] = 0xFF  # the owner must not read it (NaN bytes)

    def combine_stream(self, dtype, num_rows, num_rows_dev, hidden, rows, src_rank_R,
                       ret_index_R, phase_R, phases, num_tokens, phase_tokens, top_k, send_pos,
                       gates, out, blocks_per_sm, send_percent, stream):
        assert 1 <= phases <= rdep._STREAM_PHASES_MAX, phases
        W, me = self.world, self.rank
        epoch = self._stream_epoch()
        item = torch.empty(0, dtype=_DTYPES[dtype]).element_size()
        row_bytes = hidden * item
        walk = self._walk(num_rows, num_rows_dev)
        phase_of = [int(_mem(phase_R + 4 * r, 4, torch.int32)[0]) for r in range(walk)]
        for p in range(phases):
            for r in range(walk):
                if phase_of[r] == p:
                    src = int(_mem(src_rank_R + 4 * r, 4, torch.int32)[0])
                    ret = int(_mem(ret_index_R + 4 * r, 4, torch.int32)[0])
                    dst = self._region(src, self.g.ret_off + ret * self.g.ret_stride, row_bytes)
                    dst[:] = _mem(rows + r * row_bytes, row_bytes)
            for s in range(W):
                self._cflag(s, me, p)[0] = epoch
        for p in range(phases):
            t0 = -(-p * phase_tokens // phases)
            t1 = -(-(p + 1) * phase_tokens // phases)
            if num_tokens == 0 or t0 == t1:
                continue
            for o in range(W):
                self._wait(self._cflag(me, o, p), epoch, "combine phase")
            self._reduce_range(dtype, t0, t1, top_k, hidden, send_pos, gates, out)
        self._end_stream(epoch)

    def _reduce_range(self, dtype, t0, t1, top_k, hidden, send_pos, gates, out):
        """reduce_slots for tokens [t0, t1) (one row per slot)."""
        row_dtype = _DTYPES[dtype]
        item = torch.empty(0, dtype=row_dtype).element_size()
        for t in range(t0, t1):
            acc = None
            for k in range(top_k):
                pos = int(_mem(send_pos + 4 * (t * top_k + k), 4, torch.int32)[0])
                y = self._region(self.rank, self.g.ret_off + pos * self.g.ret_stride,
                                 hidden * item, row_dtype).float()
                if gates:
                    y = _mem(gates + 4 * (t * top_k + k), 4, torch.float32)[0] * y
                acc = y if acc is None else acc + y
            _mem(out + t * hidden * item, hidden * item, row_dtype)[:] = acc.to(row_dtype)


class EmulatedDispatcher(RdepDispatcher):
    """`RdepDispatcher` over `EmulatedRdep` (every peer "mapped", in-kernel barriers)."""

    name = "emulated"

    def __init__(self, group: _Group | None, num_experts: int, capacity: int, world_size: int,
                 rank: int, *, hidden: int, dtype: torch.dtype, max_send_rows: int,
                 dedup_rows: bool = False, reduce_on_owner: bool = False,
                 pipelined: bool = True, zero_copy: bool = False):
        super().__init__(num_experts, capacity, world_size, rank)
        self._init_engine(hidden=hidden, dtype=dtype, max_send_rows=max_send_rows, timeout_s=60,
                          dedup_rows=dedup_rows, reduce_on_owner=reduce_on_owner,
                          pipelined=pipelined, zero_copy=zero_copy)
        if zero_copy and group is not None:  # as _attach does on a GPU
            off, size = self.layout.view_off, self.layout.view_bytes
            self._view = group.buffers[rank][off:off + size]
        self.device = torch.device("cpu")
        self._device_index = None
        self._unmapped = ()
        self._rdep = EmulatedRdep(group, self.layout, rank, world_size, num_experts, capacity,
                                  max_send_rows)


def _run_ranks(world: int, body, groups: tuple[_Group, ...]) -> None:
    """``body(rank, gather)`` on ``world`` threads; re-raises the first rank's failure (the
    other ranks' barriers are broken so that they stop at once)."""
    failures: list = [None] * world
    lock = threading.Barrier(world, timeout=120)
    shared: list = [None] * world

    def gather(obj):
        rank = threading.current_thread().rank
        shared[rank] = obj
        lock.wait()
        out = list(shared)
        lock.wait()
        return out

    def run(rank):
        threading.current_thread().rank = rank
        try:
            body(rank, gather)
        except BaseException as err:  # noqa: BLE001 (reported below)
            failures[rank] = err
            lock.abort()
            for group in groups:
                group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    errors = [f for f in failures if f is not None and not isinstance(
        f, threading.BrokenBarrierError)]
    if errors:
        raise errors[0]
    if any(failures):
        raise failures[0]


def _make(group, world, rank, cases, capacity=None, dedup_rows=False, reduce_on_owner=False,
          pipelined=True, zero_copy=False):
    widest = max(max(c.hidden, c.out_hidden) for c in cases.values())
    send = max(max(c.tokens) * c.top_k for c in cases.values())
    capacity = capacity or testing.group_capacity(cases, world)
    return EmulatedDispatcher(group, testing.group_num_experts(world), capacity, world, rank,
                              hidden=widest, dtype=torch.float32, max_send_rows=send,
                              dedup_rows=dedup_rows, reduce_on_owner=reduce_on_owner,
                              pipelined=pipelined, zero_copy=zero_copy)


@pytest.fixture
def no_cuda_stream(monkeypatch):
    monkeypatch.setattr(rdep, "_current_stream", lambda index: 0)


@pytest.mark.parametrize(("world", "sync", "dedup", "pipelined", "zero_copy"), [
    (2, True, False, True, False), (2, False, False, True, False), (2, True, True, True, False),
    (2, False, True, True, False), (3, True, False, True, False), (3, False, True, True, False),
    (2, True, "owner", True, False), (3, False, "owner", True, False),
    (2, True, False, False, False), (3, False, True, False, False),
    (2, False, "owner", False, False), (2, True, False, True, True), (3, False, False, True, True),
    (2, False, True, True, True), (2, True, False, False, True)])
def test_engine_equals_reference(gen, no_cuda_stream, world, sync, dedup, pipelined, zero_copy):
    """Every `GROUP_CASES` case (random routing, a rank receiving nothing, everything on one
    expert, K = 1 and 8, D not a multiple of 128, a rank without tokens) in bfloat16 and
    float32, FP8 dispatch, two handles alive at once, collective errors and the capacity error:
    bitwise against the reference, synchronous and sync-free, one row per slot or (``dedup``)
    per token and owner, and (``"owner"``, ``reduce_on_owner``) summed on the owners too; with
    the pipelined kernels (chunk and phase flags with stream epochs) and without; with
    ``zero_copy`` outputs (views of the buffer; pipelined one row per slot: stored straight at
    the contract rows, the landing payloads poisoned)."""
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    cases = {**testing.GROUP_CASES, "fp8_random": testing.FP8_GROUP_CASES["fp8_random"]}
    probe = _make(None, world, 0, cases, zero_copy=zero_copy)
    group = _Group(world, probe.layout.total_bytes)
    small_layout = _make(None, world, 0, testing.GROUP_CASES, capacity=40,
                         zero_copy=zero_copy).layout
    small_group = _Group(world, small_layout.total_bytes)

    def body(rank, gather):
        dispatcher = _make(group, world, rank, cases, dedup_rows=bool(dedup),
                           reduce_on_owner=dedup == "owner", pipelined=pipelined,
                           zero_copy=zero_copy)
        testing.run_group_checks(
            dispatcher, seed, gather, "cpu", cases=testing.GROUP_CASES,
            dtypes=(torch.bfloat16, torch.float32),
            fp8_cases={"fp8_random": testing.FP8_GROUP_CASES["fp8_random"]}, sync=sync)
        testing.check_interleaved_calls(dispatcher, seed, gather, "cpu", sync=sync)
        testing.check_collective_errors(dispatcher, seed, gather, "cpu", sync=sync)
        small = _make(small_group, world, rank, testing.GROUP_CASES, capacity=40,
                      dedup_rows=bool(dedup), reduce_on_owner=dedup == "owner",
                      pipelined=pipelined, zero_copy=zero_copy)
        testing.check_capacity_error(small, seed, gather, "cpu", sync=sync)
        testing.check_group_case(small, "top1", testing.GroupCase((13,), 1, 20, 20, "distinct"),
                                 torch.float32, seed, gather, "cpu", sync=sync)

    try:
        _run_ranks(world, body, (group, small_group))
    except AssertionError as err:
        raise AssertionError(f"{err} (seed {seed})") from err


def test_handle_state_is_owned_by_the_handle(gen, no_cuda_stream):
    """A handle's routing tensors are not views of storage a later dispatch reuses: two
    dispatches' handles share no memory (several MoE layers, or a forward and the backward's
    re-dispatch, hold handles of one dispatcher at once)."""
    world, cases = 2, {"random": testing.GROUP_CASES["random"]}
    group = _Group(world, _make(None, world, 0, cases).layout.total_bytes)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))

    def body(rank, gather):
        dispatcher = _make(group, world, rank, cases)
        x, ids, gates = testing.rank_inputs(cases["random"], "random", rank, world,
                                            torch.float32, seed)
        first = dispatcher.dispatch(x, ids, gates, sync=False)
        second = dispatcher.dispatch(x, ids, gates)
        tensors = lambda d: [d.x_RD, d.counts_E, d.gates_R, d.num_received,  # noqa: E731
                             *(getattr(d.handle.state, f) for f in (
                                 "info_8", "send_pos_N", "land_index_N", "src_rank_R",
                                 "ret_index_R", "land_row_R"))]
        ptrs = {t.untyped_storage().data_ptr() for t in tensors(first) if t is not None}
        assert not ptrs & {t.untyped_storage().data_ptr() for t in tensors(second)
                           if t is not None}
        assert first.x_RD.shape[0] == dispatcher.capacity
        num_rows = int(first.num_received[0])
        assert torch.equal(first.x_RD[:num_rows], second.x_RD)

    _run_ranks(world, body, (group,))


def test_autograd_sync_free_equals_sync(gen, no_cuda_stream):
    """`nmoe_comm.autograd` through the engine: a small expert-parallel MoE (each rank runs its
    local experts on its segments) gives bitwise the same output and gradients (rows, gates,
    expert weights) with the sync-free dispatch, whose padded rows carry NaN expert outputs."""
    from nmoe_comm import autograd as comm_autograd

    world, case = 2, testing.GROUP_CASES["random"]
    cases = {"random": case}
    group = _Group(world, _make(None, world, 0, cases).layout.total_bytes)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    results: dict = {}

    def moe(dispatcher, x, ids, gates, weights, sync):
        received = comm_autograd.dispatch(dispatcher, x, ids, gates, sync=sync)
        offsets = received.offsets_E1.tolist()
        y_RD = torch.cat([received.x_RD[offsets[e]:offsets[e + 1]] @ weights[e]
                          for e in range(weights.shape[0])])
        pad = received.x_RD.shape[0] - y_RD.shape[0]
        y_RD = torch.cat([y_RD, torch.full((pad, y_RD.shape[1]), float("nan"))])
        return comm_autograd.combine(dispatcher, y_RD, received.handle, gates)

    def body(rank, gather):
        dispatcher = _make(group, world, rank, cases)
        x, ids, gates = testing.rank_inputs(case, "random", rank, world, torch.float32, seed)
        weights = torch.randn(dispatcher.num_local_experts, case.hidden, case.out_hidden,
                              generator=torch.Generator().manual_seed(seed + rank)) / 10
        for sync in (True, False):
            leaves = [t.clone().requires_grad_() for t in (x, gates, weights)]
            out = moe(dispatcher, *leaves[:1], ids, *leaves[1:], sync)
            out_grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
            (out * out_grad).sum().backward()
            results[(rank, sync)] = [out.detach()] + [t.grad for t in leaves]

    _run_ranks(world, body, (group,))
    for rank in range(world):
        for name, got, want in zip(("out", "grad x", "grad gates", "grad weights"),
                                   results[(rank, False)], results[(rank, True)]):
            testing.assert_bitwise_equal(got, want, f"rank {rank} {name} (seed {seed})")


def test_stage_hook_reports_every_stage(gen, no_cuda_stream):
    """``stage_hook`` (bench ``--breakdown``) sees the documented stages in order, without
    ``host_sync`` for a sync-free dispatch, and costs nothing when unset."""
    world, cases = 2, {"top1": testing.GROUP_CASES["top1"]}
    group = _Group(world, _make(None, world, 0, cases).layout.total_bytes)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    seen: dict = {}

    def body(rank, gather):
        for pipelined in (True, False):
            dispatcher = _make(group, world, rank, cases, pipelined=pipelined)
            x, ids, gates = testing.rank_inputs(cases["top1"], "top1", rank, world,
                                                torch.float32, seed)
            for sync in (True, False):
                stages: list[str] = []
                dispatcher.stage_hook = stages.append
                received = dispatcher.dispatch(x, ids, gates, sync=sync)
                dispatcher.combine(received.x_RD, received.handle)
                dispatcher.stage_hook = None
                dispatcher.dispatch_backward(received.x_RD, received.handle)
                seen[(rank, sync, pipelined)] = stages

    _run_ranks(world, body, (group,))
    combine = ["checks", "return_rows", "reduce_slots"]
    for rank in range(world):
        assert seen[(rank, True, False)] == ["checks", "route_plan", "scatter_slots", "host_sync",
                                             "alloc", "unpack", "handle", *combine]
        assert seen[(rank, False, False)] == ["checks", "route_plan", "scatter_slots", "alloc",
                                              "unpack", "handle", *combine]
        # The pipelined kernels: the host sync comes before the one dispatch kernel.
        assert seen[(rank, True, True)] == ["checks", "route_plan", "host_sync", "alloc",
                                            "dispatch_stream", "handle", "checks",
                                            "combine_stream"]
        assert seen[(rank, False, True)] == ["checks", "route_plan", "alloc", "dispatch_stream",
                                             "handle", "checks", "combine_stream"]


@pytest.mark.parametrize(("max_send_rows", "dedup", "hidden", "expected"), [
    (1024, False, 7168, False),   # decode-sized: the two-kernel path
    (4096, False, 768, True),     # training-sized, one row per slot
    (32768, True, 768, False),    # deduplicated narrow rows (`super`): the two-kernel path
    (32768, True, 2048, True),    # 4 KiB bfloat16 rows
    (32768, True, 7168, True)])
def test_pipelined_default_follows_size_and_row_width(max_send_rows, dedup, hidden, expected):
    """``pipelined=None`` decides from the construction arguments only (alike on every rank):
    on from `PIPELINE_MIN_SEND_ROWS` slots, and with ``dedup_rows`` only for rows of at least
    `PIPELINE_MIN_DEDUP_ROW_BYTES`; an explicit True / False wins; anything else is refused."""
    def make(pipelined):
        dispatcher = RdepDispatcher.__new__(RdepDispatcher)
        RdepDispatcher.__init__(dispatcher, 8, 64, 2, 0)
        dispatcher._init_engine(hidden=hidden, dtype=torch.bfloat16, max_send_rows=max_send_rows,
                                timeout_s=1, dedup_rows=dedup, pipelined=pipelined)
        return dispatcher.pipelined

    assert make(None) is expected
    assert make(True) is True and make(False) is False
    with pytest.raises(ValueError, match="pipelined must be True, False or None"):
        make("yes")


@pytest.mark.parametrize(("settings", "match"), [
    ({"dispatch_grid": (2, 75, 12)}, r"dispatch_grid\[2\].*multiple of 8"),
    ({"dispatch_grid": (2, 75, 512)}, r"dispatch_grid\[2\].*from 8 to 256"),
    ({"dispatch_grid": (2, 75)}, "dispatch_grid must be a tuple of 3 ints"),
    ({"dispatch_grid": (0, 75, 32)}, "blocks per SM must be >= 1"),
    ({"combine_grid": (4, 101)}, r"combine_grid = \(4, 101\)"),
    ({"dispatch_grid": (2, 75, 32.0)}, "tuple of 3 ints"),
    ({"stream_phases": 0}, "stream_phases must be an int from 1 to 64"),
    ({"stream_phases": 65}, "stream_phases"), ({"stream_phases": 16.0}, "stream_phases"),
    ({"stream_phases": True}, "stream_phases"), ({"stream_phases": None}, "stream_phases")])
def test_bad_stream_grid_raises_before_anything_moves(gen, no_cuda_stream, settings, match):
    """A pipelined dispatch checks `RdepDispatcher.dispatch_grid`, ``combine_grid`` and
    ``stream_phases`` before any routing or row moves: every rank raises ValueError naming the
    attribute, and the same dispatcher works once the setting is valid again."""
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    world, cases = 2, {"random": testing.GROUP_CASES["random"]}
    group = _Group(world, _make(None, world, 0, cases).layout.total_bytes)

    def body(rank, gather):
        dispatcher = _make(group, world, rank, cases)
        x, ids, gates = testing.rank_inputs(cases["random"], "random", rank, world,
                                            torch.float32, seed)
        for name, value in settings.items():
            setattr(dispatcher, name, value)
        with pytest.raises(ValueError, match=match):
            dispatcher.dispatch(x, ids, gates)
        for name in settings:
            delattr(dispatcher, name)
        testing.check_group_case(dispatcher, "random", cases["random"], torch.float32, seed,
                                 gather, "cpu")

    try:
        _run_ranks(world, body, (group,))
    except AssertionError as err:
        raise AssertionError(f"{err} (seed {seed})") from err


@pytest.mark.parametrize("phases", [1, 3, 16, 64])
def test_stream_phases_of_the_dispatch_carry_to_its_combine(gen, no_cuda_stream, phases):
    """`RdepDispatcher.stream_phases`: the pipelined combine returns and reduces in that many
    token phases (1 to 64, more phases than tokens included), bitwise as the reference; the
    dispatch keeps its value in the handle, so a combine after the attribute changed still runs
    with the dispatch's phases (its rows carry phase numbers of that split)."""
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    world = 3
    cases = {k: testing.GROUP_CASES[k] for k in ("random", "all_on_one")}
    group = _Group(world, _make(None, world, 0, cases).layout.total_bytes)

    def body(rank, gather):
        dispatcher = _make(group, world, rank, cases)
        dispatcher.stream_phases = phases
        for name, case in cases.items():
            testing.check_group_case(dispatcher, name, case, torch.float32, seed, gather, "cpu")
        x, ids, gates = testing.rank_inputs(cases["random"], "random", rank, world,
                                            torch.float32, seed)
        x = x * 3 - 1  # rows the earlier combines did not leave in the return buffer
        received = dispatcher.dispatch(x, ids, gates)
        assert received.handle.state.phases == phases
        phase_R = received.handle.state.phase_R
        assert phase_R.numel() == 0 or int(phase_R.max()) < phases
        dispatcher.stream_phases = 1 if phases > 1 else 64  # the handle's value stays in force
        out = dispatcher.combine(received.x_RD, received.handle)
        expected = None  # rule 2 on the source's own rows: g0*x, + g1*x, ... in float32
        for k in range(ids.shape[1]):
            term = gates[:, k, None] * x
            expected = term if expected is None else expected + term
        assert torch.equal(out, expected), (rank, (out - expected).abs().max())

    try:
        _run_ranks(world, body, (group,))
    except AssertionError as err:
        raise AssertionError(f"{err} (seed {seed})") from err


@pytest.mark.parametrize("pipelined", [True, False])
def test_failed_plan_keeps_the_count_matrix_until_every_rank_read_it(gen, no_cuda_stream,
                                                                     pipelined):
    """Rank 0 passes a bad expert id; rank 1 is slow to read the count matrix of that plan.
    Rank 0 raises first and dispatches again at once, which writes its new (clean) count row
    into rank 1's matrix -- unless the next call barriers first. Rank 1 must still raise the
    same error, and the next dispatch must work on both ranks (against the reference). The
    pipelined path has no barrier after the plan; the two-kernel scatter ends in one."""
    world, name = 2, "random"
    cases = {name: testing.GROUP_CASES[name]}
    group = _Group(world, _make(None, world, 0, cases).layout.total_bytes)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))

    def body(rank, gather):
        dispatcher = _make(group, world, rank, cases, pipelined=pipelined)
        x, ids, gates = testing.rank_inputs(cases[name], name, rank, world, torch.float32, seed)
        bad = ids.clone()
        if rank == 0:
            bad.view(-1)[-1] = dispatcher.num_experts
        engine = dispatcher._rdep
        reads = engine._counts
        calls = []

        def slow_counts():  # rank 1 reads the matrix of the failing plan late
            calls.append(None)
            if rank == 1 and len(calls) == 1:
                time.sleep(0.5)
            return reads()

        engine._counts = slow_counts
        with pytest.raises(ValueError, match="rank 0 passed expert ids outside"
                           if rank == 1 else "this rank passed expert ids outside"):
            dispatcher.dispatch(x, bad, gates)
        again = dispatcher.dispatch(x, ids, gates)  # at once: no collective in between
        y = dispatcher.combine(again.x_RD, again.handle)
        gather(None)  # both ranks done before the reference check
        testing.check_group_case(dispatcher, name, cases[name], torch.float32, seed, gather,
                                 "cpu")
        fresh = dispatcher.dispatch(x, ids, gates)
        assert torch.equal(y, dispatcher.combine(fresh.x_RD, fresh.handle))  # bitwise

    _run_ranks(world, body, (group,))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_direct_base_gives_the_contract_rows(gen, world):
    """The zero-copy dispatch's sender arithmetic (csrc ``StreamTables::build_direct``: the
    count matrix's other ranks' rows scanned over each owner's experts, plus the rows of earlier
    ranks) puts every slot at the contract row of the reference's layout, on random count
    matrices with empty experts and empty ranks."""
    local = int(torch.randint(1, 5, (1,), generator=gen))
    E = world * local
    C = torch.randint(0, 4, (world, E), generator=gen)
    C[:, int(torch.randint(0, E, (1,), generator=gen))] = 0  # an expert nobody routes to
    C[int(torch.randint(0, world, (1,), generator=gen))] = 0  # a rank that sends nothing
    for me in range(world):
        others = C.sum(0) - C[me]
        scan = torch.cumsum(others, 0) - others
        seg = scan[torch.arange(E) // local * local]
        direct_base = scan - seg + C[:me].sum(0)
        for o in range(world):
            owner = slice(o * local, (o + 1) * local)
            # the owner's contract order: (local expert, source, slot), every source's rows
            contract = [(x, s, j) for x in range(o * local, (o + 1) * local)
                        for s in range(world) for j in range(int(C[s, x]))]
            rel = 0  # position in this rank's send order to o
            for x in range(o * local, (o + 1) * local):
                for j in range(int(C[me, x])):
                    assert int(direct_base[x]) + rel == contract.index((x, me, j)), (me, o, x)
                    rel += 1
            assert rel == int(C[me, owner].sum())


@pytest.mark.parametrize(("zero_copy", "dedup", "grid"), [
    (False, False, RdepDispatcher.dispatch_grid), (True, False, rdep.ZERO_COPY_DISPATCH_GRID),
    (True, True, RdepDispatcher.dispatch_grid)])
def test_zero_copy_direct_stores_take_more_senders(zero_copy, dedup, grid):
    """A zero-copy dispatcher with one row per slot (direct stores: the receivers only record
    the routing) dispatches with more sender blocks; with dedup_rows the receivers still copy
    rows, and the default grid stays. Its buffer gains the output rows."""
    cases = testing.GROUP_CASES
    made = _make(None, 2, 0, cases, dedup_rows=dedup, zero_copy=zero_copy)
    plain = _make(None, 2, 0, cases, dedup_rows=dedup)
    assert made.dispatch_grid == grid
    extra = made.layout.total_bytes - plain.layout.total_bytes
    if zero_copy:
        assert made.layout.view_bytes == made.capacity * made.layout.row_bytes + 16
        assert made.layout.view_off >= plain.layout.total_bytes and extra >= made.layout.view_bytes
        assert made.buffer_size_hint(capacity=made.capacity, hidden=made.hidden,
                                     dtype=made.row_dtype, world_size=2,
                                     max_send_rows=made.max_send_rows,
                                     num_experts=made.num_experts,
                                     zero_copy=True) == made.layout.total_bytes
    else:
        assert extra == 0 and made.layout.view_off == -1


def test_autograd_refuses_a_zero_copy_dispatcher(no_cuda_stream):
    """Autograd keeps x_RD for the backward, and a zero-copy dispatcher's x_RD is overwritten by
    the next dispatch: `nmoe_comm.autograd.dispatch` raises before anything moves, naming the
    option and the fix."""
    from nmoe_comm import autograd as comm_autograd

    cases = testing.GROUP_CASES
    made = _make(None, 1, 0, cases, zero_copy=True)
    x = torch.randn(4, 8, requires_grad=True)
    ids = torch.zeros(4, 1, dtype=torch.int64)
    gates = torch.ones(4, 1)
    with pytest.raises(ValueError, match="zero_copy=False for training"):
        comm_autograd.dispatch(made, x, ids, gates)
