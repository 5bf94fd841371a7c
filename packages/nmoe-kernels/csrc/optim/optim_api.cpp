// Python bindings for the optimizer ops: argument checks at the boundary, then the launchers.
#include "optim_api.h"

#include <cstdint>
#include <string>

#include "../build_info.h"
#include "../dlpack_tensor.h"
#include "adamw.h"

namespace nmoe::optim {
namespace {

// The table's addresses are the Python wrapper's responsibility (it checks every tensor's dtype,
// device, shape and contiguity before writing them); here the table itself is checked.
void adamw_step(const py::object& table_capsule, int64_t num_blocks, bool moments_bf16,
                double decay, double one_minus_beta1, double beta2, double one_minus_beta2,
                double bias_correction2_sqrt, double neg_step_size, double eps,
                const py::object& grad_coef_capsule, std::uintptr_t stream) {
  require_cuda_build("adamw_step");
  const TensorView table(table_capsule, "table");
  table.check_dtype({ScalarType::kInt64});
  table.check_cuda();
  if (table.ndim() != 2 ||
      (table.size(1) != kAdamwTableCols && table.size(1) != kAdamwTableCols + 1)) {
    table.fail("expected [num_tensors, " + std::to_string(kAdamwTableCols) + "] or [num_tensors, " +
               std::to_string(kAdamwTableCols + 1) + "] (with bf16 copies), got " +
               table.describe());
  }
  table.check_contiguous();
  const float* grad_coef = nullptr;
  if (!grad_coef_capsule.is_none()) {
    const TensorView coef(grad_coef_capsule, "grad_coef");
    coef.check_dtype({ScalarType::kFloat32});
    coef.check_same_device(table);
    coef.check_shape({});
    grad_coef = static_cast<const float*>(coef.data());
  }
  const AdamwScalars scalars{static_cast<float>(decay),
                             static_cast<float>(one_minus_beta1),
                             static_cast<float>(beta2),
                             static_cast<float>(one_minus_beta2),
                             static_cast<float>(bias_correction2_sqrt),
                             static_cast<float>(neg_step_size),
                             static_cast<float>(eps)};
#if NMOE_WITH_CUDA
  launch_adamw_step(static_cast<const int64_t*>(table.data()), table.size(0),
                    static_cast<int>(table.size(1)), num_blocks,
                    moments_bf16, scalars, grad_coef, table.device_id(), stream);
#else
  (void)num_blocks;
  (void)moments_bf16;
  (void)scalars;
  (void)grad_coef;
  (void)stream;
#endif
}

}  // namespace

void register_apis(py::module_& m) {
  m.attr("ADAMW_BLOCK_ELEMS") = kAdamwBlockElems;
  // Present when the table may carry the bf16-copy column (a build without it rejects 7 columns).
  m.attr("ADAMW_COPY_COLUMN") = kAdamwCopyCol;
  m.def("adamw_step", &adamw_step, py::arg("table"), py::arg("num_blocks"),
        py::arg("moments_bf16"), py::arg("decay"), py::arg("one_minus_beta1"), py::arg("beta2"),
        py::arg("one_minus_beta2"), py::arg("bias_correction2_sqrt"), py::arg("neg_step_size"),
        py::arg("eps"), py::arg("grad_coef"), py::arg("stream"),
        "One AdamW step of every tensor in `table` (int64 [T, 6] on the GPU: param, grad,\n"
        "exp_avg, exp_avg_sq addresses, numel, first block; [T, 7] adds the address of a bf16\n"
        "copy of the param to refresh, 0 for none), float32 params and grads, moments\n"
        "bf16 or fp32, scalars as nmoe_kernels.optim.adamw_step_ derives them; grad_coef a\n"
        "float32 [] device tensor or None. Use nmoe_kernels.adamw_step_, which builds the table.");
}

}  // namespace nmoe::optim
