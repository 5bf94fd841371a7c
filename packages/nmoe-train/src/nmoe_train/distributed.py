"""Process groups and ZeRO-2 for the parameters every rank holds a copy of.

Under torchrun every rank runs the same model code. Parameters fall in two classes:

- *replicated* (attention, norms, routers, embeddings, head, dense MLPs, and the experts when they
  are not split over ranks): every rank holds a copy, gradients must be summed over ranks.
- *local* (the experts of an expert-parallel run): each rank holds its own slice; the dispatcher
  already routes every rank's tokens through them, so their gradients are complete as computed.

ZeRO-2 for the replicated class: the parameters live in two flat float32 buffers, and their
``.grad`` are views into two matching flat gradient buffers, so backward accumulates straight into
them. Buffer B holds the AdamW-managed tensors (split elementwise into ``world`` equal segments);
buffer A holds the Muon-managed matrices, each owned whole by one rank (Muon orthogonalises whole
matrices). After backward, each segment's gradient is reduce-scattered (summed) in chunks of
``chunk_bytes`` to its owner, which steps only its shard and then all-gathers the updated values.
Optimizer state therefore exists once across the group instead of ``world`` times. The gradient
clipping norm is reduced over owned shards and local tensors, so every tensor counts exactly once.

Gradient clipping never leaves the device: `grad_norm_sq` sums the squares of per-tensor norms
from one fused reduction (``torch._foreach_norm``, no squared copy of any gradient),
`clip_coefficient` turns the global norm into the clipping factor as a device scalar, and the
optimizers' ``step(grad_coef=...)`` multiply it into the gradients where they read them (Muon's
update, fused AdamW's ``grad_scale``) or, for the unfused AdamW of CPU runs, in one
``torch._foreach_mul_``. The trainer reads the norm only with the step's other statistics.

Losses are normalised by the *global* number of target tokens before backward and gradients are
*summed*, so a run on W ranks optimises exactly the objective of one process with the same global
batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# Imported before any process group exists, on purpose. torch.distributed.nn.functional binds
# ``group=group.WORLD`` as default arguments when it is first imported; torch.optim's first
# optimizer imports it (through torch._dynamo). Imported after init_process_group, those defaults
# keep the default group alive after destroy_process_group, so gloo's worker threads outlive it
# into interpreter shutdown, where one of them can abort the process ("terminate called without
# an active exception", SIGABRT, about 1 exit in 10 with torch 2.13). See `shutdown_distributed`.
import torch.distributed.nn.functional  # noqa: F401
from torch import nn

from nmoe_core.optim import Muon, OptimizerConfig, Optimizers, build_optimizer, make_adamw

_ALIGN = 64  # elements; keeps every segment and chunk 256-byte aligned in float32


@dataclass
class DistInfo:
    """Where this process sits: global rank/world and the device it drives."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Initialise torch.distributed from torchrun's environment (no-op for one process).

    Args:
        device_kind: ``"cpu"`` or ``"cuda"``. CUDA uses NCCL and ``cuda:LOCAL_RANK``; CPU gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        device_id = device if device_kind == "cuda" else None
        dist.init_process_group(backend=backend, device_id=device_id)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    """Leave the default process group together and free it (no-op without one).

    All ranks wait at a barrier, so none tears its connections down while a peer is still
    inside the last collective, and then destroy the group, so its worker threads are joined
    now rather than during interpreter shutdown. Call it once, on every rank, after the last
    collective: the CLIs do this after training.
    """
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (identity for one process); returns it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def grad_norm_sq(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the squares of every element of ``grads``, without a squared copy of any of them.

    Args:
        grads: floating tensors of any shapes, all on one device (gradients, or flat gradient
            shards); may be empty.

    Returns:
        A 0-dim float64 tensor on the gradients' device (CPU when ``grads`` is empty): the sum
        over tensors of their squared L2 norms. Each norm comes from one fused reduction
        (``torch._foreach_norm``) that accumulates in float32 for float32, bfloat16 and float16
        gradients and in float64 for float64 ones; squares and the sum over tensors are float64.
    """
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        if not grad.is_floating_point():
            raise ValueError(f"grad_norm_sq takes floating tensors, got one of {grad.dtype}")
        by_dtype.setdefault(grad.dtype, []).append(grad)
    parts = []
    for dtype, same in by_dtype.items():
        norms = torch._foreach_norm(same, 2, dtype=torch.float32 if dtype in _LOW_PRECISION
                                    else None)
        parts.append(torch.stack(norms).double().square().sum())
    if not parts:
        return torch.zeros((), dtype=torch.float64)
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def clip_coefficient(grad_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The gradient-clipping factor as a device tensor (no host read).

    Args:
        grad_norm: floating tensor of one element (the global L2 norm of the gradients), any
            device and dtype (float64 in the trainer).
        max_norm: the clipping threshold (> 0).

    Returns:
        A tensor of ``grad_norm``'s shape, dtype and device: ``max_norm / (grad_norm + 1e-6)``
        where ``grad_norm > max_norm``, else exactly 1.0 (a NaN norm gives 1.0, an infinite one
        0.0, as the host-side comparison did).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}; use grad_clip=None to disable")
    if grad_norm.numel() != 1 or not grad_norm.is_floating_point():
        raise ValueError(f"grad_norm must be a floating tensor of one element, got shape "
                         f"{tuple(grad_norm.shape)} and dtype {grad_norm.dtype}")
    # A tensor divided by a tensor: ``float / tensor`` is computed as reciprocal-then-multiply,
    # one rounding more than the host formula's division.
    clipped = torch.full_like(grad_norm, max_norm) / (grad_norm + 1e-6)
    return torch.where(grad_norm > max_norm, clipped, torch.ones_like(grad_norm))


def _uses_nccl() -> bool:
    return dist.is_initialized() and dist.get_backend() == "nccl"


@dataclass
class _Slot:
    """A parameter's place in a flat buffer."""

    name: str
    param: nn.Parameter
    offset: int
    owner: int  # rank that owns it whole (buffer A), -1 for elementwise (buffer B)


class _FlatBuffer:
    """Parameters re-pointed into one flat float32 buffer, with a matching gradient buffer."""

    def __init__(self, slots: list[_Slot], size: int, segment: int, device: torch.device):
        self.slots = slots
        self.segment = segment
        self.params = torch.zeros(size, dtype=torch.float32, device=device)
        self.grads = torch.zeros(size, dtype=torch.float32, device=device)
        for slot in slots:
            p, n = slot.param, slot.param.numel()
            if p.dtype != torch.float32:
                raise ValueError(
                    f"ZeRO-2 keeps float32 master weights; parameter {slot.name} is {p.dtype}"
                )
            view = self.params[slot.offset : slot.offset + n].view_as(p)
            view.copy_(p.detach())
            p.data = view
            p.grad = self.grads[slot.offset : slot.offset + n].view_as(p)

    def shard(self, buf: torch.Tensor, rank: int) -> torch.Tensor:
        return buf[rank * self.segment : (rank + 1) * self.segment]


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


class Zero2Optimizer:
    """ZeRO-2 (module docstring) behind the `Optimizers` interface used by the trainer.

    Args:
        model: the model; its replicated parameters are re-pointed into flat buffers.
        cfg: optimizer config (groups and hyperparameters as `build_optimizer` makes them).
        local_param_ids: ids of parameters that are local to this rank (expert-parallel experts).
        rank, world_size: place in the default process group.
        chunk_bytes: reduce-scatter/all-gather chunk size.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: OptimizerConfig,
        local_param_ids: set[int],
        rank: int,
        world_size: int,
        chunk_bytes: int = 256 << 20,
    ):
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.chunk = max(_ALIGN, _round_up(chunk_bytes // 4, _ALIGN))
        full = build_optimizer(model.param_kinds(), cfg)  # group structure; holds no state
        device = next(model.parameters()).device
        muon_groups, adamw_groups, local_muon, local_adamw = [], [], [], []
        for opt_name, group in full.groups:
            hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            named = list(zip(group["param_names"], group["params"], strict=True))
            local = [(n, p) for n, p in named if id(p) in local_param_ids]
            shared = [(n, p) for n, p in named if id(p) not in local_param_ids]
            (local_muon if opt_name == "muon" else local_adamw).append((hyper, local))
            (muon_groups if opt_name == "muon" else adamw_groups).append((hyper, shared))
        self.buffer_a = self._layout_whole(muon_groups, device)
        self.buffer_b = self._layout_elementwise(adamw_groups, device)
        self.sharded = self._sharded_optimizers(muon_groups, adamw_groups)
        self.local = _optimizers_over(local_muon, local_adamw, cfg)

    # ----------------------------------------------------------------------------------------
    # Layout

    def _layout_whole(self, groups, device) -> _FlatBuffer:
        """Muon matrices: each owned whole by the least-loaded rank (largest first)."""
        named = [(n, p) for _, members in groups for n, p in members]
        loads = [0] * self.world_size
        owner: dict[int, int] = {}
        for _, p in sorted(named, key=lambda item: -item[1].numel()):
            r = min(range(self.world_size), key=lambda i: loads[i])
            owner[id(p)] = r
            loads[r] += _round_up(p.numel(), _ALIGN)
        segment = _round_up(max(loads + [_ALIGN]), _ALIGN)
        cursor = [r * segment for r in range(self.world_size)]
        slots = []
        for n, p in named:
            r = owner[id(p)]
            slots.append(_Slot(n, p, cursor[r], r))
            cursor[r] += _round_up(p.numel(), _ALIGN)
        return _FlatBuffer(slots, segment * self.world_size, segment, device)

    def _layout_elementwise(self, groups, device) -> _FlatBuffer:
        """AdamW tensors: concatenated group by group, cut into equal segments."""
        slots, offset = [], 0
        for _, members in groups:
            for n, p in members:
                slots.append(_Slot(n, p, offset, -1))
                offset += p.numel()
        segment = _round_up(max(1, math.ceil(offset / self.world_size)), _ALIGN)
        return _FlatBuffer(slots, segment * self.world_size, segment, device)

    def _sharded_optimizers(self, muon_groups, adamw_groups) -> Optimizers:
        """Optimizers over this rank's pieces, one group per original group (maybe empty)."""
        seg_lo, seg_hi = self.rank * self.buffer_b.segment, (self.rank + 1) * self.buffer_b.segment
        slot_of = {id(s.param): s for s in self.buffer_a.slots + self.buffer_b.slots}
        muon_pieces, adamw_pieces = [], []
        for hyper, members in muon_groups:
            pieces = []
            for _, p in members:
                slot = slot_of[id(p)]
                if slot.owner == self.rank:
                    piece = nn.Parameter(p.data, requires_grad=True)  # aliases buffer A
                    piece.grad = p.grad
                    piece.muon_col_blocks = getattr(p, "muon_col_blocks", 1)
                    pieces.append((slot.name, piece))
            muon_pieces.append((hyper, pieces))
        for hyper, members in adamw_groups:
            if not members:
                adamw_pieces.append((hyper, []))
                continue
            lo = slot_of[id(members[0][1])].offset
            hi = slot_of[id(members[-1][1])].offset + members[-1][1].numel()
            lo, hi = max(lo, seg_lo), min(hi, seg_hi)
            pieces = []
            if lo < hi:
                piece = nn.Parameter(self.buffer_b.params[lo:hi], requires_grad=True)
                piece.grad = self.buffer_b.grads[lo:hi]
                pieces.append((f"{hyper['name']}[{lo}:{hi}]", piece))
            adamw_pieces.append((hyper, pieces))
        return _optimizers_over(muon_pieces, adamw_pieces, self.cfg, keep_empty=True)

    # ----------------------------------------------------------------------------------------
    # Communication

    def _chunks(self, segment: int):
        for start in range(0, segment, self.chunk):
            yield start, min(self.chunk, segment - start)

    def _reduce_scatter(self, buf: _FlatBuffer) -> None:
        world, seg = self.world_size, buf.segment
        for start, length in self._chunks(seg):
            rows = buf.grads.view(world, seg)[:, start : start + length]
            scratch = rows.contiguous()
            mine = buf.grads[self.rank * seg + start : self.rank * seg + start + length]
            if _uses_nccl():
                dist.reduce_scatter_tensor(mine, scratch, op=dist.ReduceOp.SUM)
            else:  # gloo has no reduce-scatter: sum everything, keep our row
                dist.all_reduce(scratch, op=dist.ReduceOp.SUM)
                mine.copy_(scratch[self.rank])

    def _all_gather(self, buf: _FlatBuffer) -> None:
        world, seg = self.world_size, buf.segment
        for start, length in self._chunks(seg):
            mine = buf.params[self.rank * seg + start : self.rank * seg + start + length]
            rows = buf.params.view(world, seg)[:, start : start + length]
            if _uses_nccl():
                scratch = torch.empty((world, length), dtype=buf.params.dtype,
                                      device=buf.params.device)
                dist.all_gather_into_tensor(scratch, mine.contiguous())
                rows.copy_(scratch)
            else:
                parts = [torch.empty_like(mine) for _ in range(world)]
                dist.all_gather(parts, mine.contiguous())
                rows.copy_(torch.stack(parts))

    # ----------------------------------------------------------------------------------------
    # The Optimizers-like interface

    def reduce_gradients(self) -> None:
        """Sum the replicated gradients over ranks into each owner's shard."""
        self._reduce_scatter(self.buffer_a)
        self._reduce_scatter(self.buffer_b)

    def grad_norm_sq_local(self) -> torch.Tensor:
        """Squared L2 norm (0-dim float64, on the device) of the gradients this rank is
        responsible for: its shards of both flat buffers and its local tensors."""
        grads = [buf.shard(buf.grads, self.rank) for buf in (self.buffer_a, self.buffer_b)]
        for _, group in self.local.groups if self.local else []:
            grads += [p.grad for p in group["params"] if p.grad is not None]
        return grad_norm_sq(grads)

    def scale_gradients(self, factor: float | torch.Tensor) -> None:
        """Multiply the gradients this rank steps by ``factor`` (a float, or a 0-dim tensor on
        the device) in one ``torch._foreach_mul_``; `step`'s ``grad_coef`` needs no own pass."""
        grads = [buf.shard(buf.grads, self.rank) for buf in (self.buffer_a, self.buffer_b)]
        for _, group in self.local.groups if self.local else []:
            grads += [p.grad for p in group["params"] if p.grad is not None]
        _foreach_scale(grads, factor)

    def step(self, grad_coef: torch.Tensor | None = None,
             param_copies: Mapping[torch.Tensor, torch.Tensor] | None = None) -> set[int]:
        """Step the owned shards and local tensors, then all-gather the updated values.

        Args:
            grad_coef: optional 0-dim floating tensor on the device multiplying every gradient
                inside the optimizers' updates (the clipping coefficient; `Optimizers.step`).
            param_copies: optional ``{param: bfloat16 tensor}`` for the local (not sharded)
                tensors' updates to write (`Optimizers.step`); a sharded tensor's update covers
                only this rank's shard, so its copy is left to the caller.

        Returns:
            The ``id`` of every parameter whose copy was written.
        """
        self.sharded.step(grad_coef)
        refreshed = self.local.step(grad_coef, param_copies) if self.local else set()
        self._all_gather(self.buffer_a)
        self._all_gather(self.buffer_b)
        return refreshed

    def zero_grad(self) -> None:
        self.buffer_a.grads.zero_()
        self.buffer_b.grads.zero_()
        if self.local:
            self.local.zero_grad(set_to_none=True)

    def set_lr(self, step: int, tokens_seen: float) -> dict[str, float]:
        lrs = self.sharded.set_lr(step, tokens_seen)
        if self.local:
            lrs.update(self.local.set_lr(step, tokens_seen))
        return lrs

    def state_dict(self) -> dict[str, Any]:
        return {
            "sharded": self.sharded.state_dict(),
            "local": self.local.state_dict() if self.local else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sharded.load_state_dict(state["sharded"])
        if self.local:
            self.local.load_state_dict(state["local"])

    def state_bytes(self) -> dict[str, int]:
        """This rank's optimizer state in bytes per optimizer (`Optimizers.state_bytes`): its
        shard of the replicated parameters' state plus its local (expert-parallel) tensors'."""
        out = dict(self.sharded.state_bytes())
        for key, value in (self.local.state_bytes() if self.local else {}).items():
            out[key] = out.get(key, 0) + value
        return out

    def grad_bytes(self) -> int:
        """Bytes of this rank's gradients: both flat buffers (every rank holds the replicated
        gradients whole until they are reduce-scattered) and the local tensors'."""
        flat = sum(b.grads.numel() * b.grads.element_size() for b in (self.buffer_a, self.buffer_b))
        local = self.local.groups if self.local else []
        return flat + sum(p.numel() * p.element_size() for _, g in local for p in g["params"])

    def param_groups_summary(self) -> list[str]:
        lines = [f"zero2 {line}" for line in self.sharded.param_groups_summary()]
        if self.local:
            lines += [f"local {line}" for line in self.local.param_groups_summary()]
        return lines


def _foreach_scale(grads: list[torch.Tensor], factor: float | torch.Tensor) -> None:
    """``g *= factor`` for every tensor, one foreach kernel per dtype (a tensor factor is cast to
    each dtype, the form torch's fast foreach kernel takes)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for dtype, same in by_dtype.items():
        torch._foreach_mul_(same, factor.to(dtype) if isinstance(factor, torch.Tensor) else factor)


def _optimizers_over(muon_groups, adamw_groups, cfg: OptimizerConfig,
                     keep_empty: bool = False) -> Optimizers | None:
    """Build an `Optimizers` from ``(hyperparams, [(name, param)])`` group lists."""

    def groups(pairs):
        out = []
        for hyper, members in pairs:
            if not members and not keep_empty:
                continue
            out.append(dict(hyper, params=[p for _, p in members],
                            param_names=[n for n, _ in members]))
        return out

    muon_list, adamw_list = groups(muon_groups), groups(adamw_groups)
    if not any(g["params"] for g in muon_list + adamw_list):
        if not keep_empty:
            return None
    muon = Muon(muon_list, lr=cfg.lr_muon) if muon_list else None
    adamw = None
    if adamw_list:
        adamw = make_adamw(adamw_list, cfg)
    return Optimizers(muon, adamw, cfg)


class SingleProcessOptimizer:
    """The one-process counterpart of `Zero2Optimizer`: same interface, no communication."""

    def __init__(self, model: nn.Module, cfg: OptimizerConfig):
        self.inner = build_optimizer(model.param_kinds(), cfg)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def reduce_gradients(self) -> None:
        pass

    def grad_norm_sq_local(self) -> torch.Tensor:
        """Squared L2 norm of all gradients (0-dim float64, on the device; `grad_norm_sq`)."""
        return grad_norm_sq([p.grad for p in self.params if p.grad is not None])

    def scale_gradients(self, factor: float | torch.Tensor) -> None:
        """Multiply every gradient by ``factor`` (a float, or a 0-dim tensor on the device) in
        one ``torch._foreach_mul_``; `step`'s ``grad_coef`` needs no own pass."""
        _foreach_scale([p.grad for p in self.params if p.grad is not None], factor)

    def step(self, grad_coef: torch.Tensor | None = None,
             param_copies: Mapping[torch.Tensor, torch.Tensor] | None = None) -> set[int]:
        """Step every parameter; ``grad_coef`` and ``param_copies`` as in `Optimizers.step`
        (the clipping factor; bf16 copies the update writes). Returns the ``id`` of every
        parameter whose copy was written."""
        return self.inner.step(grad_coef, param_copies)

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)

    def set_lr(self, step: int, tokens_seen: float) -> dict[str, float]:
        return self.inner.set_lr(step, tokens_seen)

    def state_dict(self) -> dict[str, Any]:
        return {"single": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "single" not in state:
            raise ValueError("checkpoint optimizer state was written by a multi-rank run")
        self.inner.load_state_dict(state["single"])

    def state_bytes(self) -> dict[str, int]:
        """Optimizer state in bytes per optimizer (`Optimizers.state_bytes`)."""
        return self.inner.state_bytes()

    def grad_bytes(self) -> int:
        """Bytes of the gradients (one per trainable parameter, in its dtype)."""
        return sum(p.numel() * p.element_size() for p in self.params)

    def param_groups_summary(self) -> list[str]:
        return self.inner.param_groups_summary()
