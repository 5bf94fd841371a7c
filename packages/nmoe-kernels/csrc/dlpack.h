// Minimal DLPack v0.8 ABI: the structs a legacy "dltensor" capsule points to.
//
// Written from the public DLPack specification (https://dmlc.github.io/dlpack/latest/c_api.html);
// only the fields nmoe-kernels reads are named. Layouts must not change: they are the ABI that
// torch.utils.dlpack.to_dlpack() produces.
#pragma once

#include <cstdint>

extern "C" {

enum DLDeviceType : int32_t {
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3,
  kDLCUDAManaged = 13,
};

struct DLDevice {
  int32_t device_type;  // a DLDeviceType value
  int32_t device_id;
};

enum DLDataTypeCode : uint8_t {
  kDLInt = 0,
  kDLUInt = 1,
  kDLFloat = 2,
  kDLOpaqueHandle = 3,
  kDLBfloat = 4,
  kDLComplex = 5,
  kDLBool = 6,
  // DLPack 1.1 adds FP8 codes; torch >= 2.9 emits this one for torch.float8_e4m3fn.
  kDLFloat8_e4m3fn = 10,
};

struct DLDataType {
  uint8_t code;  // a DLDataTypeCode value
  uint8_t bits;
  uint16_t lanes;
};

struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; NULL means compact row-major
  uint64_t byte_offset;
};

struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

}  // extern "C"
