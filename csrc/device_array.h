// DeviceArray: the result of a CUDA op. It owns device memory (float32 scores, int32 labels,
// bool flags or int64 counts) and hands it to PyTorch, CuPy or JAX without a copy, through
// __cuda_array_interface__ (v3) or DLPack.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "common.h"

namespace knnclip {

class DeviceArray {
 public:
  DeviceArray(std::vector<int64_t> shape, int device, Element element = Element::F32);
  float* data() const { return static_cast<float*>(buffer_.get()); }
  void* raw() const { return buffer_.get(); }
  Element element() const { return element_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int device() const { return device_; }
  int64_t size() const;

  pybind11::dict cuda_array_interface() const;
  pybind11::capsule dlpack() const;
  pybind11::object to_numpy() const;

 private:
  std::shared_ptr<void> buffer_;  // shared with DLPack consumers that outlive this object
  std::vector<int64_t> shape_;
  int device_;
  Element element_;
};

void register_device_array(pybind11::module_& m);

}  // namespace knnclip
