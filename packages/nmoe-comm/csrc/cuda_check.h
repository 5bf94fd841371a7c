// Error handling for CUDA runtime calls in host code (.cu launchers).
//
// NMOE_CUDA_CHECK(expr, op) turns a failed CUDA call into std::runtime_error, which pybind11
// raises in Python as RuntimeError("<op>: CUDA error <name>: <string> (at <expr>)").
// NMOE_CUDA_CHECK_LAUNCH(op) checks the last error right after a kernel launch.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace nmoe {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* op, const char* where) {
  throw std::runtime_error(std::string(op) + ": CUDA error " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err) + " (at " + where + ")");
}

// Makes `device` current for the scope of a launch and restores the previous device. Needed
// because this module links its own static CUDA runtime, whose current device is independent of
// torch's.
class CudaDeviceGuard {
 public:
  CudaDeviceGuard(int device, const char* op) {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
      cudaGetLastError();
      throw std::runtime_error(std::string(op) + ": no CUDA GPU is visible to nmoe_comm._C (" +
                               (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices") +
                               "); use the nccl backend over gloo on CPU");
    }
    if (device < 0 || device >= count) {
      throw std::runtime_error(std::string(op) + ": tensors are on cuda:" + std::to_string(device) +
                               " but only " + std::to_string(count) + " CUDA devices are visible");
    }
    err = cudaGetDevice(&previous_);
    if (err != cudaSuccess) throw_cuda_error(err, op, "cudaGetDevice");
    if (previous_ != device) {
      err = cudaSetDevice(device);
      if (err != cudaSuccess) throw_cuda_error(err, op, "cudaSetDevice");
    }
    device_ = device;
  }
  ~CudaDeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = 0;
  int device_ = 0;
};

}  // namespace nmoe

#define NMOE_CUDA_CHECK(expr, op)                                           \
  do {                                                                      \
    const cudaError_t nmoe_cuda_err_ = (expr);                              \
    if (nmoe_cuda_err_ != cudaSuccess) {                                    \
      ::nmoe::throw_cuda_error(nmoe_cuda_err_, (op), #expr);                \
    }                                                                       \
  } while (0)

#define NMOE_CUDA_CHECK_LAUNCH(op) NMOE_CUDA_CHECK(cudaGetLastError(), (op))
