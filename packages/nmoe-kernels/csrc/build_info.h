// What this build of nmoe_kernels._C contains, and the error every CUDA op raises without nvcc.
#pragma once

#include <stdexcept>
#include <string>

#ifndef NMOE_WITH_CUDA
#define NMOE_WITH_CUDA 0
#endif
#ifndef NMOE_CUDA_ARCHS
#define NMOE_CUDA_ARCHS ""
#endif

namespace nmoe {

// Raise RuntimeError from a CUDA op when the module was built without a CUDA compiler.
inline void require_cuda_build(const char* op) {
#if !NMOE_WITH_CUDA
  throw std::runtime_error(
      std::string(op) +
      ": nmoe_kernels._C was built without nvcc (NMOE_WITH_CUDA=0), so it has no CUDA ops. "
      "Install the CUDA toolkit >= 12.8 so that `nvcc` is on PATH, then rebuild with "
      "`pip install --no-build-isolation -e packages/nmoe-kernels`. On CPU, use "
      "nmoe_kernels.reference instead.");
#else
  (void)op;
#endif
}

}  // namespace nmoe
