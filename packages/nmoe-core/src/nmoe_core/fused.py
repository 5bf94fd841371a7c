"""The fused expert path of the MoE layer (``moe.backend = "fused"``) with its own autograd.

Letters: R rows received for this rank's experts, D model width, F expert hidden size, E local
experts, T tokens, K slots per token.

Forward, per MoE layer: dispatch -> ``a = swiglu(x @ W13)`` in ONE grouped GEMM whose epilogue
applies the SwiGLU (the ``[R, 2F]`` intermediate is never stored) -> ``y = a @ W2`` -> each row
scaled by its gate -> an unweighted combine (sum over the K slots in fixed order, float32).

Backward (`_ExpertMLP.backward`), recomputing instead of storing: only ``x_RD`` and the offsets are
saved. ``h = x @ W13`` is recomputed, ``a = swiglu(h)``; with ``g`` the row gates and ``dz`` the
rows of ``dOut`` routed back to this rank:

    dA_ungated = dz @ W2^T                    (dgrad)
    dGate      = <a, dA_ungated>              (the identity <A, dA>/gate, inventory 3.3: no
                                               recomputation or storage of the expert output y)
    dA = g * dA_ungated;  dW2 = a^T (g * dz)  (wgrad)
    dH = swiglu'(h) . dA;  dW13 = x^T dH;  dX = dH @ W13^T

The per-row gate gradients return to their (token, slot) through the dispatcher (`_RowGates`).

Precision recipes (``moe.recipe``):

- ``bf16``: every expert GEMM in BF16 with float32 accumulation.
- ``fp8``: the forward W13 and W2 GEMMs and the two dgrad GEMMs run in FP8 E4M3, blockscaled the
  DeepSeek way (activations one scale per 1x128 block along K, weights one per 128x128 block);
  weight gradients are BF16 GEMMs and the master weights stay in float32/BF16. The quantized weight
  copies are refreshed once per optimizer step (`FusedExperts.invalidate_weight_cache`, called
  by the trainer after each step), not per micro-batch.

Scratch is sized from the dispatcher's capacity, never from the routing of the moment: rows are
counted against ``capacity`` by the dispatcher (too small a capacity raises `CapacityError` giving
the rows needed).

The GEMMs come from an `ExpertKernels` provider: `HopperExpertKernels` (nmoe-kernels' CUDA and
CuTeDSL kernels, sm_90a) or `ReferenceExpertKernels` (nmoe_kernels.reference in plain torch), which
runs the same autograd anywhere and is what the CPU tests check the fused algebra with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nmoe_comm import Dispatcher, DispatchHandle

# --------------------------------------------------------------------------------------------
# Kernel providers


class ReferenceExpertKernels:
    """Grouped GEMMs from `nmoe_kernels.reference` (pure torch, any device; reads offsets on the
    host). Same interface as `HopperExpertKernels`."""

    name = "reference"

    def __init__(self) -> None:
        from nmoe_kernels import reference

        self.ref = reference

    def gemm_swiglu(self, x_RD, w13_ED2F, offsets_E1):
        h = self.ref.grouped_gemm(x_RD, w13_ED2F, offsets_E1, out_dtype=torch.float32)
        return self.ref.swiglu_interleaved(h).to(x_RD.dtype)

    def gemm(self, x_RK, w_EKN, offsets_E1):
        return self.ref.grouped_gemm(x_RK, w_EKN, offsets_E1)

    def gemm_fp32(self, x_RK, w_EKN, offsets_E1):
        return self.ref.grouped_gemm(x_RK, w_EKN, offsets_E1, out_dtype=torch.float32)

    def dgrad(self, dy_RN, w_EKN, offsets_E1):
        return self.ref.grouped_gemm_dgrad(dy_RN, w_EKN, offsets_E1)

    def wgrad(self, x_RK, dy_RN, offsets_E1):
        return self.ref.grouped_gemm_wgrad(x_RK, dy_RN, offsets_E1, out_dtype=torch.float32)


class HopperExpertKernels:
    """nmoe-kernels' BF16 grouped GEMMs (CuTeDSL, sm_90a). Raises a clear error naming what is
    missing when the kernels are not available."""

    name = "hopper"

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
            raise RuntimeError(
                f"moe.backend='fused' needs a Hopper-or-newer CUDA GPU (sm_90a); this run is on "
                f"{device}. Use moe.backend='torch' here."
            )
        import nmoe_kernels

        needed = ("grouped_gemm_bf16", "grouped_gemm_bf16_swiglu", "grouped_gemm_bf16_dgrad",
                  "grouped_gemm_bf16_wgrad")
        missing = [name for name in needed if not hasattr(nmoe_kernels, name)]
        if missing:
            raise RuntimeError(
                f"moe.backend='fused' needs nmoe_kernels.{', '.join(missing)}, which this "
                f"nmoe-kernels build does not provide; upgrade nmoe-kernels or use "
                f"moe.backend='torch'"
            )
        self.k = nmoe_kernels

    def gemm_swiglu(self, x_RD, w13_ED2F, offsets_E1):
        return self.k.grouped_gemm_bf16_swiglu(x_RD, w13_ED2F, offsets_E1)

    def gemm(self, x_RK, w_EKN, offsets_E1):
        return self.k.grouped_gemm_bf16(x_RK, w_EKN, offsets_E1)

    def gemm_fp32(self, x_RK, w_EKN, offsets_E1):
        return self.k.grouped_gemm_bf16(x_RK, w_EKN, offsets_E1).float()

    def dgrad(self, dy_RN, w_EKN, offsets_E1):
        return self.k.grouped_gemm_bf16_dgrad(dy_RN, w_EKN, offsets_E1)

    def wgrad(self, x_RK, dy_RN, offsets_E1):
        return self.k.grouped_gemm_bf16_wgrad(x_RK, dy_RN, offsets_E1).float()


def swiglu_backward(h_R2F: torch.Tensor, da_RF: torch.Tensor) -> torch.Tensor:
    """``dH`` of ``a = silu(gate) * up`` for interleaved ``h`` (float32 math, h's dtype out)."""
    compute = torch.promote_types(h_R2F.dtype, torch.float32)
    h = h_R2F.to(compute)
    gate, up = h[:, 0::2], h[:, 1::2]
    da = da_RF.to(compute)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    dh = torch.empty_like(h)
    dh[:, 0::2] = da * up * (sig * (1 + gate * (1 - sig)))
    dh[:, 1::2] = da * silu
    return dh.to(h_R2F.dtype)


# --------------------------------------------------------------------------------------------
# Autograd


def rows_to_sources(dispatcher: Dispatcher, values_R: torch.Tensor,
                    handle: DispatchHandle) -> torch.Tensor:
    """Return one float32 value per received row to its (token, slot) of origin: ``[T, K]``.

    Uses the dispatcher's ``rows_to_sources`` when it has one; otherwise K combines of the values
    with one-hot slot gates (exact: products with 0/1 and sums with zeros do not round).
    """
    native = getattr(dispatcher, "rows_to_sources", None)
    if native is not None:
        return native(values_R, handle)
    num_tokens, top_k = handle.num_tokens, handle.top_k
    column = values_R.float().reshape(-1, 1)
    out = torch.empty(num_tokens, top_k, dtype=torch.float32, device=values_R.device)
    for slot in range(top_k):
        onehot = torch.zeros(num_tokens, top_k, dtype=torch.float32, device=values_R.device)
        onehot[:, slot] = 1.0
        out[:, slot] = dispatcher.combine(column, handle, onehot).reshape(-1)
    return out


class _RowGates(torch.autograd.Function):
    """``gates_R`` (the gate of each received row) as a differentiable function of ``gates_TK``."""

    @staticmethod
    def forward(ctx, gates_TK, gates_R, dispatcher, handle):
        ctx.dispatcher, ctx.handle = dispatcher, handle
        return gates_R.detach().clone()

    @staticmethod
    def backward(ctx, grad_gates_R):
        grad = rows_to_sources(ctx.dispatcher, grad_gates_R, ctx.handle)
        return grad, None, None, None


class _UnweightedCombine(torch.autograd.Function):
    """``out[t] = sum_k z(t, k)`` (the rows are already gated). Its gradient is a dispatch of
    ``dOut``: each row receives its token's gradient. Nothing is saved for the backward."""

    @staticmethod
    def forward(ctx, z_RD, dispatcher, handle):
        ctx.dispatcher, ctx.handle = dispatcher, handle
        ones = torch.ones(handle.num_tokens, handle.top_k, dtype=torch.float32,
                          device=z_RD.device)
        return dispatcher.combine(z_RD, handle, ones)

    @staticmethod
    def backward(ctx, grad_out_TD):
        handle = ctx.handle
        routed = ctx.dispatcher.dispatch(grad_out_TD.contiguous(), handle.expert_ids_TK,
                                         handle.gates_TK)
        return routed.x_RD, None, None


class _ExpertMLP(torch.autograd.Function):
    """``z = gate * (swiglu(x @ W13) @ W2)`` per row; see the module docstring for the backward."""

    @staticmethod
    def forward(ctx, x_RD, gates_R, w13_ED2F, w2_EFD, offsets_E1, kernels):
        dtype = x_RD.dtype
        w13, w2 = w13_ED2F.to(dtype), w2_EFD.to(dtype)
        a_RF = kernels.gemm_swiglu(x_RD, w13, offsets_E1)
        y_RD = kernels.gemm(a_RF, w2, offsets_E1)
        ctx.save_for_backward(x_RD, gates_R, offsets_E1)
        ctx.kernels = kernels
        ctx.weights = (w13_ED2F, w2_EFD)
        return (y_RD.float() * gates_R.float()[:, None]).to(dtype)

    @staticmethod
    def backward(ctx, dz_RD):
        x_RD, gates_R, offsets_E1 = ctx.saved_tensors
        w13_param, w2_param = ctx.weights
        kernels = ctx.kernels
        dtype = x_RD.dtype
        w13, w2 = w13_param.to(dtype), w2_param.to(dtype)
        dz = dz_RD.to(dtype).contiguous()
        h_R2F = kernels.gemm_fp32(x_RD, w13, offsets_E1)  # recomputed, not stored
        compute = h_R2F.dtype
        a_RF = F.silu(h_R2F[:, 0::2]) * h_R2F[:, 1::2]
        da_ungated = kernels.dgrad(dz, w2, offsets_E1).to(compute)
        grad_gates = (a_RF * da_ungated).sum(dim=1)  # <A, dA>/gate
        g = gates_R.to(compute)[:, None]
        da = da_ungated * g
        dw2 = kernels.wgrad(a_RF.to(dtype), (dz.to(compute) * g).to(dtype), offsets_E1)
        dh = swiglu_backward(h_R2F, da).to(dtype)
        dw13 = kernels.wgrad(x_RD, dh, offsets_E1)
        dx = kernels.dgrad(dh, w13, offsets_E1)
        return (dx, grad_gates.to(gates_R.dtype), dw13.to(w13_param.dtype),
                dw2.to(w2_param.dtype), None, None)


def fused_expert_forward(
    dispatcher: Dispatcher,
    dispatched,
    gates_TK: torch.Tensor,
    w13_ED2F: torch.Tensor,
    w2_EFD: torch.Tensor,
    kernels,
) -> torch.Tensor:
    """Run the experts on ``dispatched`` rows and combine: returns ``out_TD`` (differentiable
    w.r.t. the rows, the gates and both weight stacks)."""
    counts = dispatched.counts_E
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    offsets[1:] = torch.cumsum(counts, 0)
    gates_R = _RowGates.apply(gates_TK, dispatched.gates_R, dispatcher, dispatched.handle)
    z_RD = _ExpertMLP.apply(dispatched.x_RD, gates_R, w13_ED2F, w2_EFD, offsets, kernels)
    return _UnweightedCombine.apply(z_RD, dispatcher, dispatched.handle)
