// TensorView: a borrowed, validated view of a torch tensor passed to a binding as a DLPack capsule.
//
// Bindings never link libtorch: Python passes `torch.utils.dlpack.to_dlpack(t)`, the binding wraps
// it in a TensorView, checks dtype/device/shape/strides/alignment (each failed check raises a
// Python ValueError that names the argument), and reads the raw pointer. The capsule is not
// consumed, so the torch tensor keeps ownership; the view is valid for the duration of the call.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "dlpack.h"

namespace nmoe {

namespace py = pybind11;

enum class ScalarType { kUInt8, kInt32, kInt64, kFloat16, kBFloat16, kFloat32, kFloat8E4M3FN };

const char* scalar_type_name(ScalarType type);

class TensorView {
 public:
  // `capsule` must be an unconsumed "dltensor" capsule; `name` is the argument name for errors.
  TensorView(const py::object& capsule, std::string name);

  const std::string& name() const { return name_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t size(int dim) const { return shape_.at(dim); }
  int64_t stride(int dim) const { return strides_.at(dim); }
  int64_t numel() const;
  ScalarType dtype() const { return dtype_; }
  bool is_cuda() const { return device_type_ == kDLCUDA; }
  int device_id() const { return device_id_; }
  void* data() const { return data_; }
  std::string describe() const;  // e.g. "bfloat16[7, 128] on cuda:0"

  // Each check raises ValueError naming this argument and saying what was expected.
  void check_dtype(std::initializer_list<ScalarType> allowed) const;
  void check_cuda() const;
  void check_same_device(const TensorView& other) const;
  void check_shape(std::initializer_list<int64_t> expected) const;
  void check_contiguous() const;
  void check_aligned(int64_t bytes) const;

  [[noreturn]] void fail(const std::string& what) const;

 private:
  std::string name_;
  void* data_ = nullptr;
  int32_t device_type_ = 0;
  int32_t device_id_ = 0;
  ScalarType dtype_ = ScalarType::kUInt8;
  std::vector<int64_t> shape_;
  std::vector<int64_t> strides_;
};

}  // namespace nmoe
