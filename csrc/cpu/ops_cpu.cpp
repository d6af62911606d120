// CPU entry points: instruction-set dispatch, the bilinear resize tables, the small row-wise ops
// (retrieval probabilities, fusion) and the validation passes.
#include "cpu/ops_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace knnclip::cpu {
namespace {

struct IsaKernels {
  const char* name;
  void (*mask_pool)(const MaskPoolArgs&);
  void (*semantic_merge)(const SemanticMergeArgs&);
  void (*semantic_argmax)(const SemanticMergeArgs&, int32_t*);
  void (*resample)(const ResampleArgs&);
  void (*panoptic_owner)(const PanopticOwnerArgs&);
  bool (*usable)();
};

bool always() { return true; }
#if defined(KNNCLIP_HAVE_X86_ISAS)
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"); }
bool has_avx512() { return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"); }
#endif

// Best first.
const IsaKernels kIsas[] = {
#if defined(KNNCLIP_HAVE_X86_ISAS)
    {"avx512", avx512::mask_pool, avx512::semantic_merge, avx512::semantic_argmax, avx512::resample, avx512::panoptic_owner, has_avx512},
    {"avx2", avx2::mask_pool, avx2::semantic_merge, avx2::semantic_argmax, avx2::resample, avx2::panoptic_owner, has_avx2},
#endif
    {"generic", generic::mask_pool, generic::semantic_merge, generic::semantic_argmax, generic::resample, generic::panoptic_owner, always},
};

const IsaKernels* best_isa() {
  // KNNCLIP_CPU_ISA=generic|avx2|avx512 caps the choice (for debugging and for comparing).
  const char* wanted = std::getenv("KNNCLIP_CPU_ISA");
  for (const IsaKernels& isa : kIsas) {
    if (!isa.usable()) continue;
    if (wanted == nullptr || *wanted == '\0' || std::string(wanted) == isa.name) return &isa;
  }
  return &kIsas[sizeof(kIsas) / sizeof(kIsas[0]) - 1];
}

std::atomic<const IsaKernels*> g_isa{nullptr};

const IsaKernels& active() {
  const IsaKernels* isa = g_isa.load(std::memory_order_acquire);
  if (isa == nullptr) {
    isa = best_isa();
    g_isa.store(isa, std::memory_order_release);
  }
  return *isa;
}

// PyTorch's bilinear source indices and weights for align_corners=False (upsample_bilinear2d):
// src = scale * (dst + 0.5) - 0.5 clamped at 0, computed in float32 as PyTorch does for float32.
void bilinear_table(int64_t in, int64_t out, std::vector<int64_t>& lo, std::vector<int64_t>& hi,
                    std::vector<float>& w) {
  lo.resize(out);
  hi.resize(out);
  w.resize(out);
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t i = 0; i < out; ++i) {
    float src = scale * (static_cast<float>(i) + 0.5f) - 0.5f;
    if (src < 0.0f) src = 0.0f;
    const int64_t i0 = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
    lo[i] = i0;
    hi[i] = i0 + (i0 < in - 1 ? 1 : 0);
    w[i] = std::min(std::max(src - static_cast<float>(i0), 0.0f), 1.0f);
  }
}

inline float load(const void* base, DType dtype, int64_t i) {
  return dtype == DType::F32 ? static_cast<const float*>(base)[i]
                             : half_bits_to_float(static_cast<const uint16_t*>(base)[i]);
}

// Row-wise ops are tiny at the real sizes (250 x 847): threads only pay off well above that.
constexpr int64_t kParallelThreshold = 1 << 16;

}  // namespace

uint32_t mask_pool(const void* features, DType features_dtype, const void* masks, DType masks_dtype,
                   int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t num_masks,
                   int64_t mask_height, int64_t mask_width, float threshold, bool check, float* out) {
  std::vector<int64_t> y_lo, y_hi, x_lo, x_hi;
  std::vector<float> y_w, x_w;
  bilinear_table(mask_height, height, y_lo, y_hi, y_w);
  bilinear_table(mask_width, width, x_lo, x_hi, x_w);
  std::vector<uint8_t> nonfinite(static_cast<size_t>(batch * num_masks), 0);
  const MaskPoolArgs args{features,    features_dtype, masks,       masks_dtype, batch,      channels,
                          height,      width,          num_masks,   mask_height, mask_width, threshold,
                          check,       nonfinite.data(), y_lo.data(), y_hi.data(), y_w.data(), x_lo.data(),
                          x_hi.data(), x_w.data(),     out};
  active().mask_pool(args);
  return std::find(nonfinite.begin(), nonfinite.end(), uint8_t{1}) != nonfinite.end() ? kNonFinite : 0u;
}

void semantic_merge(const void* probs, DType probs_dtype, const void* logits, DType logits_dtype,
                    int64_t num_masks, int64_t num_classes, int64_t pixels, float* out) {
  const SemanticMergeArgs args{probs, probs_dtype, logits, logits_dtype, num_masks, num_classes,
                               pixels, out};
  active().semantic_merge(args);
}

namespace {
// [lo, hi) of the non-zeros of each row of a [rows, cols] matrix (an empty band: lo = hi = 0).
void bands(const float* m, int64_t rows, int64_t cols, std::vector<int64_t>& lo, std::vector<int64_t>& hi) {
  lo.assign(rows, 0);
  hi.assign(rows, 0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = m + r * cols;
    int64_t a = 0, b = cols;
    while (a < cols && row[a] == 0.0f) ++a;
    while (b > a && row[b - 1] == 0.0f) --b;
    if (a < b) lo[r] = a, hi[r] = b;
  }
}
}  // namespace

void resample(const void* x, DType x_dtype, int64_t n, int64_t h, int64_t w, const float* rows, int64_t out_h,
              const float* cols, int64_t out_w, float* out) {
  std::vector<int64_t> row_lo, row_hi, col_lo, col_hi;
  bands(rows, out_h, h, row_lo, row_hi);
  bands(cols, out_w, w, col_lo, col_hi);
  int64_t used_lo = h, used_hi = 0;
  for (int64_t i = 0; i < out_h; ++i)
    if (row_lo[i] < row_hi[i]) used_lo = std::min(used_lo, row_lo[i]), used_hi = std::max(used_hi, row_hi[i]);
  if (used_lo >= used_hi) used_lo = used_hi = 0;
  const ResampleArgs args{x,    x_dtype,       n,      h,      w,      out_h,   out_w,  rows,
                          row_lo.data(), row_hi.data(), cols, col_lo.data(), col_hi.data(), used_lo, used_hi, out};
  active().resample(args);
}

void panoptic_owner(const float* scores, const void* masks, DType masks_dtype, const int64_t* queries, int64_t k,
                    int64_t pixels, int32_t* owner, uint8_t* own, int64_t* mask_pixels) {
  const PanopticOwnerArgs args{scores, masks, masks_dtype, queries, k, pixels, owner, own, mask_pixels};
  active().panoptic_owner(args);
}

void semantic_argmax(const void* probs, DType probs_dtype, const void* logits, DType logits_dtype,
                     int64_t num_masks, int64_t num_classes, int64_t pixels, int32_t* labels) {
  const SemanticMergeArgs args{probs, probs_dtype, logits, logits_dtype, num_masks, num_classes, pixels, nullptr};
  active().semantic_argmax(args, labels);
}

void retrieval_probs(const void* sims, DType sims_dtype, const int64_t* labels, int64_t rows,
                     int64_t k, int64_t num_classes, float tau, float* out) {
  std::fill(out, out + rows * num_classes, 0.0f);
  const float inv_tau = 1.0f / tau;
#pragma omp parallel for schedule(static) if (rows * k > kParallelThreshold)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t* lab = labels + i * k;
    float best = -INFINITY;
    for (int64_t j = 0; j < k; ++j)
      if (lab[j] >= 0) best = std::max(best, load(sims, sims_dtype, i * k + j));
    if (best == -INFINITY) continue;  // no neighbour at all: no retrieval evidence
    float total = 0.0f;
    for (int64_t j = 0; j < k; ++j)
      if (lab[j] >= 0) total += neighbour_weight(load(sims, sims_dtype, i * k + j), best, inv_tau);
    float* row = out + i * num_classes;
    for (int64_t j = 0; j < k; ++j)
      if (lab[j] >= 0) row[lab[j]] += neighbour_weight(load(sims, sims_dtype, i * k + j), best, inv_tau) / total;
  }
}

namespace {

inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t h) { return half_bits_to_float(h); }

template <typename TB, typename TR>
void fuse_typed(const TB* base, const TR* ret, int64_t rows, int64_t C, float threshold, float lam,
                float* out) {
#pragma omp parallel for schedule(static) if (rows * C > kParallelThreshold)
  for (int64_t i = 0; i < rows; ++i) {
    const TB* b = base + i * C;
    const TR* r = ret + i * C;
    float* o = out + i * C;
    float confidence = -INFINITY;
    // simd reduction: a plain max chain does not vectorise (NaN ordering) and dominated the op
#pragma omp simd reduction(max : confidence)
    for (int64_t c = 0; c < C; ++c) confidence = std::max(confidence, to_f32(r[c]));
    if (C > 0 && confidence >= threshold) {
      const float keep = 1.0f - lam;
      for (int64_t c = 0; c < C; ++c) o[c] = lam * to_f32(r[c]) + keep * to_f32(b[c]);
    } else {
      for (int64_t c = 0; c < C; ++c) o[c] = to_f32(b[c]);
    }
  }
}

template <typename TB>
void fuse_dispatch_ret(const TB* base, const void* ret, DType ret_dtype, int64_t rows, int64_t C,
                       float threshold, float lam, float* out) {
  if (ret_dtype == DType::F32) fuse_typed(base, static_cast<const float*>(ret), rows, C, threshold, lam, out);
  else fuse_typed(base, static_cast<const uint16_t*>(ret), rows, C, threshold, lam, out);
}

}  // namespace

void fuse(const void* p_base, DType base_dtype, const void* p_ret, DType ret_dtype, int64_t rows,
          int64_t num_classes, float threshold, float lam, float* out) {
  if (base_dtype == DType::F32)
    fuse_dispatch_ret(static_cast<const float*>(p_base), p_ret, ret_dtype, rows, num_classes, threshold, lam, out);
  else
    fuse_dispatch_ret(static_cast<const uint16_t*>(p_base), p_ret, ret_dtype, rows, num_classes, threshold, lam, out);
}

namespace {
// OR of "exponent all ones" (mask = the exponent bits) over n words: branch-free, vectorises, exact.
// Small inputs take the serial loop: an OpenMP region whose if() is false still runs its outlined
// body, which GCC does not vectorise (a 250x150 array took 45 us instead of 5). A scan is
// memory-bound: two threads pay off from about 10^5 elements (measured on fuse's inputs).
constexpr int64_t kParallelScan = int64_t{1} << 17;

template <typename Word>
uint32_t any_exponent_all_ones(const Word* bits, int64_t count, Word mask) {
  uint32_t bad = 0;
  if (count > kParallelScan) {
#pragma omp parallel for simd reduction(| : bad) schedule(static)
    for (int64_t i = 0; i < count; ++i) bad |= (bits[i] & mask) == mask;
  } else {
#pragma omp simd reduction(| : bad)
    for (int64_t i = 0; i < count; ++i) bad |= (bits[i] & mask) == mask;
  }
  return bad;
}
}  // namespace

uint32_t check_finite(const void* data, DType dtype, int64_t count) {
  uint32_t bad = 0;
  if (dtype == DType::F32)
    bad = any_exponent_all_ones(static_cast<const uint32_t*>(data), count, uint32_t{0x7f800000u});
  else if (dtype == DType::F16)
    bad = any_exponent_all_ones(static_cast<const uint16_t*>(data), count, uint16_t{0x7c00u});
  return bad != 0 ? kNonFinite : 0u;
}

uint32_t check_neighbours(const void* sims, DType sims_dtype, const int64_t* labels, int64_t count,
                          int64_t num_classes) {
  uint32_t flags = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (labels[i] == -1) continue;  // no neighbour: its similarity is whatever FAISS filled in
    if (labels[i] < -1 || labels[i] >= num_classes) flags |= kLabelOutOfRange;
    else if (!std::isfinite(load(sims, sims_dtype, i))) flags |= kNonFinite;
  }
  return flags;
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> names;
  for (const IsaKernels& isa : kIsas) names.emplace_back(isa.name);
  return names;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const IsaKernels& isa : kIsas)
    if (isa.usable()) names.emplace_back(isa.name);
  return names;
}

std::string active_isa() { return active().name; }

void set_isa(const std::string& name) {
  for (const IsaKernels& isa : kIsas) {
    if (name == isa.name) {
      if (!isa.usable()) throw std::invalid_argument("CPU instruction set '" + name + "' is not supported by this CPU");
      g_isa.store(&isa, std::memory_order_release);
      return;
    }
  }
  throw std::invalid_argument("unknown CPU instruction set '" + name + "'; compiled: see build_info()['cpu_isas']");
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace knnclip::cpu
