#include "device_array.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "cuda/ops_cuda.h"
#include "dlpack.h"

namespace py = pybind11;

namespace knnclip {
namespace {

// What a DLManagedTensor we export keeps alive: the buffer and the shape array.
struct ExportContext {
  std::shared_ptr<void> buffer;
  std::vector<int64_t> shape;
  DLManagedTensor managed{};
};

size_t element_size(Element e) {
  switch (e) {
    case Element::F32: return 4;
    case Element::I32: return 4;
    case Element::Bool: return 1;
    case Element::I64: return 8;
  }
  return 1;
}

const char* typestr(Element e) {
  switch (e) {
    case Element::F32: return "<f4";
    case Element::I32: return "<i4";
    case Element::Bool: return "|b1";
    case Element::I64: return "<i8";
  }
  return "";
}

const char* dtype_str(Element e) {
  switch (e) {
    case Element::F32: return "float32";
    case Element::I32: return "int32";
    case Element::Bool: return "bool";
    case Element::I64: return "int64";
  }
  return "";
}

DLDataType dl_type(Element e) {
  switch (e) {
    case Element::F32: return DLDataType{kDLFloat, 32, 1};
    case Element::I32: return DLDataType{kDLInt, 32, 1};
    case Element::Bool: return DLDataType{kDLBool, 8, 1};
    case Element::I64: return DLDataType{kDLInt, 64, 1};
  }
  return DLDataType{kDLFloat, 32, 1};
}

void delete_export(DLManagedTensor* self) { delete static_cast<ExportContext*>(self->manager_ctx); }

void capsule_destructor(PyObject* capsule) {
  // A consumer that took the tensor renames the capsule to "used_dltensor" and owns it.
  if (PyCapsule_IsValid(capsule, "dltensor")) {
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    if (managed != nullptr && managed->deleter != nullptr) managed->deleter(managed);
  }
}

}  // namespace

DeviceArray::DeviceArray(std::vector<int64_t> shape, int device, Element element)
    : shape_(std::move(shape)), device_(device), element_(element) {
  int64_t n = size();
  void* p = cuda::device_malloc(static_cast<size_t>(n) * element_size(element), device);
  buffer_ = std::shared_ptr<void>(p, [device](void* q) { cuda::device_free(q, device); });
}

int64_t DeviceArray::size() const {
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return n;
}

py::dict DeviceArray::cuda_array_interface() const {
  py::dict d;
  d["shape"] = py::tuple(py::cast(shape_));
  d["typestr"] = typestr(element_);
  d["data"] = py::make_tuple(reinterpret_cast<uintptr_t>(buffer_.get()), false);
  d["strides"] = py::none();
  d["version"] = 3;
  d["stream"] = py::none();  // the op waited for its work: the data is ready on every stream
  return d;
}

py::capsule DeviceArray::dlpack() const {
  auto* ctx = new ExportContext{buffer_, shape_, {}};
  DLTensor& t = ctx->managed.dl_tensor;
  t.data = buffer_.get();
  t.device = DLDevice{kDLCUDA, device_};
  t.ndim = static_cast<int32_t>(ctx->shape.size());
  t.dtype = dl_type(element_);
  t.shape = ctx->shape.data();
  t.strides = nullptr;
  t.byte_offset = 0;
  ctx->managed.manager_ctx = ctx;
  ctx->managed.deleter = delete_export;
  return py::capsule(&ctx->managed, "dltensor", capsule_destructor);
}

py::object DeviceArray::to_numpy() const {
  py::array host(py::dtype(dtype_str(element_)), shape_);
  {
    py::gil_scoped_release release;
    cuda::copy_to_host(host.mutable_data(), buffer_.get(), static_cast<size_t>(size()) * element_size(element_),
                       device_);
  }
  return std::move(host);
}

void register_device_array(py::module_& m) {
  py::class_<DeviceArray>(m, "DeviceArray",
                          "Result of a CUDA op (float32, int32, bool or int64), owning device memory; consume it with "
                          "torch.as_tensor, cupy.asarray or any DLPack importer (no copy).")
      .def_property_readonly("shape", [](const DeviceArray& a) { return py::tuple(py::cast(a.shape())); })
      .def_property_readonly("dtype", [](const DeviceArray& a) { return dtype_str(a.element()); })
      .def_property_readonly("device", &DeviceArray::device)
      .def_property_readonly("__cuda_array_interface__", &DeviceArray::cuda_array_interface)
      .def(
          "__dlpack__",
          [](const DeviceArray& a, py::object stream, py::kwargs) {
            // The op that made this array waited for its work, so it is ready on any consumer
            // stream (DLPack's `stream`: None, -1, 1, 2 or a stream handle); only the type is checked.
            if (!stream.is_none() && !py::isinstance<py::int_>(stream))
              throw py::type_error("__dlpack__: stream must be an int or None");
            return a.dlpack();
          },
          py::arg("stream") = py::none())
      .def("__dlpack_device__", [](const DeviceArray& a) { return py::make_tuple(static_cast<int>(kDLCUDA), a.device()); })
      .def("numpy", &DeviceArray::to_numpy, "Copy to a host NumPy array.")
      .def("__repr__", [](const DeviceArray& a) {
        std::string s = "DeviceArray(shape=(";
        for (size_t i = 0; i < a.shape().size(); ++i) s += (i ? ", " : "") + std::to_string(a.shape()[i]);
        return s + "), dtype=" + dtype_str(a.element()) + ", device=cuda:" + std::to_string(a.device()) + ")";
      });
}

}  // namespace knnclip
