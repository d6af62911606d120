// DeviceArray: the result of a CUDA op. It owns a cudaMalloc'd float32 buffer and hands it to
// PyTorch, CuPy or JAX without a copy, through __cuda_array_interface__ (v3) or DLPack.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace knnclip {

class DeviceArray {
 public:
  DeviceArray(std::vector<int64_t> shape, int device);
  float* data() const { return static_cast<float*>(buffer_.get()); }
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
};

void register_device_array(pybind11::module_& m);

}  // namespace knnclip
