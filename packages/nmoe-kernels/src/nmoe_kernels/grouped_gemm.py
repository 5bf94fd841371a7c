"""BF16 grouped GEMMs for MoE expert MLPs on Hopper (CuTeDSL kernels, sm_90a).

Shape letters: M rows (tokens routed to this device, sorted by expert), K input dim, N output dim,
E experts, F expert intermediate dim (the fused up-projection W13 has N = 2F).

Layout contract (the same as `nmoe_kernels.reference.grouped_gemm`): ``offsets_E1`` is an int32
CUDA tensor [E + 1] with offsets[0] == 0, non-decreasing, offsets[E] <= M; rows
offsets[e]:offsets[e+1] belong to expert e (a segment may be empty, any length). Rows
offsets[E]:M are padding: the forward ops and dgrad write ZERO rows there, and wgrad ignores them.
The offsets stay on the device (no host synchronisation); they are not validated on the host.
Values outside [0, M] are clamped in the kernel, so malformed offsets cannot make it touch memory
outside the tensors, but their results are unspecified.

Weights: ``w_EKN`` may be contiguous [E, K, N] or the ``.transpose(1, 2)`` view of a contiguous
[E, N, K] tensor (the nn.Linear [out, in] layout); both give identical results. The kernels read
whichever layout they get: the forward ops are fastest with [E, N, K] storage (K-major operand),
dgrad with [E, K, N] storage.

All products accumulate in float32 and are rounded once to bf16. Every op runs on the current
CUDA stream of its inputs' device and compiles its kernel at first use for each (op, K, N); the
number of rows M and experts E are runtime values, so one compile serves every batch (see
`nmoe_kernels.cute.grouped_gemm_bf16.compile_kernel`). Constraints checked here: bf16, CUDA,
contiguous, 16-byte aligned data, K and N multiples of 8 (TMA rows of 16 bytes), E <= 1024, every
tensor below 2^31 elements, and a compute capability 9.0 GPU (H100/H200).
"""

from __future__ import annotations

import threading

import torch

from nmoe_kernels._launch import capability, cu_stream, device_index, ffi_function

__all__ = [
    "grouped_gemm_bf16",
    "grouped_gemm_bf16_dgrad",
    "grouped_gemm_bf16_swiglu",
    "grouped_gemm_bf16_wgrad",
]

_MAX_ELEMENTS = 2**31 - 1
_compile_lock = threading.Lock()
_compiled: dict[tuple, object] = {}
# Tile order inside an expert (see nmoe_kernels.cute.scheduler and `wgrad_raster`). For the
# grouped-M kernels "n" (weights' column blocks reused across an expert's row tiles) measured
# faster or equal on H200 for every benchmark shape (bench/results). "auto" picks per call.
RASTER = {"fwd": "n", "swiglu": "n", "dgrad": "n", "wgrad": "auto"}
# wgrad takes the "n" order when one expert's dy rows are at least this many bytes wide x tall:
# the "m" order then streams all of an expert's dy column blocks for every block of dw rows, more
# than L2 keeps (bench/results/sweep_wgrad_H100.txt).
WGRAD_RASTER_N_BYTES = 16 << 20
# Thread-block cluster per op: "auto" (`choose_cluster`) or (CTAs along M, CTAs along N).
CLUSTER = {"fwd": "auto", "swiglu": "auto", "dgrad": "auto", "wgrad": "auto"}
# wgrad pairs dw row blocks (2 x 1) only where an expert's K loop (its rows) is at least this long.
CLUSTER_MIN_ROWS_PER_EXPERT = 1024
# wgrad takes BN 192 where it divides dw's N and the experts average fewer rows than this (short
# K loops): more, smaller dw tiles (`wgrad_tile_n`).
WGRAD_SHORT_TILE_N = 192
WGRAD_SHORT_MAX_ROWS_PER_EXPERT = 1024
_persistent_ctas: dict[tuple[int, int], int] = {}  # (device, cluster size) -> persistent CTAs


def _check_tensor(op: str, name: str, t, ndim: int, dims: str,
                  dtype: torch.dtype = torch.bfloat16) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor {dims}, got {type(t).__name__}")
    if t.dtype != dtype:
        kind, cast = (("bfloat16", ".bfloat16()") if dtype == torch.bfloat16
                      else ("float32", ".float()"))
        raise ValueError(f"{op}: {name} must be {kind}, got {t.dtype}; cast with {cast}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {dims}, got shape {tuple(t.shape)}")
    if not t.is_cuda:
        raise ValueError(f"{op}: {name} must be a CUDA tensor, got device {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous; call .contiguous() first")
    if t.data_ptr() % 16:
        raise ValueError(f"{op}: {name} must start at a 16-byte aligned address; .clone() it")
    if t.numel() > _MAX_ELEMENTS:
        raise ValueError(f"{op}: {name} has {t.numel()} elements; at most 2^31 - 1 are supported")


def _check_weight(op: str, name: str, w) -> bool:
    """Check an [E, K, N] weight; True when it is stored [E, N, K] (a transposed view)."""
    if isinstance(w, torch.Tensor) and w.dim() == 3 and not w.is_contiguous():
        if w.transpose(1, 2).is_contiguous():
            _check_tensor(op, name, w.transpose(1, 2), 3, "[E, N, K] storage")
            return True
        raise ValueError(
            f"{op}: {name} must be contiguous [E, K, N], or the .transpose(1, 2) view of a "
            f"contiguous [E, N, K] tensor; got strides {w.stride()}"
        )
    _check_tensor(op, name, w, 3, "[E, K, N]")
    return False


def _check_dim8(op: str, what: str, value: int) -> None:
    if value % 8:
        raise ValueError(
            f"{op}: {what} = {value} must be a multiple of 8 (16-byte TMA rows); pad it"
        )


def _check_offsets(op: str, offsets_E1, num_experts: int | None, device) -> int:
    if not isinstance(offsets_E1, torch.Tensor):
        raise TypeError(f"{op}: offsets_E1 must be an int32 torch.Tensor [E + 1]")
    if offsets_E1.dtype != torch.int32:
        raise ValueError(
            f"{op}: offsets_E1 must be int32, got {offsets_E1.dtype}; use .to(torch.int32)"
        )
    if offsets_E1.dim() != 1 or offsets_E1.shape[0] < 2:
        raise ValueError(
            f"{op}: offsets_E1 must be 1-D [E + 1] with E >= 1, got shape {tuple(offsets_E1.shape)}"
        )
    if num_experts is not None and offsets_E1.shape[0] != num_experts + 1:
        raise ValueError(
            f"{op}: offsets_E1 must have E + 1 = {num_experts + 1} entries for {num_experts} "
            f"experts, got {offsets_E1.shape[0]}"
        )
    if offsets_E1.device != device:
        raise ValueError(f"{op}: offsets_E1 is on {offsets_E1.device}, expected {device}")
    if not offsets_E1.is_contiguous():
        raise ValueError(f"{op}: offsets_E1 must be contiguous; call .contiguous() first")
    from nmoe_kernels.cute.scheduler import MAX_EXPERTS

    experts = offsets_E1.shape[0] - 1
    if experts > MAX_EXPERTS:
        raise ValueError(f"{op}: E = {experts} experts; at most {MAX_EXPERTS} are supported")
    return experts


def _same_device(op: str, device, **tensors) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {device} (x's device)")


def _output(op: str, out, shape, like: torch.Tensor,
            dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    if not isinstance(out, torch.Tensor) or out.dtype != dtype:
        got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
        name = str(dtype).removeprefix("torch.")
        raise ValueError(f"{op}: out must be a {name} tensor {list(shape)}, got {got}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{op}: out must have shape {list(shape)}, got {tuple(out.shape)}")
    _same_device(op, like.device, out=out)
    _check_tensor(op, "out", out, len(shape), str(list(shape)), dtype)
    return out


def wgrad_raster(dim_k: int, dim_n: int, num_rows: int, num_experts: int) -> str:
    """The wgrad tile order: "n" (an expert's dw row blocks swept per dy column block, so each
    dy column block is read once and x's expert slice stays in L2) where dw has fewer rows than
    columns and an expert's dy slice (rows per expert x N, bf16) is at least
    `WGRAD_RASTER_N_BYTES`; else "m". Both orders give the same bits.

    On one H100 (float32 dw): dsv3-local's dW2 (K 2048, N 7168, 2048 rows per expert) 2.94 ms
    in "n" against 3.35 in "m"; its dW13 (K 7168 > N 4096) is faster in "m" (6.44 vs 6.84 ms);
    at super (N 768) "m" was faster for both."""
    rows_per_expert = num_rows / max(num_experts, 1)
    if dim_k < dim_n and rows_per_expert * dim_n * 2 >= WGRAD_RASTER_N_BYTES:
        return "n"
    return "m"


def choose_cluster(op: str, dim_k: int, dim_n: int, num_rows: int,
                   num_experts: int) -> tuple[int, int]:
    """The thread-block cluster of an op's kernel, (CTAs along M, CTAs along N).

    (2, 1) for wgrad when the experts average >= `CLUSTER_MIN_ROWS_PER_EXPERT` rows and dw's
    row-block count (K / 128) is even: two CTAs computing adjacent dw row blocks of one expert
    TMA-multicast the dy column block they share. Every other call runs one CTA per tile.

    Every cluster gives the same bits. Measured on one H100 against one CTA in the same
    round-robin passes (`bench/results/sweep_bf16_launch_H100.txt`,
    `sweep_bf16_clusters_confirm_H100.txt`): dsv3-local's wgrad W13 6.54-6.61 -> 6.20-6.33 ms
    (4-5% faster in both runs), its wgrad W2 and moonlight's wgrad W13 within 1%; the grouped-M
    ops gained nothing reliable from either pairing (dsv3-local fwd W2 and W13+SwiGLU 3-6%
    slower in (2, 1), moonlight dgrad W2 3-4% faster, super slower in every cluster), so they
    keep one CTA. `CLUSTER` overrides the choice per op."""
    from nmoe_kernels.cute.grouped_gemm_bf16 import TILE_M

    if (op == "wgrad" and -(-dim_k // TILE_M) % 2 == 0
            and num_rows >= CLUSTER_MIN_ROWS_PER_EXPERT * max(num_experts, 1)):
        return (2, 1)
    return (1, 1)


def wgrad_tile_n(dim_n: int, num_rows: int, num_experts: int) -> int | None:
    """BN of the wgrad kernel: `WGRAD_SHORT_TILE_N` (192) where it divides dw's N and the
    experts average fewer than `WGRAD_SHORT_MAX_ROWS_PER_EXPERT` rows, else None (the kernel's
    own `choose_tile_n`: 256 wherever it pads N by <= 10%).

    Same bits at any BN. Measured on H100s at super's wgrads (896 rows per expert, dw blocks
    384 x 768 and 768 x 768) in three sweeps of 15-21 round-robin passes on two machines
    (`bench/results/bf16_H100_paired.txt`): BN 192 ran 2-5% faster than 256 in every pairing,
    with a bf16 and with a float32 dw -- 4 column tiles per dw block instead of 3, so 33% more
    and shorter tiles share the SMs and their non-overlapped epilogues."""
    if (dim_n % WGRAD_SHORT_TILE_N == 0
            and num_rows < WGRAD_SHORT_MAX_ROWS_PER_EXPERT * max(num_experts, 1)):
        return WGRAD_SHORT_TILE_N
    return None


def _kernel(op: str, dim_k: int, dim_n: int, weight_nk: bool, device: torch.device,
            out_dtype: str, raster: str, cluster: tuple[int, int], tile_n: int | None = None):
    index = device_index(device)
    major, minor = capability(index)
    if (major, minor) != (9, 0):
        raise RuntimeError(
            f"{op}: the BF16 grouped GEMM kernels are written for sm_90a (H100/H200); this GPU "
            f"is sm_{major}{minor}. Use nmoe_kernels.reference.grouped_gemm or torch._grouped_mm."
        )
    # one compiled function per device: CuTeDSL loads its module into the context of the
    # device it first runs on, and a function must not be called on several devices
    key = (op, dim_k, dim_n, raster, weight_nk, out_dtype, cluster, tile_n, index)
    kernel = _compiled.get(key)
    if kernel is None:
        with _compile_lock:
            kernel = _compiled.get(key)
            if kernel is None:
                from nmoe_kernels.cute.grouped_gemm_bf16 import compile_kernel

                kernel = compile_kernel(
                    op, dim_k, dim_n, "sm_90a", raster=raster, weight_nk=weight_nk,
                    out_dtype=out_dtype, cluster=cluster, tile_n=tile_n,
                )
                _compiled[key] = kernel
    return kernel


def _grid(index: int, cluster_size: int) -> int:
    """Persistent CTAs for device ``index``: one per SM, in whole clusters, no more clusters
    than the device runs at once (`nmoe_kernels.cute.occupancy.max_active_clusters`)."""
    key = (index, cluster_size)
    if key not in _persistent_ctas:
        sms = torch.cuda.get_device_properties(index).multi_processor_count
        clusters = sms // cluster_size
        if cluster_size > 1:
            from nmoe_kernels.cute.occupancy import max_active_clusters

            with torch.cuda.device(index):
                resident = max_active_clusters(cluster_size, index)
            if resident:
                clusters = min(clusters, resident)
        _persistent_ctas[key] = max(clusters, 1) * cluster_size
    return _persistent_ctas[key]


def _launch(
    op, dim_k, dim_n, a, b, c, offsets_E1, num_rows: int, num_experts: int, weight_nk=False
) -> None:
    """Run the (compiled on first use) kernel; C's dtype (bfloat16, or float32 for wgrad)
    selects the epilogue."""
    device = a.device
    c_f32 = c.dtype == torch.float32
    raster = RASTER[op]
    if raster == "auto":
        raster = wgrad_raster(dim_k, dim_n, num_rows, num_experts)
    cluster = CLUSTER[op]
    cluster = (choose_cluster(op, dim_k, dim_n, num_rows, num_experts) if cluster == "auto"
               else tuple(cluster))
    tile_n = wgrad_tile_n(dim_n, num_rows, num_experts) if op == "wgrad" else None
    kernel = _kernel(op, dim_k, dim_n, weight_nk, device, "f32" if c_f32 else "bf16", raster,
                     cluster, tile_n)
    index = device_index(device)
    num_ctas = _grid(index, cluster[0] * cluster[1])
    function = ffi_function(kernel)
    if function is not None:  # TVM FFI: addresses, sizes and the stream as plain integers
        kernel = function
        args = (a.data_ptr(), b.data_ptr(), c.data_ptr(), offsets_E1.data_ptr(), num_rows,
                num_experts, num_ctas, torch.cuda.current_stream(device).cuda_stream)
    else:
        args = _cute_args(a, b, c, offsets_E1, num_rows, num_experts, num_ctas, device)
    if index == torch.cuda.current_device():
        kernel(*args)
    else:  # the kernel launches into the current device's context
        with torch.cuda.device(index):
            kernel(*args)


def _cute_args(a, b, c, offsets_E1, num_rows, num_experts, num_ctas, device) -> tuple:
    """The compiled kernel's arguments as CuTeDSL objects (the default call path)."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    c_f32 = c.dtype == torch.float32
    gmem = cute.AddressSpace.gmem
    return (
        make_ptr(cutlass.BFloat16, a.data_ptr(), gmem, assumed_align=16),
        make_ptr(cutlass.BFloat16, b.data_ptr(), gmem, assumed_align=16),
        make_ptr(cutlass.Float32 if c_f32 else cutlass.BFloat16, c.data_ptr(), gmem,
                 assumed_align=16),
        make_ptr(cutlass.Int32, offsets_E1.data_ptr(), gmem, assumed_align=4),
        cutlass.Int32(num_rows),
        cutlass.Int32(num_experts),
        cutlass.Int32(num_ctas),
        cu_stream(torch.cuda.current_stream(device).cuda_stream),
    )


def _forward(op: str, x_MK, w_EKN, offsets_E1, out, out_cols_divisor: int):
    w_name = "w13_EK2F" if op == "grouped_gemm_bf16_swiglu" else "w_EKN"
    _check_tensor(op, "x_MK", x_MK, 2, "[M, K]")
    weight_nk = _check_weight(op, w_name, w_EKN)
    _same_device(op, x_MK.device, **{w_name: w_EKN})
    num_rows, dim_k = x_MK.shape
    num_experts, w_k, dim_n = w_EKN.shape
    if w_k != dim_k:
        raise ValueError(
            f"{op}: {w_name} {tuple(w_EKN.shape)} must have K = x_MK.shape[1] = {dim_k} in dim 1"
        )
    _check_dim8(op, "K", dim_k)
    _check_dim8(op, "N", dim_n)
    if out_cols_divisor == 2 and dim_n % 16:
        raise ValueError(f"{op}: 2F = {dim_n} must be a multiple of 16 (F a multiple of 8)")
    _check_offsets(op, offsets_E1, num_experts, x_MK.device)
    y = _output(op, out, (num_rows, dim_n // out_cols_divisor), x_MK)
    if num_rows:
        kernel_op = "swiglu" if out_cols_divisor == 2 else "fwd"
        _launch(
            kernel_op, dim_k, dim_n, x_MK, w_EKN, y, offsets_E1, num_rows, num_experts, weight_nk
        )
    return y


def grouped_gemm_bf16(
    x_MK: torch.Tensor,
    w_EKN: torch.Tensor,
    offsets_E1: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e] for each expert e (BF16 in/out, float32 accumulate).

    Args:
        x_MK: [M, K] bfloat16 CUDA tensor, rows sorted by expert, contiguous, K % 8 == 0.
        w_EKN: [E, K, N] bfloat16 expert weights on x's device, N % 8 == 0: contiguous, or the
            ``.transpose(1, 2)`` view of a contiguous [E, N, K] tensor (module docstring).
        offsets_E1: [E + 1] int32 segment offsets on x's device (module docstring).
        out: optional [M, N] bfloat16 contiguous tensor to write into.

    Returns:
        y_MN [M, N] bfloat16; padding rows (>= offsets[E]) are zero.
    """
    return _forward("grouped_gemm_bf16", x_MK, w_EKN, offsets_E1, out, 1)


def grouped_gemm_bf16_swiglu(
    x_MK: torch.Tensor,
    w13_EK2F: torch.Tensor,
    offsets_E1: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused up-projection + SwiGLU: a = silu(x @ w1[e]) * (x @ w3[e]), never storing x @ w13.

    ``w13_EK2F`` holds W1 and W3 interleaved by column (`nmoe_kernels.reference.interleave_w13`):
    column 2j is gate j, column 2j+1 is up j. The epilogue computes silu(gate) * up in float32
    from the float32 accumulators and rounds once to bf16 (the reference rounds the GEMM output to
    bf16 first, so the two differ by up to ~1 bf16 ulp of the gate/up values).

    Args:
        x_MK: [M, K] bfloat16 CUDA tensor, rows sorted by expert, contiguous, K % 8 == 0.
        w13_EK2F: [E, K, 2F] bfloat16 interleaved W13 on x's device, F % 8 == 0: contiguous, or
            the ``.transpose(1, 2)`` view of a contiguous [E, 2F, K] tensor.
        offsets_E1: [E + 1] int32 segment offsets on x's device (module docstring).
        out: optional [M, F] bfloat16 contiguous tensor to write into.

    Returns:
        a_MF [M, F] bfloat16; padding rows (>= offsets[E]) are zero.
    """
    return _forward("grouped_gemm_bf16_swiglu", x_MK, w13_EK2F, offsets_E1, out, 2)


def grouped_gemm_bf16_dgrad(
    dy_MN: torch.Tensor,
    w_EKN: torch.Tensor,
    offsets_E1: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Input gradient of `grouped_gemm_bf16`: dx[rows of e] = dy[rows of e] @ w[e]^T.

    Args:
        dy_MN: [M, N] bfloat16 CUDA tensor, rows sorted by expert, contiguous, N % 8 == 0.
        w_EKN: [E, K, N] bfloat16 expert weights on dy's device, K % 8 == 0: contiguous, or the
            ``.transpose(1, 2)`` view of a contiguous [E, N, K] tensor.
        offsets_E1: [E + 1] int32 segment offsets on dy's device (module docstring).
        out: optional [M, K] bfloat16 contiguous tensor to write into.

    Returns:
        dx_MK [M, K] bfloat16; padding rows (>= offsets[E]) are zero.
    """
    op = "grouped_gemm_bf16_dgrad"
    _check_tensor(op, "dy_MN", dy_MN, 2, "[M, N]")
    weight_nk = _check_weight(op, "w_EKN", w_EKN)
    _same_device(op, dy_MN.device, w_EKN=w_EKN)
    num_rows, dim_n = dy_MN.shape
    num_experts, dim_k, w_n = w_EKN.shape
    if w_n != dim_n:
        raise ValueError(
            f"{op}: w_EKN {tuple(w_EKN.shape)} must have N = dy_MN.shape[1] = {dim_n} in dim 2"
        )
    _check_dim8(op, "K", dim_k)
    _check_dim8(op, "N", dim_n)
    _check_offsets(op, offsets_E1, num_experts, dy_MN.device)
    dx = _output(op, out, (num_rows, dim_k), dy_MN)
    if num_rows:
        _launch(
            "dgrad", dim_k, dim_n, dy_MN, w_EKN, dx, offsets_E1, num_rows, num_experts, weight_nk
        )
    return dx


def grouped_gemm_bf16_wgrad(
    x_MK: torch.Tensor,
    dy_MN: torch.Tensor,
    offsets_E1: torch.Tensor,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Weight gradient of `grouped_gemm_bf16`: dw[e] = x[rows of e]^T @ dy[rows of e].

    Each expert reduces over its own rows in one float32 accumulator (no split-K); experts with
    no rows get zeros and padding rows (>= offsets[E]) contribute nothing. With
    ``out_dtype=torch.float32`` the accumulators are stored unrounded: the gradient of float32
    master weights in one pass, instead of a bf16 result and a cast (which reads 2 and writes 4
    more bytes per weight).

    Args:
        x_MK: [M, K] bfloat16 CUDA tensor, rows sorted by expert, contiguous, K % 8 == 0.
        dy_MN: [M, N] bfloat16 on x's device, same rows, contiguous, N % 8 == 0.
        offsets_E1: [E + 1] int32 segment offsets on x's device; E is its length - 1.
        out: optional [E, K, N] ``out_dtype`` contiguous tensor to write into.
        out_dtype: torch.bfloat16 or torch.float32.

    Returns:
        dw_EKN [E, K, N] ``out_dtype``.
    """
    op = "grouped_gemm_bf16_wgrad"
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"{op}: out_dtype must be torch.bfloat16 or torch.float32, got "
                         f"{out_dtype}")
    _check_tensor(op, "x_MK", x_MK, 2, "[M, K]")
    _check_tensor(op, "dy_MN", dy_MN, 2, "[M, N]")
    _same_device(op, x_MK.device, dy_MN=dy_MN)
    if dy_MN.shape[0] != x_MK.shape[0]:
        raise ValueError(
            f"{op}: dy_MN has {dy_MN.shape[0]} rows but x_MK has {x_MK.shape[0]}; both are [M, .]"
        )
    num_rows, dim_k = x_MK.shape
    dim_n = dy_MN.shape[1]
    _check_dim8(op, "K", dim_k)
    _check_dim8(op, "N", dim_n)
    num_experts = _check_offsets(op, offsets_E1, None, x_MK.device)
    if num_experts * dim_k * dim_n > _MAX_ELEMENTS:
        raise ValueError(f"{op}: dw [E, K, N] would have more than 2^31 - 1 elements")
    dw = _output(op, out, (num_experts, dim_k, dim_n), x_MK, out_dtype)
    if num_rows == 0:
        return dw.zero_()
    _launch("wgrad", dim_k, dim_n, x_MK, dy_MN, dw, offsets_E1, num_rows, num_experts)
    return dw
