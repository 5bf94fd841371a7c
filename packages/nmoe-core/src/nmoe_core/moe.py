"""The MoE layer: sigmoid router, dispatch through a `Dispatcher`, grouped expert MLPs, combine.

Letters: T tokens, K routed slots per token, D model width, E experts (global), E_local experts
held by this rank, R rows this rank received, F expert hidden size.

Data flow (inventory section 3): router -> ``(gates_TK, expert_ids_TK)`` -> dispatch ->
``x_RD`` (expert-contiguous, ``counts_E``) -> expert SwiGLU MLPs -> ``y_RD`` -> combine
(``sum_k gate * y`` in float32, fixed slot order) -> plus shared experts.

Expert weights are stored stacked: ``w13 [E_local, D, 2F]`` with the gate and up projections
interleaved (column ``2j`` is gate ``j``, ``2j+1`` is up ``j``; one GEMM makes both, and a fused
SwiGLU epilogue finds each pair in adjacent accumulator columns: the layout of
`nmoe_kernels.reference.interleave_w13`) and ``w2 [E_local, F, D]``.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from nmoe_comm import Dispatcher
from nmoe_comm import autograd as comm_autograd
from nmoe_core.config import ModelConfig
from nmoe_core.fused import ExpertWeightCache, check_fp8_shapes, fused_expert_forward
from nmoe_core.mlp import MLP

# The local dispatcher a layer uses until training attaches one sized from its capacity.
_UNBOUNDED_CAPACITY = 2**31 - 1


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def resolve_backend(name: str, device: torch.device, rows_dtype: torch.dtype, dim: int,
                    inter_dim: int) -> tuple[str, str]:
    """The expert backend ``moe.backend = name`` runs for rows of ``rows_dtype`` on ``device``
    with experts of width ``dim`` (D) and hidden size ``inter_dim`` (F), and why:
    ``("fused" | "torch", reason)``. ``auto`` picks the fused path for bfloat16 rows, D and F
    multiples of 8 (the grouped GEMMs' 16-byte rows), where `nmoe_core.fused.fused_unavailable`
    finds nothing missing, and the torch path elsewhere; ``torch`` and ``fused`` are taken as
    given."""
    if name != "auto":
        return name, "configured"
    if rows_dtype != torch.bfloat16:
        return "torch", f"auto: the rows are {rows_dtype}, the fused kernels take bfloat16"
    if dim % 8 or inter_dim % 8:
        return "torch", (f"auto: model.dim={dim} and moe_inter_dim={inter_dim} are not both "
                         f"multiples of 8")
    from nmoe_core.fused import fused_unavailable

    reason = fused_unavailable(device)
    if reason is not None:
        return "torch", f"auto: {reason}"
    return "fused", "auto"


@torch.no_grad()
def parallel_init(fn: Callable[[object], None], items: Iterable[object]) -> None:
    """Run ``fn(item)`` for every item, on ``torch.get_num_threads()`` threads, under no_grad.

    For the seeded initialisation: each item draws from its own generator and writes its own
    tensor, so the result is bitwise the result of a serial loop, while the draws (serial inside
    torch for a given generator) spread over the CPU's cores; torch releases the GIL in its ops.
    """
    items = list(items)

    def run(item: object) -> None:
        with torch.no_grad():  # grad mode is per thread
            fn(item)

    workers = min(len(items), torch.get_num_threads())
    if workers <= 1:
        for item in items:
            run(item)
        return
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(run, items):  # re-raises the first error
            pass


def trunc_normal_(tensor: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Fill ``tensor`` from N(0, std) truncated to ``[-2 std, 2 std]`` by redrawing the values that
    fall outside (exact rejection sampling; ~30x faster on CPU than ``nn.init.trunc_normal_``'s
    inverse-CDF method, which matters for billions of expert weights)."""
    tensor.normal_(0.0, std, generator=generator)
    flat = tensor.view(-1)
    outside = torch.nonzero(flat.abs() > 2 * std).squeeze(1)
    while outside.numel():
        redraw = torch.empty(outside.numel(), dtype=tensor.dtype, device=tensor.device)
        redraw.normal_(0.0, std, generator=generator)
        flat[outside] = redraw
        outside = outside[redraw.abs() > 2 * std]
    return tensor


def swiglu(h_R2F: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for interleaved ``h`` (gate in even columns, up in odd ones), computed
    in float32 (float64 for float64 input) and rounded once to the input dtype."""
    h = h_R2F.to(torch.promote_types(h_R2F.dtype, torch.float32))
    gate, up = h[..., 0::2], h[..., 1::2]
    return (F.silu(gate) * up).to(h_R2F.dtype)


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 ``[num_experts]``: how often each expert id occurs in ``expert_ids`` (any shape, ids
    in ``[0, num_experts)``). Equals ``torch.bincount(ids, minlength=num_experts)`` without its
    host synchronisation (CUDA bincount reads the largest id to size its output); integer
    scatter-adds, so deterministic."""
    ids = expert_ids.reshape(-1).to(torch.int64)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, ids, torch.ones_like(ids))


def _grouped_mm_usable(x_RD: torch.Tensor, w13: torch.Tensor) -> bool:
    return (
        x_RD.is_cuda
        and x_RD.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(x_RD.device)[0] >= 9
        and x_RD.shape[1] % 8 == 0
        and w13.shape[2] % 16 == 0
    )


def expert_mlp_torch(
    x_RD: torch.Tensor, counts_E: torch.Tensor, w13_ED2F: torch.Tensor, w2_EFD: torch.Tensor
) -> torch.Tensor:
    """Per-expert SwiGLU MLP over an expert-contiguous row layout, in plain PyTorch.

    Rows ``offsets[e] : offsets[e+1]`` (``offsets = cumsum(counts)``) go through expert ``e``:
    ``y = swiglu(x @ w13[e]) @ w2[e]``. On a Hopper-or-newer GPU in bf16 this uses
    ``torch._grouped_mm`` (no host synchronisation); elsewhere a loop over experts, which reads
    the counts on the host.

    Args:
        x_RD: ``[R, D]`` rows.
        counts_E: int ``[E_local]`` rows per expert, summing to ``R``.
        w13_ED2F: ``[E_local, D, 2F]`` gate/up weights, interleaved (module docstring).
        w2_EFD: ``[E_local, F, D]`` down weights.

    Returns:
        ``[R, D]`` in the compute dtype (the autocast dtype when autocast is on).
    """
    dtype = _autocast_dtype(x_RD.device) or x_RD.dtype
    x_RD, w13_ED2F, w2_EFD = x_RD.to(dtype), w13_ED2F.to(dtype), w2_EFD.to(dtype)
    if _grouped_mm_usable(x_RD, w13_ED2F):
        offsets = torch.cumsum(counts_E, 0, dtype=torch.int32)
        h = torch._grouped_mm(x_RD, w13_ED2F, offs=offsets)
        return torch._grouped_mm(swiglu(h), w2_EFD, offs=offsets)
    segments = torch.split(x_RD, counts_E.tolist())
    outputs = [
        swiglu(seg @ w13_ED2F[e]) @ w2_EFD[e] for e, seg in enumerate(segments) if seg.shape[0]
    ]
    if not outputs:
        # No rows for this rank's experts: an empty result that still hangs off x and the weights
        # (zero gradients), so that autograd runs the dispatch's backward -- a collective under
        # expert parallelism, which every rank must join -- here as on the ranks with rows.
        anchor = x_RD.sum() * 0 + w13_ED2F.sum() * 0 + w2_EFD.sum() * 0
        return x_RD.new_zeros(0, w2_EFD.shape[2]) + anchor
    return torch.cat(outputs)


@functools.cache
def _router_topk_kernel_limits() -> tuple[int, int] | None:
    """``(max experts, max k)`` of nmoe-kernels' CUDA ``router_topk`` kernel where this build
    has it (importing `nmoe_kernels.router` registers ``torch.ops.nmoe_kernels.router_topk``),
    else None."""
    try:
        import nmoe_kernels._C as compiled
        from nmoe_kernels import router
    except ImportError:
        return None
    if not compiled.WITH_CUDA or not hasattr(compiled, "router_topk"):
        return None
    return router.MAX_EXPERTS, router.MAX_TOP_K


def router_topk_kernel_available() -> bool:
    """Whether this nmoe-kernels build has the CUDA ``router_topk`` kernel."""
    return _router_topk_kernel_limits() is not None


class Router(nn.Module):
    """Sigmoid router with loss-free balancing bias (inventory 2.3).

    Scores ``s = sigmoid(x W^T)`` in float32; experts are chosen by ``topk(s + bias)``; gate
    weights are the chosen *unbiased* scores, normalised to sum 1 per token, times
    ``routed_scaling_factor``. ``bias`` is a float32 buffer moved by `update_bias`, not trained.

    The top-k runs as nmoe-kernels' ``router_topk`` CUDA kernel (a torch custom op, opaque to
    torch.compile) for float32 CUDA scores with E <= 1024 and K <= 32 where the build has it,
    else as ``torch.topk``. Both choose the same experts in the same order (the kernel breaks
    exact ties to the lower expert, where torch.topk leaves the order unspecified).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, routed_scaling_factor: float):
        super().__init__()
        self.top_k = top_k
        self.routed_scaling_factor = routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))
        # Fixed at construction: a plain bool that torch.compile treats as a constant.
        limits = _router_topk_kernel_limits()
        self.topk_kernel = limits is not None and num_experts <= limits[0] and top_k <= limits[1]

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(gates_TK, expert_ids_TK int64, normalised_TK)``; gates and normalised
        weights are float32 (float64 for float64 inputs)."""
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            scores_TE = torch.sigmoid(F.linear(x_TD.to(dtype), self.weight.to(dtype)))
        if (self.topk_kernel and scores_TE.is_cuda and scores_TE.dtype == torch.float32
                and self.bias.dtype == torch.float32):
            # Indices only: no gradient flows through the choice, as with torch.topk's indices.
            expert_ids_TK = torch.ops.nmoe_kernels.router_topk(scores_TE.detach(), self.bias,
                                                               self.top_k)
        else:
            expert_ids_TK = torch.topk(scores_TE + self.bias, self.top_k, dim=-1).indices
        chosen_TK = scores_TE.gather(1, expert_ids_TK)
        normalised_TK = chosen_TK / chosen_TK.sum(-1, keepdim=True).clamp_min(1e-12)
        return normalised_TK * self.routed_scaling_factor, expert_ids_TK, normalised_TK

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor, rate: float, clamp: float) -> None:
        """Loss-free balancing step: ``bias -= rate * (s - mean(s))``, ``s = sign(load - mean)``.

        ``load_E`` holds routed-row counts (or fractions) per expert, summed over every rank
        that shares this router.
        """
        fraction = load_E.float() / load_E.float().sum().clamp_min(1.0)
        sign = torch.sign(fraction - 1.0 / fraction.numel())
        self.bias.sub_(rate * (sign - sign.mean())).clamp_(-clamp, clamp)


class GroupedExperts(nn.Module):
    """``E_local`` SwiGLU experts stored stacked (see the module docstring for the layout).

    Args:
        num_local_experts: experts held here.
        expert_offset: global id of the first local expert (``ep_rank * E_local``).
        dim: ``D``. inter_dim: ``F``.
    """

    def __init__(self, num_local_experts: int, expert_offset: int, dim: int, inter_dim: int):
        super().__init__()
        self.num_local_experts = num_local_experts
        self.expert_offset = expert_offset
        self.dim = dim
        self.inter_dim = inter_dim
        self.w13 = nn.Parameter(torch.empty(num_local_experts, dim, 2 * inter_dim))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, inter_dim, dim))
        # Muon orthogonalises gate (even columns) and up (odd columns) separately.
        self.w13.muon_col_blocks = 2
        # Quantized copies for the fused FP8 recipe (not module state: never saved or loaded).
        self.weight_cache = ExpertWeightCache()

    @torch.no_grad()
    def reset_parameters(self, seed: int, layer_id: int, std_in: float, std_out: float) -> None:
        """Initialise each expert from a generator keyed by its *global* id, so a model split
        over expert-parallel ranks holds exactly the slices of the single-rank model."""
        def init_expert(local: int) -> None:
            key = f"{seed}/{layer_id}/expert/{self.expert_offset + local}".encode()
            gen = torch.Generator().manual_seed(zlib.crc32(key))
            self.w13[local].copy_(trunc_normal_(torch.empty(self.w13.shape[1:]), std_in, gen))
            self.w2[local].copy_(trunc_normal_(torch.empty(self.w2.shape[1:]), std_out, gen))

        parallel_init(init_expert, range(self.num_local_experts))

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return expert_mlp_torch(x_RD, counts_E, self.w13, self.w2)

    def fused_kernels(self, device: torch.device):
        """The `nmoe_core.fused` kernel provider (Hopper kernels unless one was assigned to
        ``self.kernels``, e.g. `ReferenceExpertKernels` in tests)."""
        kernels = getattr(self, "kernels", None)
        if kernels is None:
            from nmoe_core.fused import HopperExpertKernels

            kernels = self.kernels = HopperExpertKernels(device)
        return kernels

    def fp8_weights(self, kernels):
        """The FP8 copies of ``w13`` and ``w2`` for the fused FP8 recipe, quantized by ``kernels``
        on first use after `invalidate_weight_cache` (see `nmoe_core.fused.ExpertWeightCache`)."""
        return self.weight_cache.fp8(self.w13, self.w2, kernels)

    def invalidate_weight_cache(self) -> None:
        """Drop the quantized weight copies; call after every change of ``w13``/``w2`` (the
        trainer does, once per optimizer step)."""
        self.weight_cache.invalidate()

    def weight_copy_targets(self) -> dict[torch.Tensor, torch.Tensor]:
        """``{w13: bf16 copy, w2: bf16 copy}`` for an optimizer step to write into, when the
        cached bf16 copies are current (`nmoe_core.fused.ExpertWeightCache.copy_targets`)."""
        return self.weight_cache.copy_targets(self.w13, self.w2)

    def after_optimizer_step(self, refreshed: Collection[int] = ()) -> None:
        """Keep the bf16 copies the optimizer step wrote (``id`` of both weights in
        ``refreshed``), drop every other copy (`ExpertWeightCache.after_update`)."""
        self.weight_cache.after_update(self.w13, self.w2, refreshed)


class MoE(nn.Module):
    """Routed experts plus shared experts, through a `Dispatcher` (inventory 2.2-2.3, 3).

    Args:
        cfg: the model config (``cfg.moe`` sizes the layer).
        layer_id: index of the block (for initialisation).
        ep_rank, ep_world_size: this rank's place in the expert-parallel group; the layer holds
            experts ``[ep_rank * E_local, (ep_rank + 1) * E_local)``.

    A `LocalDispatcher` is used until `set_dispatcher` attaches another (training does, sized from
    its capacity). After each training forward, `load_counts` holds the routed rows per global
    expert since the last `update_router_bias`, and `aux_loss` the Switch-style balance loss.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int, ep_rank: int = 0, ep_world_size: int = 1):
        super().__init__()
        moe = cfg.moe
        if moe.n_routed_experts % ep_world_size:
            raise ValueError(
                f"moe.n_routed_experts={moe.n_routed_experts} is not divisible by the expert-"
                f"parallel world size {ep_world_size}"
            )
        self.layer_id = layer_id
        self.num_experts = moe.n_routed_experts
        self.top_k = moe.n_activated_experts
        self.aux_loss_alpha = moe.aux_loss_alpha
        self.backend = moe.backend
        self.recipe = moe.recipe
        self.bias_clamp = moe.router_bias_clamp
        # Fused BF16 recipe: keep the experts' bf16 weight copies from the first forward of an
        # optimizer step to its last backward (`ExpertWeightCache.cast`); the trainer sets it.
        self.cache_expert_weights = False
        local = moe.n_routed_experts // ep_world_size
        self.router = Router(cfg.dim, moe.n_routed_experts, self.top_k, moe.routed_scaling_factor)
        self.experts = GroupedExperts(local, ep_rank * local, cfg.dim, moe.moe_inter_dim)
        self.shared = (
            MLP(cfg.dim, moe.n_shared_experts * moe.moe_inter_dim)
            if moe.n_shared_experts
            else None
        )
        self.register_buffer(
            "load_counts", torch.zeros(moe.n_routed_experts, dtype=torch.int64), persistent=False
        )
        self.aux_loss: torch.Tensor | None = None
        self.dispatcher: Dispatcher | None = None
        self._ep = (ep_rank, ep_world_size)

    def set_dispatcher(self, dispatcher: Dispatcher) -> None:
        if dispatcher.num_experts != self.num_experts:
            raise ValueError(
                f"dispatcher serves {dispatcher.num_experts} experts, layer {self.layer_id} has "
                f"{self.num_experts}"
            )
        if (dispatcher.rank, dispatcher.world_size) != self._ep:
            raise ValueError(
                f"dispatcher is rank {dispatcher.rank}/{dispatcher.world_size} but layer "
                f"{self.layer_id} was built for expert-parallel rank {self._ep[0]}/{self._ep[1]}"
            )
        self.dispatcher = dispatcher

    def _dispatcher(self) -> Dispatcher:
        if self.dispatcher is None:
            if self._ep[1] != 1:
                raise RuntimeError(
                    f"layer {self.layer_id} is expert-parallel over {self._ep[1]} ranks; attach a "
                    f"multi-rank dispatcher with set_dispatcher before the forward"
                )
            from nmoe_comm import create_dispatcher

            self.dispatcher = create_dispatcher(
                "local", num_experts=self.num_experts, capacity=_UNBOUNDED_CAPACITY
            )
        return self.dispatcher

    def _balance_loss(self, normalised_TK: torch.Tensor, expert_ids_TK: torch.Tensor):
        """Switch-style ``E * sum_e importance_e * load_e`` (both as fractions; inventory 2.3)."""
        importance = torch.zeros(self.num_experts, device=normalised_TK.device)
        importance = importance.index_add(0, expert_ids_TK.flatten(), normalised_TK.flatten())
        load = expert_counts(expert_ids_TK, self.num_experts).float()
        importance = importance / importance.sum().clamp_min(1e-12)
        load = load / load.sum().clamp_min(1.0)
        return self.num_experts * (importance * load).sum()

    def _fused(self, dispatcher: Dispatcher, dispatched, gates_TK: torch.Tensor) -> torch.Tensor:
        """The fused backend (`nmoe_core.fused`): experts and the gated combine in one autograd
        function, in the recipe ``self.recipe``."""
        experts = self.experts
        kernels = experts.fused_kernels(dispatched.x_RD.device)
        fp8_weights = cast_weights = None
        if self.recipe == "fp8":
            check_fp8_shapes(experts.w13.shape[1], experts.inter_dim)
            kernels.require_recipe("fp8")
            fp8_weights = experts.fp8_weights(kernels)
        elif self.cache_expert_weights and dispatched.x_RD.dtype != experts.w13.dtype:
            cast_weights = experts.weight_cache.cast(experts.w13, experts.w2,
                                                     dispatched.x_RD.dtype)
        return fused_expert_forward(dispatcher, dispatched, gates_TK, experts.w13, experts.w2,
                                    kernels, fp8_weights, cast_weights)

    def invalidate_weight_cache(self) -> None:
        """Drop the experts' quantized (FP8 recipe) or cast (``cache_expert_weights``) weight
        copies, so each step quantizes or casts the weights once, not per micro-batch. The
        trainer calls `after_optimizer_step` instead, which also keeps copies the optimizer
        refreshed."""
        self.experts.invalidate_weight_cache()

    def weight_copy_targets(self) -> dict[torch.Tensor, torch.Tensor]:
        """The experts' current bf16 weight copies keyed by their master weights, for the
        optimizer step to refresh (``{}`` without ``cache_expert_weights`` or before the first
        forward; `GroupedExperts.weight_copy_targets`)."""
        if not self.cache_expert_weights:
            return {}
        return self.experts.weight_copy_targets()

    def after_optimizer_step(self, refreshed: Collection[int] = ()) -> None:
        """After each optimizer step: keep the bf16 copies it wrote (``refreshed`` holds the
        ``id`` of both expert weights), drop every other weight copy."""
        self.experts.after_optimizer_step(refreshed)

    @torch.no_grad()
    def update_router_bias(self, load_E: torch.Tensor, rate: float) -> None:
        """Apply one loss-free balancing step from ``load_E`` and reset `load_counts`."""
        self.router.update_bias(load_E.to(self.router.bias.device), rate, self.bias_clamp)
        self.load_counts.zero_()

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        shape = x_BSD.shape
        x_TD = x_BSD.reshape(-1, shape[-1])
        gates_TK, expert_ids_TK, normalised_TK = self.router(x_TD)
        if self.training:
            with torch.no_grad():
                self.load_counts += expert_counts(expert_ids_TK, self.num_experts)
            self.aux_loss = (
                self._balance_loss(normalised_TK, expert_ids_TK) if self.aux_loss_alpha else None
            )
        compute_dtype = _autocast_dtype(x_TD.device)
        rows_TD = x_TD.to(compute_dtype) if compute_dtype is not None else x_TD
        dispatcher = self._dispatcher()
        backend, why = resolve_backend(self.backend, x_TD.device, rows_TD.dtype,
                                       self.experts.dim, self.experts.inter_dim)
        if backend == "torch" and self.recipe == "fp8":
            raise RuntimeError(
                f"moe.recipe='fp8' needs the fused backend, but moe.backend={self.backend!r} "
                f"runs the torch path here ({why}); use moe.recipe='bf16' or run on a Hopper GPU "
                f"under bf16 autocast"
            )
        dispatched = comm_autograd.dispatch(dispatcher, rows_TD, expert_ids_TK, gates_TK.detach())
        if backend == "fused":
            out_TD = self._fused(dispatcher, dispatched, gates_TK)
        else:
            y_RD = self.experts(dispatched.x_RD, dispatched.counts_E)
            out_TD = comm_autograd.combine(dispatcher, y_RD, dispatched.handle, gates_TK)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        return out_TD.view(shape)
