// Registers the quantization bindings (quantize_fp8_1x128, dequantize_fp8_1x128) on `_C`.
#pragma once

#include <pybind11/pybind11.h>

namespace nmoe::quant {

void register_apis(pybind11::module_& m);

}  // namespace nmoe::quant
