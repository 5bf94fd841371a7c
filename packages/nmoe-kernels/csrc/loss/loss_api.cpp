// Python bindings for the loss ops: argument checks at the boundary, then the launchers.
#include "loss_api.h"

#include <cstdint>
#include <limits>
#include <string>

#include "../build_info.h"
#include "../dlpack_tensor.h"
#include "cross_entropy_rows.h"

namespace nmoe::loss {
namespace {

// A float32 [num_rows] contiguous vector on `like`'s device.
void check_row_vector(const TensorView& t, const TensorView& like, int64_t num_rows) {
  t.check_dtype({ScalarType::kFloat32});
  t.check_same_device(like);
  t.check_shape({num_rows});
  t.check_contiguous();
}

void cross_entropy_rows(const py::object& logits_capsule, const py::object& targets_capsule,
                        const py::object& loss_capsule, const py::object& lse_capsule,
                        int64_t ignore_index, const py::object& row_scale_capsule,
                        double scale_value, std::uintptr_t stream) {
  require_cuda_build("cross_entropy_rows");
  const TensorView logits(logits_capsule, "logits");
  const TensorView targets(targets_capsule, "targets");
  const TensorView loss(loss_capsule, "loss");
  const TensorView lse(lse_capsule, "lse");

  logits.check_dtype({ScalarType::kBFloat16, ScalarType::kFloat32});
  logits.check_cuda();
  if (logits.ndim() != 2) logits.fail("expected a 2-D tensor [N, V], got " + logits.describe());
  const int64_t num_rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  if (vocab < 1) logits.fail("V must be >= 1, got " + logits.describe());
  if (num_rows > std::numeric_limits<int32_t>::max()) {
    logits.fail("N must be < 2^31 (one CUDA block per row), got " + logits.describe() +
                "; split the rows");
  }
  logits.check_contiguous();
  logits.check_aligned(logits.dtype() == ScalarType::kBFloat16 ? 2 : 4);
  targets.check_dtype({ScalarType::kInt64});
  targets.check_same_device(logits);
  targets.check_shape({num_rows});
  targets.check_contiguous();
  check_row_vector(loss, logits, num_rows);
  check_row_vector(lse, logits, num_rows);
  const float* row_scale_data = nullptr;
  if (!row_scale_capsule.is_none()) {
    const TensorView row_scale(row_scale_capsule, "row_scale");
    check_row_vector(row_scale, logits, num_rows);
    row_scale_data = static_cast<const float*>(row_scale.data());
  }

#if NMOE_WITH_CUDA
  launch_cross_entropy_rows(logits.data(), logits.dtype() == ScalarType::kBFloat16,
                            static_cast<const int64_t*>(targets.data()),
                            static_cast<float*>(loss.data()), static_cast<float*>(lse.data()),
                            row_scale_data, static_cast<float>(scale_value), ignore_index,
                            num_rows, vocab, logits.device_id(), stream);
#else
  (void)row_scale_data;
  (void)scale_value;
  (void)ignore_index;
  (void)stream;
#endif
}

}  // namespace

void register_apis(py::module_& m) {
  m.def("cross_entropy_rows", &cross_entropy_rows, py::arg("logits"), py::arg("targets"),
        py::arg("loss"), py::arg("lse"), py::arg("ignore_index"), py::arg("row_scale"),
        py::arg("scale_value"), py::arg("stream"),
        "Per row of logits [N, V] (bf16/fp32, overwritten) with int64 targets [N]: write fp32\n"
        "lse [N], loss [N] = lse - logits[n, target] (0 where target == ignore_index) and, over\n"
        "the logits, (softmax - onehot(target)) * scale (0 for ignored rows), scale = row_scale\n"
        "[N] fp32 or, when row_scale is None, scale_value. Use nmoe_kernels.cross_entropy_rows.");
}

}  // namespace nmoe::loss
