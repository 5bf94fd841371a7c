// nmoe_kernels._C: one PYBIND11_MODULE that registers each domain's bindings.
//
// Tensors cross the boundary as DLPack capsules (see dlpack_tensor.h), so this module does not
// link libtorch and works with any torch version.
#include <pybind11/pybind11.h>

#include "build_info.h"
#include "loss/loss_api.h"
#include "optim/optim_api.h"
#include "permute/permute_api.h"
#include "quant/quant_api.h"
#include "router/router_api.h"

// Bump on any binding signature or behaviour change, with a one-line reason:
//   1: first release (quantize_fp8_1x128, dequantize_fp8_1x128).
//   2: adds quantize_fp8_128x128, swiglu_quantize_fp8_1x128, permute, gather_rows, unpermute.
//      Later additions that leave every existing binding unchanged (a consumer that checks for
//      the new name with hasattr keeps working on either build) do not bump:
//      + swiglu_backward_gated (the fused MoE SwiGLU backward).
//      + cross_entropy_rows (fused loss, lse and logits gradient per row).
//      + adamw_step, ADAMW_BLOCK_ELEMS (multi-tensor AdamW, float32 or bfloat16 moments).
//      + router_topk, ROUTER_MAX_EXPERTS, ROUTER_MAX_TOP_K (the router's biased top-k).
constexpr int kAbiVersion = 2;

PYBIND11_MODULE(_C, m) {
  m.doc() = "nmoe-kernels compiled ops (CUDA C++); see nmoe_kernels for the Python API";
  m.attr("ABI_VERSION") = kAbiVersion;
  m.attr("WITH_CUDA") = static_cast<bool>(NMOE_WITH_CUDA);
  m.attr("CUDA_ARCHS") = NMOE_CUDA_ARCHS;
  nmoe::quant::register_apis(m);
  nmoe::permute::register_apis(m);
  nmoe::loss::register_apis(m);
  nmoe::optim::register_apis(m);
  nmoe::router::register_apis(m);
}
