// Registers the routing bindings on `_C`: permute, permute_workspace_numel, gather_rows,
// unpermute.
#pragma once

#include <pybind11/pybind11.h>

namespace nmoe::permute {

void register_apis(pybind11::module_& m);

}  // namespace nmoe::permute
