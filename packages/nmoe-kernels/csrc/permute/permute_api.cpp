// Python bindings for the routing ops: argument checks at the boundary, then the launchers.
#include "permute_api.h"

#include <cstdint>
#include <string>

#include "../build_info.h"
#include "../dlpack_tensor.h"
#include "permute.h"

namespace nmoe::permute {
namespace {

constexpr int64_t kMaxSlots = INT32_MAX;  // rows and slots are indexed with int32 on the GPU

// A [rows, row_bytes] uint8 view of a row-major tensor (the Python wrapper passes x.view(uint8)).
void check_byte_rows(const TensorView& t) {
  t.check_dtype({ScalarType::kUInt8});
  if (t.ndim() != 2) t.fail("expected a 2-D uint8 row view [rows, bytes], got " + t.describe());
  t.check_contiguous();
  t.check_aligned(16);
}

void check_int_vector(const TensorView& t, int64_t length) {
  t.check_dtype({ScalarType::kInt32, ScalarType::kInt64});
  t.check_shape({length});
  t.check_contiguous();
}

void permute(const py::object& x_capsule, const py::object& ids_capsule, int64_t num_experts,
             const py::object& x_out_capsule, const py::object& counts_capsule,
             const py::object& src_index_capsule, const py::object& workspace_capsule,
             std::uintptr_t stream) {
  require_cuda_build("permute");
  const TensorView x(x_capsule, "x");
  const TensorView ids(ids_capsule, "expert_ids");
  const TensorView x_out(x_out_capsule, "x_out");
  const TensorView counts(counts_capsule, "counts");
  const TensorView src_index(src_index_capsule, "src_index");
  const TensorView workspace(workspace_capsule, "workspace");

  x.check_cuda();
  check_byte_rows(x);
  const int64_t num_tokens = x.size(0);
  const int64_t row_bytes = x.size(1);
  ids.check_dtype({ScalarType::kInt32, ScalarType::kInt64});
  ids.check_same_device(x);
  if (ids.ndim() != 2 || ids.size(0) != num_tokens) {
    ids.fail("expected [T, K] with T=" + std::to_string(num_tokens) + ", got " + ids.describe());
  }
  ids.check_contiguous();
  if (num_experts < 1 || num_experts > kMaxExperts) {
    throw py::value_error("num_experts: must lie in [1, " + std::to_string(kMaxExperts) +
                          "], got " + std::to_string(num_experts));
  }
  const int64_t top_k = ids.size(1);
  const int64_t num_slots = num_tokens * top_k;
  if (num_slots > kMaxSlots) {
    ids.fail("T * K = " + std::to_string(num_slots) + " routed slots exceed 2^31 - 1; split it");
  }
  x_out.check_same_device(x);
  check_byte_rows(x_out);
  x_out.check_shape({num_slots, row_bytes});
  counts.check_dtype({ScalarType::kInt64});
  counts.check_same_device(x);
  counts.check_shape({num_experts});
  src_index.check_dtype({ScalarType::kInt64});
  src_index.check_same_device(x);
  src_index.check_shape({num_slots});
  src_index.check_contiguous();
  workspace.check_dtype({ScalarType::kInt32});
  workspace.check_same_device(x);
  workspace.check_shape({permute_workspace_numel(num_slots, num_experts)});

#if NMOE_WITH_CUDA
  launch_permute(x.data(), ids.data(), ids.dtype() == ScalarType::kInt64, num_tokens, top_k,
                 row_bytes, num_experts, x_out.data(), static_cast<int64_t*>(counts.data()),
                 static_cast<int64_t*>(src_index.data()), static_cast<int32_t*>(workspace.data()),
                 x.device_id(), stream);
#else
  (void)stream;
#endif
}

void gather_rows(const py::object& x_capsule, const py::object& index_capsule,
                 const py::object& out_capsule, std::uintptr_t stream) {
  require_cuda_build("gather_rows");
  const TensorView x(x_capsule, "x");
  const TensorView index(index_capsule, "index");
  const TensorView out(out_capsule, "out");

  x.check_cuda();
  check_byte_rows(x);
  if (index.ndim() != 1) index.fail("expected a 1-D tensor [R], got " + index.describe());
  index.check_same_device(x);
  check_int_vector(index, index.size(0));
  out.check_same_device(x);
  check_byte_rows(out);
  out.check_shape({index.size(0), x.size(1)});

#if NMOE_WITH_CUDA
  launch_gather_rows(x.data(), x.size(0), x.size(1), index.data(),
                     index.dtype() == ScalarType::kInt64, 1, out.data(), index.size(0),
                     x.device_id(), stream);
#else
  (void)stream;
#endif
}

void unpermute(const py::object& y_capsule, const py::object& src_index_capsule,
               const py::object& gates_capsule, const py::object& out_capsule,
               const py::object& workspace_capsule, std::uintptr_t stream) {
  require_cuda_build("unpermute");
  const TensorView y(y_capsule, "y");
  const TensorView src_index(src_index_capsule, "src_index");
  const TensorView gates(gates_capsule, "gates");
  const TensorView out(out_capsule, "out");
  const TensorView workspace(workspace_capsule, "workspace");

  y.check_dtype({ScalarType::kBFloat16, ScalarType::kFloat32});
  y.check_cuda();
  if (y.ndim() != 2) y.fail("expected a 2-D tensor [R, D], got " + y.describe());
  y.check_contiguous();
  y.check_aligned(16);
  const int64_t num_rows = y.size(0);
  const int64_t hidden = y.size(1);
  src_index.check_same_device(y);
  check_int_vector(src_index, num_rows);
  gates.check_dtype({ScalarType::kFloat32});
  gates.check_same_device(y);
  if (gates.ndim() != 2) gates.fail("expected a 2-D tensor [T, K], got " + gates.describe());
  gates.check_contiguous();
  const int64_t num_tokens = gates.size(0);
  const int64_t top_k = gates.size(1);
  if (num_tokens * top_k > kMaxSlots || num_rows > kMaxSlots) {
    gates.fail("T * K and R must be below 2^31, got " + gates.describe() + " and R=" +
               std::to_string(num_rows));
  }
  out.check_dtype({ScalarType::kBFloat16, ScalarType::kFloat32});
  out.check_same_device(y);
  out.check_shape({num_tokens, hidden});
  out.check_contiguous();
  out.check_aligned(16);
  workspace.check_dtype({ScalarType::kInt32});
  workspace.check_same_device(y);
  workspace.check_shape({num_tokens * top_k});

#if NMOE_WITH_CUDA
  launch_unpermute(y.data(), y.dtype() == ScalarType::kBFloat16, num_rows, hidden,
                   src_index.data(), src_index.dtype() == ScalarType::kInt64,
                   static_cast<const float*>(gates.data()), num_tokens, top_k, out.data(),
                   out.dtype() == ScalarType::kBFloat16,
                   static_cast<int32_t*>(workspace.data()), y.device_id(), stream);
#else
  (void)stream;
#endif
}

}  // namespace

void register_apis(py::module_& m) {
  m.attr("PERMUTE_MAX_EXPERTS") = kMaxExperts;
  m.def("permute_workspace_numel", &permute_workspace_numel, py::arg("num_slots"),
        py::arg("num_experts"),
        "int32 entries of the workspace `permute` needs for T * K = num_slots routed slots.");
  m.def("permute", &permute, py::arg("x"), py::arg("expert_ids"), py::arg("num_experts"),
        py::arg("x_out"), py::arg("counts"), py::arg("src_index"), py::arg("workspace"),
        py::arg("stream"),
        "Stable counting sort of the T*K slots of expert_ids [T, K] (int32/int64) by expert and\n"
        "gather of x [T, row_bytes] (uint8 view) into x_out [T*K, row_bytes]; writes counts [E]\n"
        "int64 and src_index [T*K] int64. Use nmoe_kernels.permute.");
  m.def("gather_rows", &gather_rows, py::arg("x"), py::arg("index"), py::arg("out"),
        py::arg("stream"),
        "out[r] = x[index[r]] for x [T, row_bytes] and out [R, row_bytes] (uint8 views), index\n"
        "[R] int32/int64; out-of-range rows become zeros. Use nmoe_kernels.gather_rows.");
  m.def("unpermute", &unpermute, py::arg("y"), py::arg("src_index"), py::arg("gates"),
        py::arg("out"), py::arg("workspace"), py::arg("stream"),
        "out [T, D] = sum over slots k in order of gates[t, k] * y[row of slot t*K+k] in fp32\n"
        "(y [R, D] bf16/fp32, src_index [R], gates [T, K] fp32, workspace [T*K] int32). Use\n"
        "nmoe_kernels.unpermute.");
}

}  // namespace nmoe::permute
