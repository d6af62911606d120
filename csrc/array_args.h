// Reading op arguments from Python: NumPy arrays, objects exposing __cuda_array_interface__, and
// DLPack producers, each checked for dtype, contiguity and device, plus the helpers every op
// shares (shape checks, one device for all arguments, error flags, outputs, running a kernel on
// the host or the device without the GIL). Errors are TypeError / ValueError naming the op, the
// argument and the fix.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "dlpack.h"

namespace knnclip::args {

namespace py = pybind11;

std::string shape_str(const std::vector<int64_t>& shape);
[[noreturn]] void fail_type(const std::string& op, const std::string& msg);
[[noreturn]] void fail_value(const std::string& op, const std::string& msg);

// A validated, C-contiguous view of an argument, on the host or on a CUDA device.
struct Tensor {
  const void* data = nullptr;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  bool on_device = false;
  int device = -1;                         // CUDA device, -1 on the host (or empty device array)
  py::object keepalive;                    // the host array we read from
  std::shared_ptr<DLManagedTensor> dlpack; // a consumed DLPack tensor, released after the op

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  int64_t dim(size_t i) const { return shape[i]; }
};

enum Allowed { kFloat, kInt64 };

// How an argument is read: NumPy; __cuda_array_interface__ (when it names the producer's stream,
// or DLPack is not offered); DLPack (with stream= the ops' stream; host producers via NumPy).
enum class Protocol { kNumpy, kCudaArrayInterface, kDlpack, kNone };
Protocol protocol_of(py::handle obj);
const char* protocol_name(Protocol p);

// Reads an argument: CUDA arrays first (by protocol), then NumPy (or any host DLPack producer).
Tensor parse(py::handle obj, const std::string& op, const char* name, Allowed allowed);

void expect_ndim(const std::string& op, const char* name, const Tensor& t, std::initializer_list<size_t> ndims,
                 const char* layout);

// All arguments on the host, or all on one CUDA device; returns that device (-1 = host).
int common_device(const std::string& op, std::initializer_list<const Tensor*> tensors);

void require_finite_scalar(const std::string& op, const char* name, double v);
void raise_flags(const std::string& op, uint32_t flags, const char* what);
void check_host_finite(const std::string& op, const char* name, const Tensor& t);

// A result: a NumPy array on the host or a DeviceArray on `device` (float32 unless `element`).
struct Output {
  py::object object;
  float* data;  // where the element type is float32
  void* raw;
};
Output make_output(const std::vector<int64_t>& shape, int device, Element element = Element::F32);

// Runs an op's kernel without the GIL: `on_device` when the arguments live on CUDA device
// `device` (>= 0), `on_host` otherwise; each returns the kernel's error flags, which become the
// op's exception naming `checked`.
template <class OnDevice, class OnHost>
void run_kernel(const std::string& op, int device, const char* checked, OnDevice&& on_device, OnHost&& on_host) {
  uint32_t flags = 0;
  {
    py::gil_scoped_release release;
    flags = device >= 0 ? on_device() : on_host();
  }
  raise_flags(op, flags, checked);
}

}  // namespace knnclip::args

// The device half of run_kernel: a CUDA kernel call where the kernels are compiled in. Without
// them no argument can be on a device (parse refuses CUDA arrays), so it is never called.
#ifdef KNNCLIP_WITH_CUDA
#define KNNCLIP_CUDA_KERNEL(...) [&]() -> uint32_t { return __VA_ARGS__; }
#else
#define KNNCLIP_CUDA_KERNEL(...) []() -> uint32_t { return 0; }
#endif
