// Python bindings of knnclip._C: argument parsing and validation, host/device dispatch.
//
// Every op accepts NumPy arrays (CPU kernels) or CUDA arrays exposing __cuda_array_interface__
// or DLPack (CUDA kernels; the result is a DeviceArray on the same device). Bad input raises
// TypeError (wrong type or dtype) or ValueError (wrong shape, NaN/Inf, out-of-range values)
// naming the op, the argument and the fix; nothing is computed then.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/ops_cpu.h"
#include "array_args.h"
#include "kernels/host_build.h"
#include "util/convert.h"
#include "util/crc32c.h"
#ifdef KNNCLIP_WITH_CUDA
#include "cuda/ops_cuda.h"
#include "device_array.h"
#endif

namespace py = pybind11;
using knnclip::DType;
using namespace knnclip::args;

namespace {
// ---- ops ---------------------------------------------------------------------------------------

py::object mask_pool(py::handle features_obj, py::handle masks_obj, double threshold, bool check) {
  const std::string op = "mask_pool";
  Tensor f = parse(features_obj, op, "features", kFloat);
  Tensor m = parse(masks_obj, op, "mask_logits", kFloat);
  expect_ndim(op, "features", f, {3, 4}, "[C, H, W] or [B, C, H, W]");
  expect_ndim(op, "mask_logits", m, {3, 4}, "[N, h, w] or [B, N, h, w]");
  if (f.shape.size() != m.shape.size())
    fail_value(op, "features " + shape_str(f.shape) + " and mask_logits " + shape_str(m.shape) +
                       " must both be unbatched (3-D) or both batched (4-D)");
  const bool batched = f.shape.size() == 4;
  const size_t o = batched ? 1 : 0;
  const int64_t B = batched ? f.dim(0) : 1;
  if (batched && m.dim(0) != B)
    fail_value(op, "batch sizes differ: features " + shape_str(f.shape) + ", mask_logits " + shape_str(m.shape));
  const int64_t C = f.dim(o), H = f.dim(o + 1), W = f.dim(o + 2);
  const int64_t N = m.dim(o), h = m.dim(o + 1), w = m.dim(o + 2);
  if (H < 1 || W < 1) fail_value(op, "features has an empty spatial size " + shape_str(f.shape));
  if (h < 1 || w < 1) fail_value(op, "mask_logits has an empty spatial size " + shape_str(m.shape));
  if (H * W >= (int64_t(1) << 31)) fail_value(op, "features has more than 2^31 pixels per channel");
  require_finite_scalar(op, "threshold", threshold);
  const int device = common_device(op, {&f, &m});
  std::vector<int64_t> out_shape = batched ? std::vector<int64_t>{B, N, C} : std::vector<int64_t>{N, C};
  if (device >= 0 && B > 65535) fail_value(op, "batch larger than 65535 is not supported on the GPU");
  // On the host, features are scanned here and mask_logits row by row inside the kernel.
  if (device < 0 && check) check_host_finite(op, "features", f);
  Output out = make_output(out_shape, device);
  const float thr = static_cast<float>(threshold);
  run_kernel(op, device, device >= 0 ? "features or mask_logits" : "mask_logits",
             KNNCLIP_CUDA_KERNEL(knnclip::cuda::mask_pool(f.data, f.dtype, m.data, m.dtype, B, C, H, W, N, h, w, thr,
                                                          out.data, device, check)),
             [&] { return knnclip::cpu::mask_pool(f.data, f.dtype, m.data, m.dtype, B, C, H, W, N, h, w, thr, check,
                                                  out.data); });
  return out.object;
}

py::object retrieval_probs(py::handle sims_obj, py::handle labels_obj, int64_t num_classes, double tau) {
  const std::string op = "retrieval_probs";
  Tensor s = parse(sims_obj, op, "sims", kFloat);
  Tensor l = parse(labels_obj, op, "labels", kInt64);
  expect_ndim(op, "sims", s, {2}, "[N, k]");
  expect_ndim(op, "labels", l, {2}, "[N, k]");
  if (s.shape != l.shape)
    fail_value(op, "sims " + shape_str(s.shape) + " and labels " + shape_str(l.shape) + " must have the same shape");
  if (num_classes < 0) fail_value(op, "num_classes must be >= 0, got " + std::to_string(num_classes));
  if (!(std::isfinite(tau) && tau > 0.0)) fail_value(op, "tau must be a finite number > 0, got " + std::to_string(tau));
  const int64_t N = s.dim(0), k = s.dim(1);
  const int device = common_device(op, {&s, &l});
  const auto* labels = static_cast<const int64_t*>(l.data);
  const char* checked = "sims (where labels != -1)";
  // Always checked on the host (the device kernel checks as it goes): an out-of-range label
  // would write outside the output.
  if (device < 0) raise_flags(op, knnclip::cpu::check_neighbours(s.data, s.dtype, labels, N * k, num_classes), checked);
  Output out = make_output({N, num_classes}, device);
  const float t = static_cast<float>(tau);
  run_kernel(op, device, checked,
             KNNCLIP_CUDA_KERNEL(knnclip::cuda::retrieval_probs(s.data, s.dtype, labels, N, k, num_classes, t,
                                                                out.data, device, true)),
             [&] {
               knnclip::cpu::retrieval_probs(s.data, s.dtype, labels, N, k, num_classes, t, out.data);
               return 0u;
             });
  return out.object;
}

py::object fuse(py::handle base_obj, py::handle ret_obj, double T, double lam, bool check) {
  const std::string op = "fuse";
  Tensor b = parse(base_obj, op, "p_base", kFloat);
  Tensor r = parse(ret_obj, op, "p_ret", kFloat);
  expect_ndim(op, "p_base", b, {2}, "[N, C]");
  expect_ndim(op, "p_ret", r, {2}, "[N, C]");
  if (b.shape != r.shape)
    fail_value(op, "p_base " + shape_str(b.shape) + " and p_ret " + shape_str(r.shape) + " must have the same shape");
  require_finite_scalar(op, "T", T);
  if (!(lam >= 0.0 && lam <= 1.0)) fail_value(op, "lam must be in [0, 1], got " + std::to_string(lam));
  const int64_t N = b.dim(0), C = b.dim(1);
  const int device = common_device(op, {&b, &r});
  if (device < 0 && check) {
    check_host_finite(op, "p_base", b);
    check_host_finite(op, "p_ret", r);
  }
  Output out = make_output({N, C}, device);
  const float t = static_cast<float>(T), l = static_cast<float>(lam);
  run_kernel(op, device, "p_base or p_ret",
             KNNCLIP_CUDA_KERNEL(knnclip::cuda::fuse(b.data, b.dtype, r.data, r.dtype, N, C, t, l, out.data, device,
                                                     check)),
             [&] {
               knnclip::cpu::fuse(b.data, b.dtype, r.data, r.dtype, N, C, t, l, out.data);
               return 0u;
             });
  return out.object;
}

// class_probs [N, C] and mask_logits [N, H, W] of semantic inference, checked for shape.
struct MergeInputs {
  Tensor p, l;
  int64_t N, C, H, W;
};

MergeInputs parse_merge_inputs(const std::string& op, py::handle probs_obj, py::handle logits_obj) {
  Tensor p = parse(probs_obj, op, "class_probs", kFloat);
  Tensor l = parse(logits_obj, op, "mask_logits", kFloat);
  expect_ndim(op, "class_probs", p, {2}, "[N, C]");
  expect_ndim(op, "mask_logits", l, {3}, "[N, H, W]");
  if (p.dim(0) != l.dim(0))
    fail_value(op, "class_probs " + shape_str(p.shape) + " and mask_logits " + shape_str(l.shape) +
                       " disagree on the number of masks N");
  const int64_t N = p.dim(0), C = p.dim(1), H = l.dim(1), W = l.dim(2);
  return {std::move(p), std::move(l), N, C, H, W};
}

py::object semantic_merge(py::handle probs_obj, py::handle logits_obj, bool check) {
  const std::string op = "semantic_merge";
  MergeInputs in = parse_merge_inputs(op, probs_obj, logits_obj);
  const Tensor &p = in.p, &l = in.l;
  const int64_t N = in.N, C = in.C, H = in.H, W = in.W;
  const int device = common_device(op, {&p, &l});
  if (device < 0 && check) {
    check_host_finite(op, "class_probs", p);
    check_host_finite(op, "mask_logits", l);
  }
  Output out = make_output({C, H, W}, device);
  run_kernel(op, device, "class_probs or mask_logits",
             KNNCLIP_CUDA_KERNEL(knnclip::cuda::semantic_merge(p.data, p.dtype, l.data, l.dtype, N, C, H * W, out.data,
                                                               device, check)),
             [&] {
               knnclip::cpu::semantic_merge(p.data, p.dtype, l.data, l.dtype, N, C, H * W, out.data);
               return 0u;
             });
  return out.object;
}

py::object semantic_argmax(py::handle probs_obj, py::handle logits_obj, bool check) {
  const std::string op = "semantic_argmax";
  MergeInputs in = parse_merge_inputs(op, probs_obj, logits_obj);
  const Tensor &p = in.p, &l = in.l;
  const int64_t N = in.N, C = in.C, H = in.H, W = in.W;
  const int device = common_device(op, {&p, &l});
  if (C < 1) fail_value(op, "needs at least one class");
  if (C > INT32_MAX) fail_value(op, "more than 2^31 classes");
  if (device < 0 && check) {
    check_host_finite(op, "class_probs", p);
    check_host_finite(op, "mask_logits", l);
  }
  Output labels = make_output({H, W}, device, knnclip::Element::I32);
  auto* out = static_cast<int32_t*>(labels.raw);
  run_kernel(op, device, "class_probs or mask_logits",
             KNNCLIP_CUDA_KERNEL(knnclip::cuda::semantic_argmax(p.data, p.dtype, l.data, l.dtype, N, C, H * W, out,
                                                                device, check)),
             [&] {
               knnclip::cpu::semantic_argmax(p.data, p.dtype, l.data, l.dtype, N, C, H * W, out);
               return 0u;
             });
  return labels.object;
}

py::object resample(py::handle x_obj, py::handle rows_obj, py::handle cols_obj, bool check) {
  const std::string op = "resample";
  Tensor x = parse(x_obj, op, "x", kFloat);
  Tensor r = parse(rows_obj, op, "rows", kFloat);
  Tensor c = parse(cols_obj, op, "cols", kFloat);
  expect_ndim(op, "x", x, {3}, "[N, h, w]");
  expect_ndim(op, "rows", r, {2}, "[H, h]");
  expect_ndim(op, "cols", c, {2}, "[W, w]");
  const int device = common_device(op, {&x, &r, &c});
  if (r.dtype != DType::F32 || c.dtype != DType::F32) fail_type(op, "rows and cols must be float32");
  const int64_t N = x.dim(0), h = x.dim(1), w = x.dim(2), H = r.dim(0), W = c.dim(0);
  if (r.dim(1) != h || c.dim(1) != w)
    fail_value(op, "rows " + shape_str(r.shape) + " and cols " + shape_str(c.shape) + " do not match x " +
                       shape_str(x.shape) + " (need [H, h] and [W, w])");
  if (device < 0 && check) {
    check_host_finite(op, "x", x);
    check_host_finite(op, "rows", r);
    check_host_finite(op, "cols", c);
  }
  Output out = make_output({N, H, W}, device);
  const auto* rows = static_cast<const float*>(r.data);
  const auto* cols = static_cast<const float*>(c.data);
  run_kernel(op, device, "x, rows or cols",
             KNNCLIP_CUDA_KERNEL(knnclip::cuda::resample(x.data, x.dtype, N, h, w, rows, H, cols, W, out.data, device,
                                                         check)),
             [&] {
               knnclip::cpu::resample(x.data, x.dtype, N, h, w, rows, H, cols, W, out.data);
               return 0u;
             });
  return out.object;
}

py::tuple panoptic_owner(py::handle scores_obj, py::handle masks_obj, py::handle queries_obj, bool check) {
  const std::string op = "panoptic_owner";
  Tensor s = parse(scores_obj, op, "scores", kFloat);
  Tensor m = parse(masks_obj, op, "mask_logits", kFloat);
  Tensor q = parse(queries_obj, op, "queries", kInt64);
  expect_ndim(op, "scores", s, {1}, "[K]");
  expect_ndim(op, "mask_logits", m, {3}, "[Q, H, W]");
  expect_ndim(op, "queries", q, {1}, "[K]");
  const int device = common_device(op, {&s, &m, &q});
  if (s.dtype != DType::F32) fail_type(op, "scores must be float32");
  const int64_t K = s.dim(0), Q = m.dim(0), H = m.dim(1), W = m.dim(2);
  if (q.dim(0) != K) fail_value(op, "scores " + shape_str(s.shape) + " and queries " + shape_str(q.shape) + " differ");
  if (K < 1) fail_value(op, "needs at least one query");
  const auto* qi = static_cast<const int64_t*>(q.data);
  if (device < 0) {  // on a device, the kernel checks the queries before it reads through them
    for (int64_t k = 0; k < K; ++k)
      if (qi[k] < 0 || qi[k] >= Q) fail_value(op, "queries must index mask_logits' " + std::to_string(Q) + " masks");
    if (check) {
      check_host_finite(op, "scores", s);
      check_host_finite(op, "mask_logits", m);
    }
  }
  Output owner = make_output({H, W}, device, knnclip::Element::I32);
  Output own = make_output({H, W}, device, knnclip::Element::Bool);
  Output mask_pixels = make_output({K}, device, knnclip::Element::I64);
  auto* o = static_cast<int32_t*>(owner.raw);
  auto* w = static_cast<uint8_t*>(own.raw);
  auto* c = static_cast<int64_t*>(mask_pixels.raw);
  const auto* scores = static_cast<const float*>(s.data);
  uint32_t flags = 0;
  {
    py::gil_scoped_release release;
    if (device >= 0) {
      flags = KNNCLIP_CUDA_KERNEL(knnclip::cuda::panoptic_owner(scores, m.data, m.dtype, qi, K, Q, H * W, o, w, c,
                                                                device, check))();
    } else {
      knnclip::cpu::panoptic_owner(scores, m.data, m.dtype, qi, K, H * W, o, w, c);
    }
  }
  if (flags & knnclip::kLabelOutOfRange)
    fail_value(op, "queries must index mask_logits' " + std::to_string(Q) + " masks");
  raise_flags(op, flags, "scores or mask_logits");
  return py::make_tuple(owner.object, own.object, mask_pixels.object);
}

// ---- the host build of the CUDA kernels' bodies (knnclip._C.device_bodies), for the tests ------

using F32Array = py::array_t<float, py::array::c_style>;

F32Array f32_input(const py::array& a, const char* name, py::ssize_t ndim) {
  if (!py::isinstance<F32Array>(a) || a.ndim() != ndim)
    throw py::type_error(std::string("device_bodies: ") + name + " must be a C-contiguous float32 array of " +
                         std::to_string(ndim) + " dimensions");
  return py::reinterpret_borrow<F32Array>(a);
}

F32Array bodies_resample(const py::array& x_obj, const py::array& rows_obj, const py::array& cols_obj) {
  F32Array x = f32_input(x_obj, "x", 3), rows = f32_input(rows_obj, "rows", 2), cols = f32_input(cols_obj, "cols", 2);
  if (rows.shape(1) != x.shape(1) || cols.shape(1) != x.shape(2))
    throw py::value_error("device_bodies.resample: rows [H, h] and cols [W, w] must match x [N, h, w]");
  F32Array out({x.shape(0), rows.shape(0), cols.shape(0)});
  knnclip::kernels::host::resample(x.data(), x.shape(0), x.shape(1), x.shape(2), rows.data(), rows.shape(0),
                                   cols.data(), cols.shape(0), out.mutable_data());
  return out;
}

py::array_t<int32_t> bodies_semantic_argmax(const py::array& probs_obj, const py::array& logits_obj) {
  F32Array probs = f32_input(probs_obj, "class_probs", 2), logits = f32_input(logits_obj, "mask_logits", 3);
  if (probs.shape(0) != logits.shape(0) || probs.shape(1) < 1)
    throw py::value_error("device_bodies.semantic_argmax: class_probs [N, C >= 1] and mask_logits [N, H, W]");
  py::array_t<int32_t> labels({logits.shape(1), logits.shape(2)});
  knnclip::kernels::host::semantic_argmax(probs.data(), logits.data(), probs.shape(0), probs.shape(1),
                                          logits.shape(1) * logits.shape(2), labels.mutable_data());
  return labels;
}

py::tuple bodies_panoptic_owner(const py::array& scores_obj, const py::array& masks_obj,
                                const py::array_t<int64_t, py::array::c_style>& queries) {
  F32Array scores = f32_input(scores_obj, "scores", 1), masks = f32_input(masks_obj, "mask_logits", 3);
  const int64_t K = scores.shape(0), P = masks.shape(1) * masks.shape(2);
  if (queries.ndim() != 1 || queries.shape(0) != K || K < 1)
    throw py::value_error("device_bodies.panoptic_owner: scores and queries must be [K], K >= 1");
  for (int64_t k = 0; k < K; ++k)
    if (queries.data()[k] < 0 || queries.data()[k] >= masks.shape(0))
      throw py::value_error("device_bodies.panoptic_owner: queries must index mask_logits");
  py::array_t<int32_t> owner({masks.shape(1), masks.shape(2)});
  py::array_t<bool> own({masks.shape(1), masks.shape(2)});
  py::array_t<int64_t> mask_pixels(K);
  knnclip::kernels::host::panoptic_owner(scores.data(), masks.data(), queries.data(), K, P, owner.mutable_data(),
                                         reinterpret_cast<uint8_t*>(own.mutable_data()), mask_pixels.mutable_data());
  return py::make_tuple(owner, own, mask_pixels);
}

F32Array bodies_retrieval_probs(const py::array& sims_obj, const py::array_t<int64_t, py::array::c_style>& labels,
                                int64_t num_classes, float tau) {
  F32Array sims = f32_input(sims_obj, "sims", 2);
  if (labels.ndim() != 2 || labels.shape(0) != sims.shape(0) || labels.shape(1) != sims.shape(1))
    throw py::value_error("device_bodies.retrieval_probs: sims and labels must both be [N, k]");
  if (num_classes < 0 || !(tau > 0.0f)) throw py::value_error("device_bodies.retrieval_probs: num_classes >= 0, tau > 0");
  F32Array out({static_cast<int64_t>(sims.shape(0)), num_classes});
  const uint32_t flags = knnclip::kernels::host::retrieval_probs(sims.data(), labels.data(), sims.shape(0),
                                                                 sims.shape(1), num_classes, tau, out.mutable_data());
  raise_flags("device_bodies.retrieval_probs", flags, "sims (where labels != -1)");
  return out;
}

F32Array bodies_fuse(const py::array& base_obj, const py::array& ret_obj, float threshold, float lam) {
  F32Array base = f32_input(base_obj, "p_base", 2), ret = f32_input(ret_obj, "p_ret", 2);
  if (base.shape(0) != ret.shape(0) || base.shape(1) != ret.shape(1))
    throw py::value_error("device_bodies.fuse: p_base and p_ret must have the same shape");
  F32Array out({base.shape(0), base.shape(1)});
  knnclip::kernels::host::fuse(base.data(), ret.data(), base.shape(0), base.shape(1), threshold, lam,
                               out.mutable_data());
  return out;
}

py::array_t<bool> bodies_binarize(const py::array& masks_obj, int64_t height, int64_t width, float threshold) {
  F32Array masks = f32_input(masks_obj, "mask_logits", 3);
  if (height < 1 || width < 1) throw py::value_error("device_bodies.binarize: height and width must be >= 1");
  py::array_t<bool> out({static_cast<int64_t>(masks.shape(0)), height, width});
  knnclip::kernels::host::binarize(masks.data(), masks.shape(0), masks.shape(1), masks.shape(2), height, width,
                                   threshold, reinterpret_cast<uint8_t*>(out.mutable_data()));
  return out;
}

std::vector<std::string> split_csv(const std::string& s) {
  std::vector<std::string> out;
  std::string item;
  std::istringstream in(s);
  while (std::getline(in, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

bool cuda_available() {
#ifdef KNNCLIP_WITH_CUDA
  return knnclip::cuda::device_count() > 0;
#else
  return false;
#endif
}

std::string cuda_status() {
#ifdef KNNCLIP_WITH_CUDA
  return knnclip::cuda::device_problem();
#else
  return "knnclip._C was built without CUDA kernels (no CUDA compiler was found at build time): rebuild it "
         "with nvcc on the PATH (docs/ops.md, building without network)";
#endif
}

py::dict build_info() {
  py::dict d;
  d["version"] = KNNCLIP_VERSION;
#ifdef KNNCLIP_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = split_csv(KNNCLIP_CUDA_ARCHS);
  d["cuda_runtime"] = knnclip::cuda::runtime_version();
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::vector<std::string>{};
  d["cuda_runtime"] = py::none();
#endif
#ifdef KNNCLIP_OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["threads"] = knnclip::cpu::max_threads();
  d["cpu_isas"] = knnclip::cpu::compiled_isas();
  d["cpu_isa"] = knnclip::cpu::active_isa();
  d["compiler"] = KNNCLIP_COMPILER;
  return d;
}

uint32_t crc32c(const py::buffer& data, uint32_t value, const std::string& implementation) {
  // Any C-contiguous buffer: bytes, bytearray, memoryview, NumPy arrays.
  py::buffer_info info = data.request();
  const bool contiguous = [&] {
    py::ssize_t expected = info.itemsize;
    for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
      if (info.shape[d] != 1 && info.strides[d] != expected) return false;
      expected *= info.shape[d];
    }
    return true;
  }();
  if (!contiguous) throw py::value_error("crc32c: data must be a C-contiguous buffer");
  const size_t size = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
  if (implementation != "auto" && implementation != "table")
    throw py::value_error("crc32c: implementation must be 'auto' or 'table', got '" + implementation + "'");
  py::gil_scoped_release release;
  if (implementation == "table") return knnclip::crc32c_extend_table(value, info.ptr, size);
  return knnclip::crc32c_extend(value, info.ptr, size);
}

void f16_to_f32(const py::array& src, py::array& out) {
  if (src.dtype().kind() != 'f' || src.itemsize() != 2)
    throw py::type_error("f16_to_f32: src must be float16, got " + std::string(py::str(src.dtype())));
  if (out.dtype().kind() != 'f' || out.itemsize() != 4)
    throw py::type_error("f16_to_f32: out must be float32, got " + std::string(py::str(out.dtype())));
  if (!(src.flags() & py::array::c_style) || !(out.flags() & py::array::c_style))
    throw py::value_error("f16_to_f32: src and out must be C-contiguous");
  if (!out.writeable()) throw py::value_error("f16_to_f32: out is read-only");
  if (src.size() != out.size())
    throw py::value_error("f16_to_f32: src has " + std::to_string(src.size()) + " elements, out " +
                          std::to_string(out.size()));
  const auto* s = static_cast<const uint16_t*>(src.data());
  auto* o = static_cast<float*>(out.mutable_data());
  const size_t n = static_cast<size_t>(src.size());
  py::gil_scoped_release release;
  knnclip::f16_to_f32(s, o, n);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "knnclip compiled ops: mask pooling, retrieval probabilities, fusion, semantic merge (CPU and CUDA)";

  m.def("build_info", &build_info,
        "How this module was built: version, cuda, cuda_archs, cuda_runtime, openmp, threads, "
        "cpu_isas (compiled), cpu_isa (in use), compiler.");
  m.def("cuda_available", &cuda_available, "True when CUDA kernels are compiled in and a CUDA device is usable now.");
  m.def("cuda_status", &cuda_status,
        "Why no CUDA device is usable by the kernels (built without CUDA, no driver, a driver older than the "
        "runtime, no device), or '' when one is.");
  m.def("cpu_isa", &knnclip::cpu::active_isa, "The CPU instruction set the kernels use now.");
  m.def("supported_cpu_isas", &knnclip::cpu::supported_isas, "Compiled instruction sets this CPU can run, best first.");
  m.def("set_cpu_isa", &knnclip::cpu::set_isa, py::arg("name"),
        "Use the kernels compiled for `name` (one of supported_cpu_isas()); for testing and benchmarks.");

  m.def("mask_pool", &mask_pool, py::arg("features"), py::arg("mask_logits"), py::arg("threshold") = 0.0,
        py::kw_only(), py::arg("check") = true,
        "Mean of features[C,H,W] inside each mask: mask_logits[N,h,w] resized bilinearly "
        "(align_corners=False) to HxW and binarised at logit > threshold. Returns float32 [N,C] "
        "([B,N,C] for batched inputs); an empty mask gives zeros. NaN/Inf raise ValueError: in features "
        "anywhere, in mask_logits in the rows the resize reads (on the CPU the others, which cannot "
        "change the result, are not scanned). check=False skips the NaN/Inf scan.");
  m.def("retrieval_probs", &retrieval_probs, py::arg("sims"), py::arg("labels"), py::arg("num_classes"),
        py::arg("tau"),
        "P_ret[i, c] = sum over neighbours j of row i with labels[i, j] == c of softmax_j(sims[i, j] / tau), "
        "the softmax taken over the row's real neighbours (labels != -1). A row without neighbours is all zeros.");
  m.def("fuse", &fuse, py::arg("p_base"), py::arg("p_ret"), py::arg("T"), py::arg("lam"), py::kw_only(),
        py::arg("check") = true,
        "Rows whose retrieval confidence max_c p_ret >= T get lam * p_ret + (1 - lam) * p_base; other rows p_base.");
  m.def("semantic_merge", &semantic_merge, py::arg("class_probs"), py::arg("mask_logits"), py::kw_only(),
        py::arg("check") = true,
        "FC-CLIP semantic inference: out[c, h, w] = sum_n class_probs[n, c] * sigmoid(mask_logits[n, h, w]).");

  m.def("semantic_argmax", &semantic_argmax, py::arg("class_probs"), py::arg("mask_logits"), py::kw_only(),
        py::arg("check") = true,
        "semantic_merge(class_probs, mask_logits).argmax(0) as int32 [H, W] (first of equals) without storing "
        "the [C, H, W] scores.");
  m.def("resample", &resample, py::arg("x"), py::arg("rows"), py::arg("cols"), py::kw_only(), py::arg("check") = true,
        "out[n] = rows @ x[n] @ cols.T for x[N,h,w], rows[H,h], cols[W,w] (float32), visiting only each row's band "
        "of non-zeros: a separable resize (e.g. FC-CLIP's bilinear upsample, crop and resize) in O(taps) per pixel.");
  m.def("panoptic_owner", &panoptic_owner, py::arg("scores"), py::arg("mask_logits"), py::arg("queries"),
        py::kw_only(), py::arg("check") = true,
        "Mask2Former's pixel assignment over the kept queries: owner[h, w] = argmax_k scores[k] * "
        "sigmoid(mask_logits[queries[k], h, w]) (first of equals, int32), own[h, w] = that mask's logit >= 0 "
        "(bool), mask_pixels[k] = pixels where mask queries[k] is >= 0 (int64).");

  py::module_ bodies = m.def_submodule(
      "device_bodies",
      "The CUDA kernels' per-element bodies (csrc/kernels/bodies.h) compiled for the host, in the kernels' loops: "
      "what the GPU computes, on NumPy float32 arrays, for tests against float64 references.");
  bodies.def("resample", &bodies_resample, py::arg("x"), py::arg("rows"), py::arg("cols"));
  bodies.def("semantic_argmax", &bodies_semantic_argmax, py::arg("class_probs"), py::arg("mask_logits"));
  bodies.def("panoptic_owner", &bodies_panoptic_owner, py::arg("scores"), py::arg("mask_logits"), py::arg("queries"));
  bodies.def("retrieval_probs", &bodies_retrieval_probs, py::arg("sims"), py::arg("labels"), py::arg("num_classes"),
             py::arg("tau"));
  bodies.def("fuse", &bodies_fuse, py::arg("p_base"), py::arg("p_ret"), py::arg("T"), py::arg("lam"));
  bodies.def("binarize", &bodies_binarize, py::arg("mask_logits"), py::arg("height"), py::arg("width"),
             py::arg("threshold") = 0.0f);

  m.def(
      "input_protocol", [](py::handle obj) { return std::string(protocol_name(protocol_of(obj))); },
      py::arg("array"),
      "How the ops read `array`: 'numpy', 'cuda_array_interface' (it names its producer's stream, or offers no "
      "DLPack), 'dlpack' (read with stream= the ops' stream, so the producer orders its pending work first), or "
      "'none'.");
  m.def("crc32c", &crc32c, py::arg("data"), py::arg("value") = 0, py::kw_only(),
        py::arg("implementation") = "auto",
        "CRC-32C (Castagnoli) of a C-contiguous buffer; pass the previous result as `value` to extend it. "
        "implementation='table' forces the portable code path.");
  m.def("f16_to_f32", &f16_to_f32, py::arg("src"), py::arg("out"),
        "Convert a C-contiguous float16 array into a float32 array of the same size (exact; F16C, OpenMP).");
  m.def("crc32c_implementation", &knnclip::crc32c_implementation,
        "Which CRC-32C implementation runs on this CPU: 'sse4.2' or 'table'.");

#ifdef KNNCLIP_WITH_CUDA
  knnclip::register_device_array(m);
#endif
}
