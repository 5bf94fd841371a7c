#include "dlpack_tensor.h"

#include <Python.h>

#include <sstream>

namespace nmoe {

namespace {

constexpr const char* kCapsuleName = "dltensor";

bool decode_dtype(const DLDataType& dt, ScalarType* out) {
  if (dt.lanes != 1) return false;
  switch (dt.code) {
    case kDLUInt:
      if (dt.bits == 8) return *out = ScalarType::kUInt8, true;
      return false;
    case kDLInt:
      if (dt.bits == 32) return *out = ScalarType::kInt32, true;
      if (dt.bits == 64) return *out = ScalarType::kInt64, true;
      return false;
    case kDLFloat:
      if (dt.bits == 16) return *out = ScalarType::kFloat16, true;
      if (dt.bits == 32) return *out = ScalarType::kFloat32, true;
      return false;
    case kDLBfloat:
      if (dt.bits == 16) return *out = ScalarType::kBFloat16, true;
      return false;
    case kDLFloat8_e4m3fn:
      if (dt.bits == 8) return *out = ScalarType::kFloat8E4M3FN, true;
      return false;
    default:
      return false;
  }
}

std::string join(const std::vector<int64_t>& values) {
  std::ostringstream out;
  for (size_t i = 0; i < values.size(); ++i) out << (i ? ", " : "") << values[i];
  return out.str();
}

}  // namespace

const char* scalar_type_name(ScalarType type) {
  switch (type) {
    case ScalarType::kUInt8:
      return "uint8";
    case ScalarType::kInt32:
      return "int32";
    case ScalarType::kInt64:
      return "int64";
    case ScalarType::kFloat16:
      return "float16";
    case ScalarType::kBFloat16:
      return "bfloat16";
    case ScalarType::kFloat32:
      return "float32";
    case ScalarType::kFloat8E4M3FN:
      return "float8_e4m3fn";
  }
  return "?";
}

TensorView::TensorView(const py::object& capsule, std::string name) : name_(std::move(name)) {
  PyObject* obj = capsule.ptr();
  if (!PyCapsule_CheckExact(obj)) {
    fail("expected a DLPack capsule (torch.utils.dlpack.to_dlpack(tensor)), got a " +
         std::string(Py_TYPE(obj)->tp_name));
  }
  if (!PyCapsule_IsValid(obj, kCapsuleName)) {
    const char* got = PyCapsule_GetName(obj);
    PyErr_Clear();
    fail(std::string("expected an unconsumed \"dltensor\" capsule, got one named \"") +
         (got ? got : "") + "\" (capsules can be used once; call to_dlpack again)");
  }
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(obj, kCapsuleName));
  const DLTensor& t = managed->dl_tensor;
  if (!decode_dtype(t.dtype, &dtype_)) {
    fail("unsupported DLPack dtype (code " + std::to_string(t.dtype.code) + ", bits " +
         std::to_string(t.dtype.bits) + ", lanes " + std::to_string(t.dtype.lanes) + ")");
  }
  data_ = static_cast<char*>(t.data) + t.byte_offset;
  device_type_ = t.device.device_type;
  device_id_ = t.device.device_id;
  shape_.assign(t.shape, t.shape + t.ndim);
  strides_.resize(t.ndim);
  int64_t running = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    strides_[d] = t.strides ? t.strides[d] : running;
    running *= shape_[d];
  }
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t s : shape_) n *= s;
  return n;
}

std::string TensorView::describe() const {
  std::string device = device_type_ == kDLCUDA  ? "cuda:" + std::to_string(device_id_)
                       : device_type_ == kDLCPU ? std::string("cpu")
                                                : "device_type " + std::to_string(device_type_);
  return std::string(scalar_type_name(dtype_)) + "[" + join(shape_) + "] on " + device;
}

void TensorView::fail(const std::string& what) const { throw py::value_error(name_ + ": " + what); }

void TensorView::check_dtype(std::initializer_list<ScalarType> allowed) const {
  for (ScalarType type : allowed) {
    if (type == dtype_) return;
  }
  std::string names;
  for (ScalarType type : allowed) names += (names.empty() ? "" : " or ") + std::string(scalar_type_name(type));
  fail("expected dtype " + names + ", got " + describe());
}

void TensorView::check_cuda() const {
  if (device_type_ != kDLCUDA) fail("expected a CUDA tensor, got " + describe());
}

void TensorView::check_same_device(const TensorView& other) const {
  check_cuda();
  if (device_id_ != other.device_id_) {
    fail("expected a tensor on the same device as " + other.name_ + " (cuda:" +
         std::to_string(other.device_id_) + "), got " + describe());
  }
}

void TensorView::check_shape(std::initializer_list<int64_t> expected) const {
  std::vector<int64_t> want(expected);
  bool ok = want.size() == shape_.size();
  for (size_t i = 0; ok && i < want.size(); ++i) ok = want[i] == shape_[i];
  if (!ok) fail("expected shape [" + join(want) + "], got " + describe());
}

void TensorView::check_contiguous() const {
  if (numel() == 0) return;  // no element to address: any strides describe the same empty tensor
  int64_t running = 1;
  for (int d = ndim() - 1; d >= 0; --d) {
    if (shape_[d] != 1 && strides_[d] != running) {
      fail("expected a contiguous (row-major) tensor, got strides (" + join(strides_) + ") for " +
           describe() + "; call .contiguous() first");
    }
    running *= shape_[d];
  }
}

void TensorView::check_aligned(int64_t bytes) const {
  if (reinterpret_cast<std::uintptr_t>(data_) % static_cast<std::uintptr_t>(bytes) != 0) {
    fail("data pointer must be " + std::to_string(bytes) + "-byte aligned (got a view at an odd "
         "offset); pass a fresh tensor or .clone() it");
  }
}

}  // namespace nmoe
