// Registers the quantization bindings on `_C`: quantize_fp8_1x128, dequantize_fp8_1x128,
// quantize_fp8_128x128, swiglu_quantize_fp8_1x128, swiglu_backward_gated.
#pragma once

#include <pybind11/pybind11.h>

namespace nmoe::quant {

void register_apis(pybind11::module_& m);

}  // namespace nmoe::quant
