"""The fused expert path of the MoE layer (``moe.backend = "fused"``) with its own autograd.

Letters: R rows received for this rank's experts, D model width, F expert hidden size, E local
experts, T tokens, K slots per token.

One autograd function (`_FusedExperts`) covers the experts and the combine. Forward, per layer:

    a   = swiglu(x @ W13)                  ONE grouped GEMM whose epilogue applies the SwiGLU
                                           (the [R, 2F] intermediate is never stored)
    y   = a @ W2                           the expert rows, NOT gated
    out = combine(y, gates)                out[t] = sum_k g(t,k) * y(t,k): the dispatcher applies
                                           the gates inside its fixed-order float32 reduction

Backward, recomputing instead of storing (only ``x_RD``, the offsets and the per-row gates are
kept; for FP8 also the cached weight copies):

    dz         = dispatch(dOut)            each row gets its token's output gradient, ungated
    h          = x @ W13                   recomputed
    dA_ungated = dz @ W2^T                 (dgrad)
    dH, ag, dgate = swiglu_backward_gated(h, dA_ungated, g)      ONE elementwise pass:
                   a = swiglu(h); dA = g * dA_ungated; dH = swiglu'(h) . dA; ag = g * a;
                   dgate = <a, dA_ungated>  (the identity dGate = <A, dA>/gate, inventory 3.3:
                   the expert output y is neither stored nor recomputed)
    dW2  = ag^T dz;  dW13 = x^T dH         (wgrad)
    dX   = dH @ W13^T                      (dgrad)
    dGates[t, k] = dgate(row of (t, k))    through the dispatcher (`rows_to_sources`)

Precision recipes (``moe.recipe``; the config field's description says the same):

- ``bf16``: every expert GEMM in BF16 with float32 accumulation; the combine and the elementwise
  backward in float32.
- ``fp8``: the forward W13 and W2 GEMMs and the two dgrad GEMMs run in FP8 E4M3, blockscaled the
  DeepSeek way: activations (x, a, dz, dH) one float32 scale per 1x128 block along the GEMM's
  reduction dim, weights one per 128x128 block. The forward is x -> quantize -> W13 GEMM with a
  SwiGLU + quantize epilogue -> (a_fp8, scales) -> W2 GEMM -> y (BF16). The backward recomputes
  h with the FP8 W13 GEMM (BF16 out), quantizes dz along D for ``dz @ W2^T`` and dH along 2F for
  ``dH @ W13^T``. Weight gradients are BF16 GEMMs on the BF16 x, dz, ag and dH; master weights
  are untouched. Each layer keeps four FP8 weight copies (W13 and W2, each as the forward
  operand [E, N, K] and the dgrad operand [E, K, N]; the 128x128 blocks of W and W^T share their
  scales, so the second copy is a transpose of the first), built lazily on first use by
  `ExpertWeightCache` and kept until `ExpertWeightCache.invalidate` -- the trainer calls
  ``MoE.invalidate_weight_cache`` once after each optimizer step, so micro-batches of one step
  reuse them. Needs D and F multiples of 128.

Scratch is sized from the dispatcher's capacity, never from the routing of the moment: rows are
counted against ``capacity`` by the dispatcher (too small a capacity raises `CapacityError` giving
the rows needed).

The GEMMs and the elementwise pass come from an `ExpertKernels` provider: `HopperExpertKernels`
(nmoe-kernels' CUDA and CuTeDSL kernels, sm_90a) or `ReferenceExpertKernels`
(nmoe_kernels.reference in plain torch), which runs the same autograd anywhere and is what the CPU
tests check the fused algebra with.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Collection
from dataclasses import dataclass
from typing import NamedTuple

import torch

from nmoe_comm import Dispatcher, DispatchHandle

# --------------------------------------------------------------------------------------------
# The elementwise backward pass


class GatedSwigluGrad(NamedTuple):
    """Result of `ExpertKernels.swiglu_backward_gated`.

    Attributes:
        dh_R2F: ``[R, 2F]`` gradient of the interleaved W13 output, h's dtype.
        ag_RF: ``[R, F]`` ``gate * swiglu(h)``, h's dtype (the left operand of W2's wgrad).
        dgate_R: ``[R]`` float32 (float64 for float64 h) ``<swiglu(h), dA_ungated>`` per row.
        dh_fp8_R2F, dh_scales: dH quantized to FP8 1x128 blocks along 2F with scales in the
            provider's layout, when asked for (else None).
    """

    dh_R2F: torch.Tensor
    ag_RF: torch.Tensor
    dgate_R: torch.Tensor
    dh_fp8_R2F: torch.Tensor | None = None
    dh_scales: torch.Tensor | None = None


def swiglu_backward_gated_torch(
    h_R2F: torch.Tensor, da_RF: torch.Tensor, gates_R: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gated SwiGLU backward in plain torch: the math of ``nmoe_kernels.swiglu_backward_gated``
    (in the same operation order up to the sigmoid and the dgate summation order), used where
    that op does not apply (an nmoe-kernels without it, F % 128 != 0, non-bf16 rows).

    With ``g = h[:, 0::2]`` (gate), ``u = h[:, 1::2]`` (up), ``s = sigmoid(g)``, ``a = g s u``,
    ``dA = gates * da``, all in float32 (float64 for float64 input):
    ``dh[:, 0::2] = dA u s (1 + g (1 - s))``, ``dh[:, 1::2] = dA g s``, ``ag = gates * a``,
    ``dgate = sum_j a * da``.

    Args:
        h_R2F: ``[R, 2F]`` interleaved W13 output (bf16, float32 or float64).
        da_RF: ``[R, F]`` ungated gradient of the SwiGLU output.
        gates_R: ``[R]`` gate of each row.

    Returns:
        ``(dh_R2F, ag_RF)`` in h's dtype and ``dgate_R`` in the compute dtype.
    """
    compute = torch.promote_types(h_R2F.dtype, torch.float32)
    h = h_R2F.to(compute)
    gate, up = h[:, 0::2], h[:, 1::2]
    da = da_RF.to(compute)
    gates = gates_R.to(compute)[:, None]
    sig = torch.sigmoid(gate)
    silu = gate * sig
    a = silu * up
    dgate = (a * da).sum(dim=1)
    d_act = gates * da
    dh = torch.empty_like(h)
    dh[:, 0::2] = (d_act * up) * (sig * (1 + gate * (1 - sig)))
    dh[:, 1::2] = d_act * silu
    return dh.to(h_R2F.dtype), (gates * a).to(h_R2F.dtype), dgate


def _gated_backward_op(op, h_R2F, da_RF, gates_R, quantize_dh: bool) -> GatedSwigluGrad | None:
    """Run ``nmoe_kernels[.reference].swiglu_backward_gated`` where it applies (the op exists,
    bf16 operands, F % 128 == 0); None where the caller must use the torch fallback."""
    if op is None or h_R2F.dtype != torch.bfloat16 or da_RF.dtype != torch.bfloat16:
        return None
    if h_R2F.shape[1] % 256:
        return None
    gates = gates_R.to(torch.float32).contiguous()
    return GatedSwigluGrad(*op(h_R2F, da_RF, gates, quantize_dh=quantize_dh))


# --------------------------------------------------------------------------------------------
# FP8 weight copies


@dataclass(frozen=True)
class Fp8Weight:
    """One expert weight stack ``w [E, K, N]`` (used as ``x @ w[e]``) in FP8 E4M3 128x128 blocks,
    in both operand layouts of the FP8 grouped GEMM (whose B operand is ``[E, N', K']``,
    K'-major, with scales ``[E, N'/128, K'/128]``).

    Attributes:
        nk, nk_scales: ``[E, N, K]`` and ``[E, N/128, K/128]``: the operand of ``x @ w``.
        kn, kn_scales: ``[E, K, N]`` and ``[E, K/128, N/128]``: the operand of ``dy @ w^T``;
            the transpose of ``nk`` (the 128x128 grid is symmetric, so it is bitwise what
            quantizing ``w^T`` gives).
    """

    nk: torch.Tensor
    nk_scales: torch.Tensor
    kn: torch.Tensor
    kn_scales: torch.Tensor


@dataclass(frozen=True)
class Fp8ExpertWeights:
    """The four FP8 copies of one layer's experts: ``w13`` (``[E, D, 2F]``) and ``w2``
    (``[E, F, D]``)."""

    w13: Fp8Weight
    w2: Fp8Weight


class ExpertWeightCache:
    """Quantized (FP8 recipe) or cast (BF16 recipe, `cast`) copies of one layer's expert weights,
    built on first use and kept until `invalidate` (the trainer calls it once per optimizer step,
    so the micro-batches of a step share one quantization or cast).

    As a guard, the copies are also rebuilt when a master weight was modified in place since they
    were made (its autograd version counter moved: ``load_state_dict``, an in-place edit) or now
    lives elsewhere (``.to(device)``, ``param.data = ...``). Writes that bypass both (into a
    buffer the parameter's storage is a view of, as ZeRO-2's all-gather does) are only seen
    through `invalidate`.

    The bf16 copies may instead be refreshed by the optimizer step itself: `copy_targets` hands
    them to the update, which writes the new weights rounded to bf16 into them (the same bits a
    cast gives), and `after_update` keeps them valid. They then stay allocated across steps.

    Attributes:
        builds: how many times the copies were built.
        invalidations: how many times `invalidate` was called.
        refreshes: how many optimizer steps wrote the bf16 copies (`after_update`).
    """

    def __init__(self) -> None:
        self._fp8: Fp8ExpertWeights | None = None
        self._key: tuple | None = None
        self._cast: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cast_key: tuple | None = None
        self.builds = 0
        self.invalidations = 0
        self.refreshes = 0

    @staticmethod
    def _key_of(w13: torch.Tensor, w2: torch.Tensor, kernels) -> tuple:
        return (id(kernels), w13._version, w2._version, w13.data_ptr(), w2.data_ptr(),
                w13.device, w2.device)

    def fp8(self, w13_ED2F: torch.Tensor, w2_EFD: torch.Tensor, kernels) -> Fp8ExpertWeights:
        """The FP8 copies of ``(w13_ED2F, w2_EFD)``, quantized by ``kernels`` when stale."""
        key = self._key_of(w13_ED2F, w2_EFD, kernels)
        if self._fp8 is None or self._key != key:
            with torch.no_grad():
                self._fp8 = Fp8ExpertWeights(
                    w13=kernels.quantize_weight(w13_ED2F.detach()),
                    w2=kernels.quantize_weight(w2_EFD.detach()),
                )
            self._key = key
            self.builds += 1
        return self._fp8

    def cast(self, w13_ED2F: torch.Tensor, w2_EFD: torch.Tensor,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w13, w2)`` rounded to ``dtype`` (the BF16 recipe's GEMM operands), cast when stale.
        Kept, the forward and the backward of every micro-batch of a step read one cast instead
        of casting the float32 master weights twice per micro-batch (6 bytes moved per expert
        parameter each time), for ``dtype``'s 2 bytes per expert parameter held until
        `invalidate`."""
        key = (dtype, *self._key_of(w13_ED2F, w2_EFD, None))
        if self._cast is None or self._cast_key != key:
            self._cast = None  # free the stale copies before making the new ones
            with torch.no_grad():
                self._cast = (w13_ED2F.detach().to(dtype), w2_EFD.detach().to(dtype))
            self._cast_key = key
            self.builds += 1
        return self._cast

    def copy_targets(self, w13_ED2F: torch.Tensor,
                     w2_EFD: torch.Tensor) -> dict[torch.Tensor, torch.Tensor]:
        """``{w13: its bf16 copy, w2: its bf16 copy}`` when a current bfloat16 `cast` exists,
        else ``{}``: tensors an optimizer step may write the updated weights into
        (``nmoe_core.optim.AdamW.step(param_copies=...)``), so that the next step's copies need
        no cast. Report what it wrote with `after_update`."""
        if self._cast is None or self._cast_key != (torch.bfloat16,
                                                    *self._key_of(w13_ED2F, w2_EFD, None)):
            return {}
        return {w13_ED2F: self._cast[0], w2_EFD: self._cast[1]}

    def after_update(self, w13_ED2F: torch.Tensor, w2_EFD: torch.Tensor,
                     refreshed: Collection[int] = ()) -> None:
        """After an optimizer step changed the master weights: keep the bf16 copies when the
        step wrote both (``id(w13)`` and ``id(w2)`` in ``refreshed``, from `copy_targets`),
        else `invalidate` everything. The FP8 copies are always dropped."""
        if self._cast is not None and id(w13_ED2F) in refreshed and id(w2_EFD) in refreshed:
            self._fp8 = None
            self._key = None
            self._cast_key = (self._cast_key[0], *self._key_of(w13_ED2F, w2_EFD, None))
            self.refreshes += 1
        else:
            self.invalidate()

    def invalidate(self) -> None:
        """Drop the copies; the next forward rebuilds them from the current master weights."""
        self._fp8 = None
        self._key = None
        self._cast = None
        self._cast_key = None
        self.invalidations += 1


def check_fp8_shapes(dim: int, inter_dim: int) -> None:
    """Raise unless the FP8 recipe's 128-wide blocks tile ``D`` and ``F``."""
    if dim % 128 or inter_dim % 128:
        raise ValueError(
            f"moe.recipe='fp8' quantizes in 128-wide blocks along D and F, so model.dim "
            f"({dim}) and model.moe.moe_inter_dim ({inter_dim}) must be multiples of 128; "
            f"change them or use moe.recipe='bf16'"
        )


# --------------------------------------------------------------------------------------------
# Kernel providers


class ExpertKernels:
    """What the fused autograd needs from a kernel provider. Offsets ``offsets_E1`` are int32
    ``[E + 1]`` on the rows' device; rows ``offsets[e]:offsets[e+1]`` belong to expert ``e``.

    BF16 recipe: ``gemm_swiglu``, ``gemm``, ``dgrad``, ``wgrad``. Both recipes:
    ``swiglu_backward_gated``. FP8 recipe: ``quantize_rows``, ``quantize_weight``, ``gemm_fp8``,
    ``gemm_fp8_swiglu_quant``. Scales travel in whatever layout the provider's GEMMs read.
    """

    name = "abstract"

    def require_recipe(self, recipe: str) -> None:
        """Raise, naming what is missing, unless this provider can run ``recipe``."""

    def gemm_swiglu(self, x_RD, w13_ED2F, offsets_E1):
        """``swiglu(x @ w13[e])`` per segment: ``[R, F]`` in x's dtype."""
        raise NotImplementedError

    def gemm(self, x_RK, w_EKN, offsets_E1):
        """``x @ w[e]`` per segment: ``[R, N]`` in x's dtype."""
        raise NotImplementedError

    def dgrad(self, dy_RN, w_EKN, offsets_E1):
        """``dy @ w[e]^T`` per segment: ``[R, K]`` in dy's dtype."""
        raise NotImplementedError

    def wgrad(self, x_RK, dy_RN, offsets_E1):
        """``x[rows of e]^T dy[rows of e]``: ``[E, K, N]`` (float32 or x's dtype)."""
        raise NotImplementedError

    def swiglu_backward_gated(self, h_R2F, da_RF, gates_R, *, quantize_dh=False):
        """The fused elementwise backward (`swiglu_backward_gated_torch` for the math):
        a `GatedSwigluGrad`, with dH also in FP8 1x128 blocks along 2F when ``quantize_dh``."""
        raise NotImplementedError

    def _gated_backward_with(self, op, h_R2F, da_RF, gates_R, quantize_dh) -> GatedSwigluGrad:
        """``op`` (a ``swiglu_backward_gated`` of nmoe-kernels or its reference, or None) where
        it applies; elsewhere (no op in this build, non-bf16 rows, F % 128 != 0)
        `swiglu_backward_gated_torch` on the rows' device, plus `quantize_rows` of dH when
        ``quantize_dh``."""
        grads = _gated_backward_op(op, h_R2F, da_RF, gates_R, quantize_dh)
        if grads is None:
            grads = GatedSwigluGrad(*swiglu_backward_gated_torch(h_R2F, da_RF, gates_R))
            if quantize_dh:
                dh_fp8, dh_scales = self.quantize_rows(grads.dh_R2F)
                grads = grads._replace(dh_fp8_R2F=dh_fp8, dh_scales=dh_scales)
        return grads

    def quantize_rows(self, x_RK):
        """FP8 E4M3, one scale per 1x128 block along K: ``(x_fp8 [R, K], scales [R, K/128])``."""
        raise NotImplementedError

    def quantize_weight(self, w_EKN) -> Fp8Weight:
        """FP8 E4M3 128x128 blocks of ``w [E, K, N]`` in both operand layouts."""
        raise NotImplementedError

    def gemm_fp8(self, x_fp8_RK, x_scales, w_fp8_ENK, w_scales_ENbKb, offsets_E1):
        """Blockscaled ``dequant(x) @ dequant(w[e])^T`` per segment: ``[R, N]`` bfloat16."""
        raise NotImplementedError

    def gemm_fp8_swiglu_quant(self, x_fp8_RD, x_scales, w13_fp8_E2FD, w13_scales, offsets_E1):
        """The W13 FP8 GEMM with SwiGLU and 1x128 FP8 quantization of a: ``(a_fp8, scales)``."""
        raise NotImplementedError


class ReferenceExpertKernels(ExpertKernels):
    """Grouped GEMMs and quantizers from `nmoe_kernels.reference` (pure torch, any device; reads
    offsets on the host). The FP8 GEMMs multiply the dequantized operands in float32 and round to
    bf16, as the Hopper kernels do up to accumulation order; the SwiGLU epilogue rounds h and a to
    bf16 before quantizing a, as `nmoe_kernels.grouped_gemm_fp8_swiglu_quant` does."""

    name = "reference"

    def __init__(self) -> None:
        from nmoe_kernels import reference

        self.ref = reference

    def gemm_swiglu(self, x_RD, w13_ED2F, offsets_E1):
        h = self.ref.grouped_gemm(x_RD, w13_ED2F, offsets_E1, out_dtype=torch.float32)
        return self.ref.swiglu_interleaved(h).to(x_RD.dtype)

    def gemm(self, x_RK, w_EKN, offsets_E1):
        return self.ref.grouped_gemm(x_RK, w_EKN, offsets_E1)

    def dgrad(self, dy_RN, w_EKN, offsets_E1):
        return self.ref.grouped_gemm_dgrad(dy_RN, w_EKN, offsets_E1)

    def wgrad(self, x_RK, dy_RN, offsets_E1):
        return self.ref.grouped_gemm_wgrad(x_RK, dy_RN, offsets_E1, out_dtype=torch.float32)

    def swiglu_backward_gated(self, h_R2F, da_RF, gates_R, *, quantize_dh=False):
        op = getattr(self.ref, "swiglu_backward_gated", None)
        return self._gated_backward_with(op, h_R2F, da_RF, gates_R, quantize_dh)

    def quantize_rows(self, x_RK):
        rows = x_RK if x_RK.dtype != torch.float64 else x_RK.float()
        return self.ref.quantize_fp8_1x128(rows)

    def quantize_weight(self, w_EKN) -> Fp8Weight:
        w = w_EKN if w_EKN.dtype != torch.float64 else w_EKN.float()
        nk, nk_scales = self.ref.quantize_fp8_128x128(w, transpose=True)
        return Fp8Weight(nk, nk_scales, nk.transpose(1, 2).contiguous(),
                         nk_scales.transpose(1, 2).contiguous())

    def gemm_fp8(self, x_fp8_RK, x_scales, w_fp8_ENK, w_scales_ENbKb, offsets_E1):
        return self.ref.grouped_gemm_fp8_blockscaled(
            x_fp8_RK, x_scales, w_fp8_ENK.transpose(1, 2), w_scales_ENbKb.transpose(1, 2),
            offsets_E1, out_dtype=torch.bfloat16,
        )

    def gemm_fp8_swiglu_quant(self, x_fp8_RD, x_scales, w13_fp8_E2FD, w13_scales, offsets_E1):
        h = self.gemm_fp8(x_fp8_RD, x_scales, w13_fp8_E2FD, w13_scales, offsets_E1)
        return self.quantize_rows(self.ref.swiglu_interleaved(h))


@functools.cache
def _fused_unavailable_on(device_type: str, index: int | None) -> str | None:
    if device_type != "cuda":
        return f"the rows are on {device_type}, not a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) != (9, 0):
        return f"the GPU is sm_{major}{minor}; the fused kernels are built for sm_90a (Hopper)"
    try:
        import nmoe_kernels
        import nmoe_kernels._C as compiled
    except ImportError as err:
        return f"nmoe_kernels does not import ({err})"
    if not compiled.WITH_CUDA:
        return "nmoe_kernels._C was built without CUDA"
    missing = [op for op in HopperExpertKernels._BF16_OPS if not hasattr(nmoe_kernels, op)]
    if missing:
        return f"this nmoe-kernels build lacks {', '.join(missing)}"
    if importlib.util.find_spec("cutlass") is None:
        return "nvidia-cutlass-dsl (the CuTeDSL runtime of the grouped GEMMs) is not installed"
    return None


def fused_unavailable(device: torch.device) -> str | None:
    """Why the fused path cannot run on ``device`` (None when it can): a Hopper (sm_90) CUDA GPU,
    an nmoe-kernels build with CUDA and the BF16 grouped GEMMs, and the CuTeDSL runtime. Cached
    per device; what ``moe.backend='auto'`` consults."""
    return _fused_unavailable_on(device.type, device.index)


class HopperExpertKernels(ExpertKernels):
    """nmoe-kernels' grouped GEMMs (CuTeDSL, sm_90a), quantizers and the fused elementwise
    backward (CUDA). Raises a clear error naming what is missing when the kernels are not
    available. Without ``nmoe_kernels.swiglu_backward_gated`` (older builds) the elementwise
    backward runs as `swiglu_backward_gated_torch` on the GPU."""

    name = "hopper"
    _BF16_OPS = ("grouped_gemm_bf16", "grouped_gemm_bf16_swiglu", "grouped_gemm_bf16_dgrad",
                 "grouped_gemm_bf16_wgrad")
    _FP8_OPS = ("quantize_fp8_1x128", "quantize_fp8_128x128", "grouped_gemm_fp8_blockscaled",
                "grouped_gemm_fp8_swiglu_quant")

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
            raise RuntimeError(
                f"moe.backend='fused' needs a Hopper-or-newer CUDA GPU (sm_90a); this run is on "
                f"{device}. Use moe.backend='torch' here."
            )
        import nmoe_kernels

        self.k = nmoe_kernels
        self.require_recipe("bf16")
        self._gated_backward = getattr(nmoe_kernels, "swiglu_backward_gated", None)

    def require_recipe(self, recipe: str) -> None:
        ops = self._FP8_OPS if recipe == "fp8" else self._BF16_OPS
        missing = [name for name in ops if not hasattr(self.k, name)]
        if missing:
            raise RuntimeError(
                f"moe.backend='fused' with moe.recipe={recipe!r} needs nmoe_kernels."
                f"{', nmoe_kernels.'.join(missing)}, which this nmoe-kernels build does not "
                f"provide; upgrade nmoe-kernels or use moe.backend='torch'"
            )

    def gemm_swiglu(self, x_RD, w13_ED2F, offsets_E1):
        return self.k.grouped_gemm_bf16_swiglu(x_RD, w13_ED2F, offsets_E1)

    def gemm(self, x_RK, w_EKN, offsets_E1):
        return self.k.grouped_gemm_bf16(x_RK, w_EKN, offsets_E1)

    def dgrad(self, dy_RN, w_EKN, offsets_E1):
        return self.k.grouped_gemm_bf16_dgrad(dy_RN, w_EKN, offsets_E1)

    def wgrad(self, x_RK, dy_RN, offsets_E1):
        # float32: the master weights' gradient straight from the accumulators (no bf16 result
        # to cast: 6 bytes per expert weight less traffic, and no rounding to bf16).
        return self.k.grouped_gemm_bf16_wgrad(x_RK, dy_RN, offsets_E1, out_dtype=torch.float32)

    def swiglu_backward_gated(self, h_R2F, da_RF, gates_R, *, quantize_dh=False):
        return self._gated_backward_with(self._gated_backward, h_R2F, da_RF, gates_R, quantize_dh)

    def quantize_rows(self, x_RK):
        return self.k.quantize_fp8_1x128(x_RK.contiguous(), scale_layout="mn_major_tma_aligned")

    def quantize_weight(self, w_EKN) -> Fp8Weight:
        # Two quantizing reads of the master weights instead of one plus a transposing copy of
        # the FP8 result: torch's strided byte copy cost 4x the quantization (super on H100).
        # The 128x128 grid is symmetric, so both layouts hold the same blocks bitwise.
        w = w_EKN.contiguous()
        nk, nk_scales = self.k.quantize_fp8_128x128(w, transpose=True)
        kn, kn_scales = self.k.quantize_fp8_128x128(w, transpose=False)
        return Fp8Weight(nk, nk_scales, kn, kn_scales)

    def gemm_fp8(self, x_fp8_RK, x_scales, w_fp8_ENK, w_scales_ENbKb, offsets_E1):
        return self.k.grouped_gemm_fp8_blockscaled(x_fp8_RK, x_scales, w_fp8_ENK,
                                                   w_scales_ENbKb, offsets_E1)

    def gemm_fp8_swiglu_quant(self, x_fp8_RD, x_scales, w13_fp8_E2FD, w13_scales, offsets_E1):
        return self.k.grouped_gemm_fp8_swiglu_quant(x_fp8_RD, x_scales, w13_fp8_E2FD,
                                                    w13_scales, offsets_E1)


# --------------------------------------------------------------------------------------------
# Autograd


def rows_to_sources(dispatcher: Dispatcher, values_R: torch.Tensor, slot_R: torch.Tensor,
                    handle: DispatchHandle) -> torch.Tensor:
    """Return one value per received row to its (token, slot) of origin: ``[T, K]``.

    Uses the dispatcher's ``rows_to_sources(values_R, handle)`` when it has one (no nmoe-comm
    backend does yet); otherwise ONE combine of the ``[R, K]`` matrix that holds each row's value
    in the column of its slot and zeros elsewhere, with unit gates: ``out[t, j]`` is then
    ``1 * value(t, j)`` plus exact zeros, i.e. bitwise the value.

    Args:
        dispatcher: the backend that made ``handle``.
        values_R: ``[R]`` float32 (float64 on ``local`` for float64 rows) per received row.
        slot_R: ``[R]`` the slot ``k`` of each received row (any numeric dtype, exact).
        handle: the handle of the matching dispatch.
    """
    native = getattr(dispatcher, "rows_to_sources", None)
    if native is not None:
        return native(values_R, handle)
    num_tokens, top_k = handle.num_tokens, handle.top_k
    onehot_RK = values_R.new_zeros(values_R.shape[0], top_k)
    onehot_RK.scatter_(1, slot_R.long()[:, None], values_R[:, None])
    ones_TK = torch.ones(num_tokens, top_k, dtype=torch.float32, device=values_R.device)
    return dispatcher.combine(onehot_RK, handle, ones_TK)


@dataclass
class _Routing:
    """The non-differentiable context of one fused call."""

    dispatcher: Dispatcher
    handle: DispatchHandle
    gates_R: torch.Tensor
    offsets_E1: torch.Tensor
    kernels: ExpertKernels
    fp8: Fp8ExpertWeights | None
    cast: tuple[torch.Tensor, torch.Tensor] | None = None  # BF16 recipe: cached GEMM operands


def _experts_forward(x_RD, w13, w2, r: _Routing) -> torch.Tensor:
    kernels, offsets = r.kernels, r.offsets_E1
    if r.fp8 is None:
        a_RF = kernels.gemm_swiglu(x_RD, w13, offsets)
        return kernels.gemm(a_RF, w2, offsets)
    x_fp8, x_scales = kernels.quantize_rows(x_RD)
    a_fp8, a_scales = kernels.gemm_fp8_swiglu_quant(x_fp8, x_scales, r.fp8.w13.nk,
                                                    r.fp8.w13.nk_scales, offsets)
    return kernels.gemm_fp8(a_fp8, a_scales, r.fp8.w2.nk, r.fp8.w2.nk_scales, offsets)


def _experts_backward(x_RD, dz_RD, w13, w2, r: _Routing):
    """``(dx, dgate_R, dw13, dw2)`` of the expert rows, given the ungated row gradients."""
    kernels, offsets = r.kernels, r.offsets_E1
    if r.fp8 is None:
        h_R2F = kernels.gemm(x_RD, w13, offsets)  # recomputed, not stored
        da_ungated = kernels.dgrad(dz_RD, w2, offsets)
        grads = kernels.swiglu_backward_gated(h_R2F, da_ungated, r.gates_R)
        dx = kernels.dgrad(grads.dh_R2F, w13, offsets)
    else:
        x_fp8, x_scales = kernels.quantize_rows(x_RD)  # recomputed: cheaper than storing
        h_R2F = kernels.gemm_fp8(x_fp8, x_scales, r.fp8.w13.nk, r.fp8.w13.nk_scales, offsets)
        dz_fp8, dz_scales = kernels.quantize_rows(dz_RD)
        da_ungated = kernels.gemm_fp8(dz_fp8, dz_scales, r.fp8.w2.kn, r.fp8.w2.kn_scales, offsets)
        grads = kernels.swiglu_backward_gated(h_R2F, da_ungated, r.gates_R, quantize_dh=True)
        dx = kernels.gemm_fp8(grads.dh_fp8_R2F, grads.dh_scales, r.fp8.w13.kn,
                              r.fp8.w13.kn_scales, offsets)
    dw2 = kernels.wgrad(grads.ag_RF, dz_RD, offsets)  # BF16 wgrad in both recipes
    dw13 = kernels.wgrad(x_RD, grads.dh_R2F, offsets)
    return dx, grads.dgate_R, dw13, dw2


def _gemm_weights(w13, w2, dtype: torch.dtype, r: _Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """The BF16 recipe's weight operands: the cached cast when the layer keeps one, else a cast of
    the master weights now (freed after the GEMMs)."""
    if r.cast is not None and r.cast[0].dtype == dtype:
        return r.cast
    return w13.to(dtype), w2.to(dtype)


class _FusedExperts(torch.autograd.Function):
    """``out = combine(swiglu(x @ W13) @ W2, gates)``; see the module docstring for both passes.

    Inputs ``x_RD`` (the dispatched rows), ``gates_TK`` (the router's gates), ``w13_ED2F`` and
    ``w2_EFD`` (the master weights) are differentiable; ``routing`` is not.
    """

    @staticmethod
    def forward(ctx, x_RD, gates_TK, w13_ED2F, w2_EFD, routing: _Routing):
        dtype = x_RD.dtype
        with torch.autocast(device_type=x_RD.device.type, enabled=False):
            fp8 = routing.fp8 is not None
            w13, w2 = (None, None) if fp8 else _gemm_weights(w13_ED2F, w2_EFD, dtype, routing)
            y_RD = _experts_forward(x_RD, w13, w2, routing).to(dtype)
            # The dispatch carried these gates' values (the backward uses them as ``gates_R``
            # too), so the combine takes the handle's gates: the same numbers, and a
            # ``reduce_on_owner`` dispatcher can then apply them on the owners and send one
            # partial sum per token and owner (nmoe_comm.rdep).
            out_TD = routing.dispatcher.combine(y_RD, routing.handle)
        ctx.save_for_backward(x_RD)
        ctx.routing = routing
        ctx.weights = (w13_ED2F, w2_EFD)
        ctx.gates_dtype = gates_TK.dtype
        return out_TD

    @staticmethod
    def backward(ctx, grad_out_TD):
        (x_RD,) = ctx.saved_tensors
        r: _Routing = ctx.routing
        w13_param, w2_param = ctx.weights
        handle = r.handle
        dtype = x_RD.dtype
        # Each row receives its token's gradient, ungated; the gate channel carries each row's
        # slot index (exact in float32) so that rows_to_sources can place dgate.
        slots_TK = torch.arange(handle.top_k, dtype=torch.float32, device=x_RD.device)
        slots_TK = slots_TK.expand(handle.num_tokens, -1).contiguous()
        routed = r.dispatcher.dispatch(grad_out_TD.to(dtype).contiguous(), handle.expert_ids_TK,
                                       slots_TK)
        with torch.autocast(device_type=x_RD.device.type, enabled=False):
            fp8 = r.fp8 is not None
            w13, w2 = (None, None) if fp8 else _gemm_weights(w13_param, w2_param, dtype, r)
            dx, dgate_R, dw13, dw2 = _experts_backward(x_RD, routed.x_RD, w13, w2, r)
            dgates_TK = rows_to_sources(r.dispatcher, dgate_R, routed.gates_R, handle)
        return (dx.to(dtype), dgates_TK.to(ctx.gates_dtype), dw13.to(w13_param.dtype),
                dw2.to(w2_param.dtype), None)


def fused_expert_forward(
    dispatcher: Dispatcher,
    dispatched,
    gates_TK: torch.Tensor,
    w13_ED2F: torch.Tensor,
    w2_EFD: torch.Tensor,
    kernels: ExpertKernels,
    fp8_weights: Fp8ExpertWeights | None = None,
    cast_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the experts on ``dispatched`` rows and combine with ``gates_TK``.

    Args:
        dispatcher: the backend that made ``dispatched``.
        dispatched: the `nmoe_comm.Dispatched` rows (``x_RD`` may carry the graph to ``x_TD``).
        gates_TK: ``[T, K]`` float gates (the router's output; receives ``dGates``), with the
            values ``dispatched`` was made with (its handle's gates weight the combine).
        w13_ED2F: ``[E_local, D, 2F]`` interleaved gate/up weights (master, any float dtype).
        w2_EFD: ``[E_local, F, D]`` down weights.
        kernels: the `ExpertKernels` provider.
        fp8_weights: the layer's FP8 weight copies (`ExpertWeightCache.fp8`) for the FP8 recipe;
            None runs the BF16 recipe (GEMMs in the rows' dtype).
        cast_weights: BF16 recipe: ``(w13, w2)`` already in the rows' dtype
            (`ExpertWeightCache.cast`), used by the forward and the backward instead of casting
            the master weights in each; None casts them in each.

    Returns:
        ``out_TD [T, D]`` in the rows' dtype, differentiable w.r.t. the rows, the gates and both
        weight stacks.
    """
    counts = dispatched.counts_E
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    offsets[1:] = torch.cumsum(counts, 0)
    routing = _Routing(dispatcher, dispatched.handle, dispatched.gates_R, offsets, kernels,
                       fp8_weights, cast_weights)
    return _FusedExperts.apply(dispatched.x_RD, gates_TK, w13_ED2F, w2_EFD, routing)
