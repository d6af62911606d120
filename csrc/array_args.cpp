// See array_args.h.
#include "array_args.h"

#include <pybind11/stl.h>

#include <cmath>
#include <sstream>

#ifdef KNNCLIP_WITH_CUDA
#include "cuda/ops_cuda.h"
#include "device_array.h"
#endif
#include "cpu/ops_cpu.h"

namespace knnclip::args {

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << (shape.size() == 1 ? ",)" : ")");
  return s.str();
}

[[noreturn]] void fail_type(const std::string& op, const std::string& msg) {
  throw py::type_error(op + ": " + msg);
}
[[noreturn]] void fail_value(const std::string& op, const std::string& msg) {
  throw py::value_error(op + ": " + msg);
}



namespace {

std::string allowed_str(Allowed allowed) {
  return allowed == kFloat ? "float32 or float16" : "int64";
}

bool dtype_allowed(DType d, Allowed allowed) {
  return allowed == kFloat ? (d == DType::F32 || d == DType::F16) : d == DType::I64;
}

bool contiguous(const std::vector<int64_t>& shape, const std::vector<int64_t>& strides_elems) {
  int64_t expected = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    if (shape[i] != 1 && strides_elems[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

Tensor from_numpy(py::handle obj, const std::string& op, const char* name, Allowed allowed) {
  py::array arr = py::reinterpret_borrow<py::array>(obj);
  const py::dtype dt = arr.dtype();
  Tensor t;
  if (dt.equal(py::dtype::of<float>())) t.dtype = DType::F32;
  else if (dt.equal(py::dtype("float16"))) t.dtype = DType::F16;
  else if (dt.equal(py::dtype::of<int64_t>())) t.dtype = DType::I64;
  else {
    fail_type(op, std::string(name) + " has dtype " + py::str(dt).cast<std::string>() +
                      "; expected " + allowed_str(allowed) + " (convert with .astype(...))");
  }
  if (!dtype_allowed(t.dtype, allowed))
    fail_type(op, std::string(name) + " has dtype " + knnclip::dtype_name(t.dtype) + "; expected " +
                      allowed_str(allowed) + " (convert with .astype(...))");
  py::array c = py::array::ensure(arr, py::array::c_style);
  if (!c) throw py::error_already_set();
  t.data = c.data();
  for (py::ssize_t i = 0; i < c.ndim(); ++i) t.shape.push_back(c.shape(i));
  t.keepalive = c;
  return t;
}

DType dtype_from_typestr(const std::string& typestr, const std::string& op, const char* name,
                         Allowed allowed) {
  DType d;
  if (typestr == "<f4") d = DType::F32;
  else if (typestr == "<f2") d = DType::F16;
  else if (typestr == "<i8") d = DType::I64;
  else fail_type(op, std::string(name) + " has typestr '" + typestr + "'; expected " + allowed_str(allowed));
  if (!dtype_allowed(d, allowed))
    fail_type(op, std::string(name) + " has dtype " + knnclip::dtype_name(d) + "; expected " + allowed_str(allowed));
  return d;
}

DType dtype_from_dlpack(const DLDataType& dt, const std::string& op, const char* name, Allowed allowed) {
  DType d;
  if (dt.lanes == 1 && dt.code == kDLFloat && dt.bits == 32) d = DType::F32;
  else if (dt.lanes == 1 && dt.code == kDLFloat && dt.bits == 16) d = DType::F16;
  else if (dt.lanes == 1 && dt.code == kDLInt && dt.bits == 64) d = DType::I64;
  else fail_type(op, std::string(name) + " has an unsupported DLPack dtype (code " + std::to_string(dt.code) +
                         ", " + std::to_string(dt.bits) + " bits); expected " + allowed_str(allowed));
  if (!dtype_allowed(d, allowed))
    fail_type(op, std::string(name) + " has dtype " + knnclip::dtype_name(d) + "; expected " + allowed_str(allowed));
  return d;
}

[[noreturn]] void no_cuda(const std::string& op, const char* name) {
  fail_type(op, std::string(name) + " is a CUDA array, but knnclip._C was built without CUDA kernels "
                "(build_info()['cuda'] is False); pass NumPy arrays, or reinstall on a machine with nvcc");
}

Tensor from_cuda_array_interface(py::handle obj, const std::string& op, const char* name, Allowed allowed) {
#ifndef KNNCLIP_WITH_CUDA
  (void)obj;
  (void)allowed;
  no_cuda(op, name);
#else
  py::dict cai = obj.attr("__cuda_array_interface__").cast<py::dict>();
  Tensor t;
  t.on_device = true;
  t.dtype = dtype_from_typestr(cai["typestr"].cast<std::string>(), op, name, allowed);
  for (py::handle d : cai["shape"].cast<py::tuple>()) t.shape.push_back(d.cast<int64_t>());
  if (cai.contains("mask") && !cai["mask"].is_none())
    fail_value(op, std::string(name) + " is a masked CUDA array; masked arrays are not supported");
  if (cai.contains("strides") && !cai["strides"].is_none()) {
    const int64_t item = t.dtype == DType::F16 ? 2 : (t.dtype == DType::F32 ? 4 : 8);
    std::vector<int64_t> strides;
    for (py::handle s : cai["strides"].cast<py::tuple>()) {
      const int64_t bytes = s.cast<int64_t>();
      strides.push_back(bytes % item == 0 ? bytes / item : -1);
    }
    if (!contiguous(t.shape, strides))
      fail_value(op, std::string(name) + " is a non-contiguous CUDA array; make it contiguous first "
                     "(.contiguous() in PyTorch, cupy.ascontiguousarray in CuPy)");
  }
  const uintptr_t ptr = cai["data"].cast<py::tuple>()[0].cast<uintptr_t>();
  t.data = reinterpret_cast<const void*>(ptr);
  t.keepalive = py::reinterpret_borrow<py::object>(obj);
  if (ptr != 0) {
    t.device = knnclip::cuda::pointer_device(t.data);
    if (t.device < 0)
      fail_value(op, std::string(name) + " claims __cuda_array_interface__ but its pointer is not CUDA device memory");
    // Version 3: `stream` is where the producer may still be writing; our work waits for it.
    if (cai.contains("stream") && !cai["stream"].is_none()) {
      const int64_t stream = cai["stream"].cast<int64_t>();
      if (stream == 0)
        fail_value(op, std::string(name) + ": __cuda_array_interface__ stream 0 is ambiguous (the spec forbids it)");
      if (stream > 0) knnclip::cuda::order_after_stream(static_cast<uintptr_t>(stream), t.device);
    }
  }
  return t;
#endif
}

Tensor from_dlpack_cuda(py::handle obj, const std::string& op, const char* name, Allowed allowed, int device) {
#ifndef KNNCLIP_WITH_CUDA
  (void)obj;
  (void)allowed;
  (void)device;
  no_cuda(op, name);
#else
  // stream=: the ops' stream on the array's device, so the producer orders its pending work before
  // ours (torch records an event on its current stream and makes ours wait for it). A producer
  // that predates the argument is asked without it.
  py::object exported;
  try {
    const uintptr_t stream = knnclip::cuda::stream_handle(device < 0 ? 0 : device);
    exported = obj.attr("__dlpack__")(py::arg("stream") = py::int_(stream));
  } catch (py::error_already_set& e) {
    if (!e.matches(PyExc_TypeError)) throw;
    exported = obj.attr("__dlpack__")();
  }
  py::capsule capsule = exported.cast<py::capsule>();
  if (std::string(capsule.name() ? capsule.name() : "") != "dltensor")
    fail_value(op, std::string(name) + ": __dlpack__ returned a capsule that is not an unused 'dltensor'");
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  if (managed == nullptr) throw py::error_already_set();
  PyCapsule_SetName(capsule.ptr(), "used_dltensor");  // we own it now
  Tensor t;
  t.dlpack = std::shared_ptr<DLManagedTensor>(managed, [](DLManagedTensor* m) {
    if (m->deleter != nullptr) m->deleter(m);
  });
  const DLTensor& dl = managed->dl_tensor;
  t.on_device = true;
  t.dtype = dtype_from_dlpack(dl.dtype, op, name, allowed);
  t.shape.assign(dl.shape, dl.shape + dl.ndim);
  if (dl.strides != nullptr && !contiguous(t.shape, std::vector<int64_t>(dl.strides, dl.strides + dl.ndim)))
    fail_value(op, std::string(name) + " is a non-contiguous CUDA tensor; make it contiguous first");
  t.data = static_cast<const char*>(dl.data) + dl.byte_offset;
  t.device = dl.device.device_id;
  return t;
#endif
}

}  // namespace

// Whether an array's __cuda_array_interface__ says which stream its producer wrote on (v3 with a
// `stream` entry, None meaning no synchronisation is needed). torch's is version 2, without one.
static bool names_stream(py::handle obj) {
  py::dict cai = obj.attr("__cuda_array_interface__").cast<py::dict>();
  return cai.contains("stream");
}

Protocol protocol_of(py::handle obj) {
  if (py::isinstance<py::array>(obj)) return Protocol::kNumpy;
  const bool dlpack = py::hasattr(obj, "__dlpack__") && py::hasattr(obj, "__dlpack_device__");
  // An interface without a stream cannot order the producer's work before the ops' stream; DLPack's
  // stream= can, so it is preferred wherever both are offered.
  if (py::hasattr(obj, "__cuda_array_interface__") && !(dlpack && !names_stream(obj)))
    return Protocol::kCudaArrayInterface;
  if (py::hasattr(obj, "__dlpack_device__")) return Protocol::kDlpack;
  return Protocol::kNone;
}

const char* protocol_name(Protocol p) {
  switch (p) {
    case Protocol::kNumpy: return "numpy";
    case Protocol::kCudaArrayInterface: return "cuda_array_interface";
    case Protocol::kDlpack: return "dlpack";
    case Protocol::kNone: return "none";
  }
  return "none";
}

Tensor parse(py::handle obj, const std::string& op, const char* name, Allowed allowed) {
  const Protocol protocol = protocol_of(obj);
  if (protocol == Protocol::kNumpy) return from_numpy(obj, op, name, allowed);
  if (protocol == Protocol::kCudaArrayInterface) return from_cuda_array_interface(obj, op, name, allowed);
  if (protocol == Protocol::kDlpack) {
    const py::tuple dev = obj.attr("__dlpack_device__")().cast<py::tuple>();
    const int type = dev[0].cast<int>();
    if (type == kDLCUDA || type == kDLCUDAManaged) return from_dlpack_cuda(obj, op, name, allowed, dev[1].cast<int>());
    if (type == kDLCPU) {
      py::object arr = py::module_::import("numpy").attr("from_dlpack")(obj);
      return from_numpy(arr, op, name, allowed);
    }
    fail_type(op, std::string(name) + " lives on DLPack device type " + std::to_string(type) +
                      "; only CPU (NumPy) and CUDA arrays are supported");
  }
  fail_type(op, std::string(name) + " must be a NumPy array or a CUDA array (PyTorch, CuPy, ...), got " +
                    py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
}

void expect_ndim(const std::string& op, const char* name, const Tensor& t, std::initializer_list<size_t> ndims,
                 const char* layout) {
  for (size_t n : ndims)
    if (t.shape.size() == n) return;
  fail_value(op, std::string(name) + " must be " + layout + ", got shape " + shape_str(t.shape));
}

int common_device(const std::string& op, std::initializer_list<const Tensor*> tensors) {
  bool any_host = false, any_device = false;
  int device = -1;
  for (const Tensor* t : tensors) {
    if (!t->on_device) { any_host = true; continue; }
    any_device = true;
    if (t->device < 0) continue;  // empty device array: no pointer, no device
    if (device >= 0 && t->device != device)
      fail_value(op, "arguments are on different CUDA devices (" + std::to_string(device) + " and " +
                         std::to_string(t->device) + "); move them to one device");
    device = t->device;
  }
  if (any_host && any_device)
    fail_type(op, "some arguments are NumPy arrays and some are CUDA arrays; pass all on the host or all on one GPU");
  if (any_device && device < 0) device = 0;
  return any_device ? device : -1;
}

void require_finite_scalar(const std::string& op, const char* name, double v) {
  if (!std::isfinite(v)) fail_value(op, std::string(name) + " must be finite, got " + std::to_string(v));
}

void raise_flags(const std::string& op, uint32_t flags, const char* what) {
  if (flags & knnclip::kLabelOutOfRange)
    fail_value(op, "labels must be -1 (no neighbour) or a class id in [0, num_classes)");
  if (flags & knnclip::kNonFinite)
    fail_value(op, std::string(what) + " contains NaN or Inf; check the model outputs feeding it");
}

void check_host_finite(const std::string& op, const char* name, const Tensor& t) {
  if (knnclip::cpu::check_finite(t.data, t.dtype, t.numel()) != 0)
    fail_value(op, std::string(name) + " contains NaN or Inf; check the model outputs feeding it");
}


Output make_output(const std::vector<int64_t>& shape, int device, Element element) {
#ifdef KNNCLIP_WITH_CUDA
  if (device >= 0) {
    auto arr = std::make_shared<knnclip::DeviceArray>(shape, device, element);
    return {py::cast(arr), arr->data(), arr->raw()};
  }
#endif
  (void)device;
  const char* names[] = {"float32", "int32", "bool", "int64"};
  py::array arr(py::dtype(names[static_cast<int>(element)]), shape);
  void* raw = arr.mutable_data();
  return {std::move(arr), static_cast<float*>(raw), raw};
}

}  // namespace knnclip::args
