// Python bindings for the quantization ops: argument checks at the boundary, then the launchers.
#include "quant_api.h"

#include <cstdint>
#include <string>

#include "../build_info.h"
#include "../dlpack_tensor.h"
#include "fp8_quant_128x128.h"
#include "fp8_quant_1x128.h"
#include "swiglu_backward_gated.h"
#include "swiglu_quant_fp8_1x128.h"

namespace nmoe::quant {
namespace {

constexpr int64_t kBlockK = 128;
constexpr int64_t kTmaAlignFloats = 4;  // TMA needs 16-byte aligned global strides

int64_t num_col_blocks(const TensorView& x) {
  if (x.size(1) % kBlockK != 0) {
    x.fail("the last dim K=" + std::to_string(x.size(1)) + " must be a multiple of 128 (" +
           x.describe() + "); pad K or use nmoe_kernels.reference");
  }
  return x.size(1) / kBlockK;
}

void check_fp8(const TensorView& t) {
  t.check_dtype({ScalarType::kFloat8E4M3FN, ScalarType::kUInt8});
}

// The outputs of an op that writes FP8 [num_rows, num_cols] with one fp32 scale per 1x128 block:
// checks both against `like` and returns the scales' leading dimension (rows, or rows rounded up
// to the TMA alignment for the MN-major layout).
int64_t check_fp8_1x128_outputs(const TensorView& out_fp8, const TensorView& scales,
                                const TensorView& like, int64_t num_rows, int64_t num_cols,
                                bool scales_mn_major) {
  check_fp8(out_fp8);
  out_fp8.check_same_device(like);
  out_fp8.check_shape({num_rows, num_cols});
  out_fp8.check_contiguous();
  out_fp8.check_aligned(16);

  const int64_t num_blocks = num_cols / kBlockK;
  scales.check_dtype({ScalarType::kFloat32});
  scales.check_same_device(like);
  const int64_t scales_ld = (num_rows + kTmaAlignFloats - 1) / kTmaAlignFloats * kTmaAlignFloats;
  if (scales_mn_major) {
    scales.check_shape({num_blocks, scales_ld});
  } else {
    scales.check_shape({num_rows, num_blocks});
  }
  scales.check_contiguous();
  scales.check_aligned(4);
  return scales_ld;
}

void quantize_fp8_1x128(const py::object& x_capsule, const py::object& x_fp8_capsule,
                        const py::object& scales_capsule, bool ue8m0, bool scales_mn_major,
                        std::uintptr_t stream) {
  require_cuda_build("quantize_fp8_1x128");
  const TensorView x(x_capsule, "x");
  const TensorView x_fp8(x_fp8_capsule, "x_fp8");
  const TensorView scales(scales_capsule, "scales");

  x.check_dtype({ScalarType::kBFloat16, ScalarType::kFloat32});
  x.check_cuda();
  if (x.ndim() != 2) x.fail("expected a 2-D tensor [M, K], got " + x.describe());
  x.check_contiguous();
  x.check_aligned(16);
  const int64_t num_rows = x.size(0);
  num_col_blocks(x);  // K % 128 == 0, with a clear error
  const int64_t scales_ld =
      check_fp8_1x128_outputs(x_fp8, scales, x, num_rows, x.size(1), scales_mn_major);

#if NMOE_WITH_CUDA
  launch_fp8_quant_1x128(x.data(), x.dtype() == ScalarType::kBFloat16, x_fp8.data(),
                         static_cast<float*>(scales.data()), num_rows, x.size(1), scales_mn_major,
                         scales_ld, ue8m0, x.device_id(), stream);
#else
  (void)ue8m0;
  (void)stream;
#endif
}

void dequantize_fp8_1x128(const py::object& x_fp8_capsule, const py::object& scales_capsule,
                          const py::object& out_capsule, std::uintptr_t stream) {
  require_cuda_build("dequantize_fp8_1x128");
  const TensorView x_fp8(x_fp8_capsule, "x_fp8");
  const TensorView scales(scales_capsule, "scales");
  const TensorView out(out_capsule, "out");

  check_fp8(x_fp8);
  x_fp8.check_cuda();
  if (x_fp8.ndim() != 2) x_fp8.fail("expected a 2-D tensor [M, K], got " + x_fp8.describe());
  x_fp8.check_contiguous();
  x_fp8.check_aligned(16);
  const int64_t num_rows = x_fp8.size(0);
  const int64_t num_blocks = num_col_blocks(x_fp8);

  scales.check_dtype({ScalarType::kFloat32});
  scales.check_same_device(x_fp8);
  scales.check_shape({num_rows, num_blocks});
  // Strides of size-1 dims are never used (their index is always 0), so they are not checked.
  const bool row_major = (num_blocks <= 1 || scales.stride(1) == 1) &&
                         (num_rows <= 1 || scales.stride(0) == num_blocks);
  const bool mn_major = (num_rows <= 1 || scales.stride(0) == 1) &&
                        (num_blocks <= 1 || scales.stride(1) >= num_rows);
  if (!row_major && !mn_major) {
    scales.fail("expected row-major strides (" + std::to_string(num_blocks) +
                ", 1) or MN-major strides (1, ld >= M), got (" + std::to_string(scales.stride(0)) +
                ", " + std::to_string(scales.stride(1)) + ")");
  }
  scales.check_aligned(4);

  out.check_dtype({ScalarType::kBFloat16, ScalarType::kFloat32});
  out.check_same_device(x_fp8);
  out.check_shape({num_rows, x_fp8.size(1)});
  out.check_contiguous();
  out.check_aligned(16);

#if NMOE_WITH_CUDA
  launch_fp8_dequant_1x128(x_fp8.data(), static_cast<const float*>(scales.data()),
                           scales.stride(0), scales.stride(1), out.data(),
                           out.dtype() == ScalarType::kBFloat16, num_rows, x_fp8.size(1),
                           x_fp8.device_id(), stream);
#else
  (void)stream;
#endif
}

void quantize_fp8_128x128(const py::object& w_capsule, const py::object& w_fp8_capsule,
                          const py::object& scales_capsule, bool ue8m0, bool transpose,
                          std::uintptr_t stream) {
  require_cuda_build("quantize_fp8_128x128");
  const TensorView w(w_capsule, "w");
  const TensorView w_fp8(w_fp8_capsule, "w_fp8");
  const TensorView scales(scales_capsule, "scales");

  w.check_dtype({ScalarType::kBFloat16, ScalarType::kFloat32});
  w.check_cuda();
  if (w.ndim() != 3) {
    w.fail(std::string("expected a 3-D tensor ") + (transpose ? "[E, K, N]" : "[E, N, K]") +
           ", got " + w.describe());
  }
  w.check_contiguous();
  w.check_aligned(16);
  const int64_t num_mats = w.size(0);
  const int64_t n = transpose ? w.size(2) : w.size(1);
  const int64_t k = transpose ? w.size(1) : w.size(2);
  if (k % kBlockK != 0) {
    w.fail("K=" + std::to_string(k) + " (dim " + (transpose ? "1" : "2") + " of " +
           w.describe() + ") must be a multiple of 128; pad K");
  }
  if (transpose && n % 8 != 0) {
    w.fail("with transpose, N=" + std::to_string(n) + " (dim 2 of " + w.describe() +
           ") must be a multiple of 8 (16-byte rows); pad N or transpose with torch first");
  }
  const int64_t n_blocks = (n + kBlockK - 1) / kBlockK;
  if (num_mats > kMaxGridYZ || (transpose ? k / kBlockK : n_blocks) > kMaxGridYZ) {
    w.fail("too large for one launch (E and the row blocks of the source must be <= 65535): " +
           w.describe());
  }

  check_fp8(w_fp8);
  w_fp8.check_same_device(w);
  w_fp8.check_shape({num_mats, n, k});
  w_fp8.check_contiguous();
  w_fp8.check_aligned(16);

  scales.check_dtype({ScalarType::kFloat32});
  scales.check_same_device(w);
  scales.check_shape({num_mats, n_blocks, k / kBlockK});
  scales.check_contiguous();
  scales.check_aligned(4);

#if NMOE_WITH_CUDA
  launch_fp8_quant_128x128(w.data(), w.dtype() == ScalarType::kBFloat16, w_fp8.data(),
                           static_cast<float*>(scales.data()), num_mats, w.size(1), w.size(2),
                           transpose, ue8m0, w.device_id(), stream);
#else
  (void)ue8m0;
  (void)stream;
#endif
}

// h [rows, 2F] with interleaved (gate, up) columns, as the SwiGLU ops read it: one of `dtypes`,
// CUDA, 2-D (`shape` names the dims in errors), 2F % 256 == 0 (whole 1x128 blocks of F),
// contiguous, 16-byte aligned.
void check_interleaved_h(const TensorView& h, std::initializer_list<ScalarType> dtypes,
                         const char* shape) {
  h.check_dtype(dtypes);
  h.check_cuda();
  if (h.ndim() != 2) {
    h.fail(std::string("expected a 2-D tensor ") + shape + ", got " + h.describe());
  }
  if (h.size(1) % (2 * kBlockK) != 0) {
    h.fail("the last dim 2F=" + std::to_string(h.size(1)) + " must be a multiple of 256 (F % 128 "
           "== 0), got " + h.describe() + "; pad F");
  }
  h.check_contiguous();
  h.check_aligned(16);
}

void swiglu_quantize_fp8_1x128(const py::object& h_capsule, const py::object& y_fp8_capsule,
                               const py::object& scales_capsule, bool ue8m0, bool scales_mn_major,
                               std::uintptr_t stream) {
  require_cuda_build("swiglu_quantize_fp8_1x128");
  const TensorView h(h_capsule, "h");
  const TensorView y_fp8(y_fp8_capsule, "y_fp8");
  const TensorView scales(scales_capsule, "scales");

  check_interleaved_h(h, {ScalarType::kBFloat16, ScalarType::kFloat32}, "[M, 2F]");
  const int64_t num_rows = h.size(0);
  const int64_t num_features = h.size(1) / 2;

  const int64_t scales_ld =
      check_fp8_1x128_outputs(y_fp8, scales, h, num_rows, num_features, scales_mn_major);

#if NMOE_WITH_CUDA
  launch_swiglu_quant_fp8_1x128(h.data(), h.dtype() == ScalarType::kBFloat16, y_fp8.data(),
                                static_cast<float*>(scales.data()), num_rows, num_features,
                                scales_mn_major, scales_ld, ue8m0, h.device_id(), stream);
#else
  (void)ue8m0;
  (void)stream;
#endif
}

// A bf16 [num_rows, cols] contiguous, 16-byte aligned tensor on `like`'s device.
void check_bf16_matrix(const TensorView& t, const TensorView& like, int64_t num_rows,
                       int64_t cols) {
  t.check_dtype({ScalarType::kBFloat16});
  t.check_same_device(like);
  t.check_shape({num_rows, cols});
  t.check_contiguous();
  t.check_aligned(16);
}

void swiglu_backward_gated(const py::object& h_capsule, const py::object& da_capsule,
                           const py::object& gates_capsule, const py::object& dh_capsule,
                           const py::object& ag_capsule, const py::object& dgate_capsule,
                           const py::object& dh_fp8_capsule, const py::object& dh_scales_capsule,
                           bool ue8m0, bool scales_mn_major, std::uintptr_t stream) {
  require_cuda_build("swiglu_backward_gated");
  const TensorView h(h_capsule, "h");
  const TensorView da(da_capsule, "da");
  const TensorView gates(gates_capsule, "gates");
  const TensorView dh(dh_capsule, "dh");
  const TensorView ag(ag_capsule, "ag");
  const TensorView dgate(dgate_capsule, "dgate");

  check_interleaved_h(h, {ScalarType::kBFloat16}, "[R, 2F]");
  const int64_t num_rows = h.size(0);
  const int64_t num_features = h.size(1) / 2;
  check_bf16_matrix(da, h, num_rows, num_features);
  gates.check_dtype({ScalarType::kFloat32});
  gates.check_same_device(h);
  gates.check_shape({num_rows});
  gates.check_contiguous();
  check_bf16_matrix(dh, h, num_rows, 2 * num_features);
  check_bf16_matrix(ag, h, num_rows, num_features);
  dgate.check_dtype({ScalarType::kFloat32});
  dgate.check_same_device(h);
  dgate.check_shape({num_rows});
  dgate.check_contiguous();

  const bool quantize = !dh_fp8_capsule.is_none();
  if (quantize == dh_scales_capsule.is_none()) {
    throw py::value_error(
        "swiglu_backward_gated: pass both dh_fp8 and dh_scales (to quantize dh) or neither");
  }
  void* dh_fp8_data = nullptr;
  float* dh_scales_data = nullptr;
  int64_t scales_ld = 0;
  if (quantize) {
    const TensorView dh_fp8(dh_fp8_capsule, "dh_fp8");
    const TensorView dh_scales(dh_scales_capsule, "dh_scales");
    scales_ld = check_fp8_1x128_outputs(dh_fp8, dh_scales, h, num_rows, 2 * num_features,
                                        scales_mn_major);
    dh_fp8_data = dh_fp8.data();
    dh_scales_data = static_cast<float*>(dh_scales.data());
  }

#if NMOE_WITH_CUDA
  launch_swiglu_backward_gated(h.data(), da.data(), static_cast<const float*>(gates.data()),
                               dh.data(), ag.data(), static_cast<float*>(dgate.data()),
                               dh_fp8_data, dh_scales_data, num_rows, num_features,
                               scales_mn_major, scales_ld, ue8m0, h.device_id(), stream);
#else
  (void)dh_fp8_data;
  (void)dh_scales_data;
  (void)scales_ld;
  (void)ue8m0;
  (void)stream;
#endif
}

}  // namespace

void register_apis(py::module_& m) {
  m.def("quantize_fp8_1x128", &quantize_fp8_1x128, py::arg("x"), py::arg("x_fp8"),
        py::arg("scales"), py::arg("ue8m0"), py::arg("scales_mn_major"), py::arg("stream"),
        "Quantize x [M, K] (bf16/fp32) to E4M3 x_fp8 [M, K] and fp32 scales per 1x128 block.\n"
        "All tensors are DLPack capsules; outputs are written in place on `stream`. scales is\n"
        "[M, K/128] row-major, or [K/128, align(M, 4)] when scales_mn_major. Use\n"
        "nmoe_kernels.quantize_fp8_1x128, which checks arguments and allocates outputs.");
  m.def("dequantize_fp8_1x128", &dequantize_fp8_1x128, py::arg("x_fp8"), py::arg("scales"),
        py::arg("out"), py::arg("stream"),
        "out [M, K] (bf16/fp32) = x_fp8 [M, K] * scales [M, K/128] (row-major or MN-major\n"
        "strides). Use nmoe_kernels.dequantize_fp8_1x128.");
  m.def("quantize_fp8_128x128", &quantize_fp8_128x128, py::arg("w"), py::arg("w_fp8"),
        py::arg("scales"), py::arg("ue8m0"), py::arg("transpose"), py::arg("stream"),
        "Quantize weights w [E, N, K] (or [E, K, N] with transpose) bf16/fp32 to E4M3 w_fp8\n"
        "[E, N, K] and fp32 scales [E, ceil(N/128), K/128], one per 128x128 block. Outputs are\n"
        "written in place on `stream`. Use nmoe_kernels.quantize_fp8_128x128.");
  m.def("swiglu_quantize_fp8_1x128", &swiglu_quantize_fp8_1x128, py::arg("h"), py::arg("y_fp8"),
        py::arg("scales"), py::arg("ue8m0"), py::arg("scales_mn_major"), py::arg("stream"),
        "y = silu(h[:, 0::2]) * h[:, 1::2] of h [M, 2F] (bf16/fp32) quantized to E4M3 y_fp8\n"
        "[M, F] with fp32 scales per 1x128 block ([M, F/128] row-major, or [F/128, align(M, 4)]\n"
        "when scales_mn_major). Use nmoe_kernels.swiglu_quantize_fp8_1x128.");
  m.def("swiglu_backward_gated", &swiglu_backward_gated, py::arg("h"), py::arg("da"),
        py::arg("gates"), py::arg("dh"), py::arg("ag"), py::arg("dgate"), py::arg("dh_fp8"),
        py::arg("dh_scales"), py::arg("ue8m0"), py::arg("scales_mn_major"), py::arg("stream"),
        "Gated SwiGLU backward: from h [R, 2F] (bf16, interleaved gate/up), da [R, F] (bf16) and\n"
        "gates [R] (fp32) write dh [R, 2F] bf16, ag = gates * swiglu(h) [R, F] bf16 and dgate\n"
        "[R] fp32; with dh_fp8 / dh_scales (else None) also the E4M3 1x128 quantization of dh.\n"
        "Use nmoe_kernels.swiglu_backward_gated.");
}

}  // namespace nmoe::quant
