// Python bindings for the router ops: argument checks at the boundary, then the launchers.
#include "router_api.h"

#include <cstdint>
#include <string>

#include "../build_info.h"
#include "../dlpack_tensor.h"
#include "router_topk.h"

namespace nmoe::router {
namespace {

void router_topk(const py::object& scores_capsule, const py::object& bias_capsule,
                 const py::object& expert_ids_capsule, int64_t top_k, std::uintptr_t stream) {
  require_cuda_build("router_topk");
  const TensorView scores(scores_capsule, "scores_TE");
  const TensorView bias(bias_capsule, "bias_E");
  const TensorView expert_ids(expert_ids_capsule, "expert_ids_TK");

  scores.check_dtype({ScalarType::kFloat32});
  scores.check_cuda();
  if (scores.ndim() != 2) scores.fail("expected a 2-D tensor [T, E], got " + scores.describe());
  const int64_t num_rows = scores.size(0);
  const int64_t num_experts = scores.size(1);
  if (num_experts < 1 || num_experts > kRouterMaxExperts) {
    scores.fail("E must be in [1, " + std::to_string(kRouterMaxExperts) + "], got " +
                scores.describe() + "; use torch.topk for more experts");
  }
  scores.check_contiguous();
  bias.check_dtype({ScalarType::kFloat32});
  bias.check_same_device(scores);
  bias.check_shape({num_experts});
  bias.check_contiguous();
  if (top_k < 1 || top_k > num_experts || top_k > kRouterMaxTopK) {
    throw py::value_error("router_topk: k must satisfy 1 <= k <= min(E, " +
                          std::to_string(kRouterMaxTopK) + ") = " +
                          std::to_string(num_experts < kRouterMaxTopK ? num_experts
                                                                      : kRouterMaxTopK) +
                          ", got " + std::to_string(top_k));
  }
  expert_ids.check_dtype({ScalarType::kInt64});
  expert_ids.check_same_device(scores);
  expert_ids.check_shape({num_rows, top_k});
  expert_ids.check_contiguous();

#if NMOE_WITH_CUDA
  launch_router_topk(static_cast<const float*>(scores.data()),
                     static_cast<const float*>(bias.data()),
                     static_cast<int64_t*>(expert_ids.data()), num_rows, num_experts, top_k,
                     scores.device_id(), stream);
#else
  (void)stream;
#endif
}

}  // namespace

void register_apis(py::module_& m) {
  m.attr("ROUTER_MAX_EXPERTS") = kRouterMaxExperts;
  m.attr("ROUTER_MAX_TOP_K") = kRouterMaxTopK;
  m.def("router_topk", &router_topk, py::arg("scores"), py::arg("bias"), py::arg("expert_ids"),
        py::arg("top_k"), py::arg("stream"),
        "Per row of fp32 scores [T, E] (E <= 1024) with fp32 bias [E]: write into int64\n"
        "expert_ids [T, k] (1 <= k <= min(E, 32)) the k largest scores + bias (one fp32 add),\n"
        "descending, ties to the lower expert. Use nmoe_kernels.router_topk.");
}

}  // namespace nmoe::router
