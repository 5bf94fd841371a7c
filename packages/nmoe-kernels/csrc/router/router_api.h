// Registers the router bindings on `_C`: router_topk.
#pragma once

#include <pybind11/pybind11.h>

namespace nmoe::router {

void register_apis(pybind11::module_& m);

}  // namespace nmoe::router
