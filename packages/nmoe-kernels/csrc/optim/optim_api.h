// Registers the optimizer bindings on `_C`: adamw_step.
#pragma once

#include <pybind11/pybind11.h>

namespace nmoe::optim {

void register_apis(pybind11::module_& m);

}  // namespace nmoe::optim
