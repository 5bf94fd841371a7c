// Registers the loss bindings on `_C`: cross_entropy_rows.
#pragma once

#include <pybind11/pybind11.h>

namespace nmoe::loss {

void register_apis(pybind11::module_& m);

}  // namespace nmoe::loss
