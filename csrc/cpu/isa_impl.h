// The hot CPU kernels (mask pooling, semantic merge), written once with GCC/Clang vector
// extensions and compiled once per instruction set: isa_generic.cpp, isa_avx2.cpp and
// isa_avx512.cpp each define KNNCLIP_ISA_NAMESPACE, include this file and get their own -m
// flags. Everything but the two entry points has internal linkage, so the linker can never hand
// an AVX-512 copy of a helper to code running on a CPU without AVX-512. For the same reason no
// standard-library template is instantiated here.
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__F16C__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/ops_cpu.h"

#ifndef KNNCLIP_ISA_NAMESPACE
#error "define KNNCLIP_ISA_NAMESPACE before including isa_impl.h"
#endif

namespace knnclip::cpu::KNNCLIP_ISA_NAMESPACE {
namespace {

#if defined(__AVX512F__)
constexpr int kVec = 16;
#elif defined(__AVX2__)
constexpr int kVec = 8;
#else
constexpr int kVec = 4;
#endif

typedef float vfloat __attribute__((vector_size(kVec * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kVec * sizeof(int32_t))));

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
inline vfloat vsplat(float x) { return vfloat{} + x; }

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

inline int thread_count() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Owns a malloc'd block; allocated outside parallel regions only (no throwing inside them).
class Scratch {
 public:
  explicit Scratch(size_t bytes) : ptr_(std::malloc(bytes > 0 ? bytes : 1)) {
    if (ptr_ == nullptr) throw std::bad_alloc();
  }
  ~Scratch() { std::free(ptr_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_;
};

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return half_bits_to_float(h);
#endif
}

// dst[0:n] = float32(src[offset : offset + n]) for a float32 or float16 source.
inline void load_f32(const void* src, DType dtype, int64_t offset, int64_t n, float* dst) {
  if (dtype == DType::F32) {
    std::memcpy(dst, static_cast<const float*>(src) + offset, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) dst[i] = half_to_float(s[i]);
}

// exp(x) for x in [-87, 88] (callers clamp): Cody-Waite range reduction and a degree-6
// polynomial, about 2 ulp; vectorises, unlike a libm call.
inline vfloat vexp(vfloat x) {
  const vfloat lo = vsplat(-87.0f), hi = vsplat(88.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vfloat t = x * 1.44269504088896341f + kRound;
  const vfloat n = t - kRound;
  vfloat r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vfloat p = vsplat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  vint bits;
  std::memcpy(&bits, &t, sizeof bits);
  bits = (bits - 0x4B400000 + 127) << 23;  // 2^n as float bits
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline vfloat vsigmoid(vfloat x) { return 1.0f / (1.0f + vexp(-x)); }

}  // namespace

// out[b, n, :] = mean of features[b, :, p] over the pixels p where the bilinearly resized mask
// logit is > threshold; zeros for an empty mask.
void mask_pool(const MaskPoolArgs& a) {
  const int64_t C = a.channels, H = a.height, W = a.width, P = H * W;
  const int64_t N = a.num_masks, mh = a.mask_height, mw = a.mask_width, mP = mh * mw;
  // Channels are pooled in chunks of 8 vectors that stay in registers while the pixels of a mask
  // stream past; features are stored transposed per chunk, [chunk][pixel][channel], so each
  // pixel's chunk is one contiguous 8-vector row.
  constexpr int64_t kChunk = 8 * kVec;
  const int64_t chunks = (C + kChunk - 1) / kChunk;
  const int threads = thread_count();
  Scratch transposed(static_cast<size_t>(chunks * P * kChunk) * sizeof(float));
  Scratch pixel_lists(static_cast<size_t>(N * P) * sizeof(int32_t));
  Scratch counts(static_cast<size_t>(N) * sizeof(int64_t));
  Scratch mask_rows(static_cast<size_t>(threads * mP) * sizeof(float));
  // Transposition goes through a per-thread staging block of kChunk channels x kBlock pixels.
  constexpr int64_t kBlock = 256;
  Scratch staging(static_cast<size_t>(threads * kChunk * kBlock) * sizeof(float));
  float* ft = transposed.as<float>();
  int32_t* idx = pixel_lists.as<int32_t>();
  int64_t* cnt = counts.as<int64_t>();
  const int64_t blocks = (P + kBlock - 1) / kBlock;

  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t feature_offset = b * C * P;
    const int64_t mask_offset = b * N * mP;

#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t q = 0; q < chunks; ++q) {
      for (int64_t blk = 0; blk < blocks; ++blk) {
        float* stage = staging.as<float>() + static_cast<int64_t>(thread_id()) * kChunk * kBlock;
        const int64_t c0 = q * kChunk, cn = imin(kChunk, C - c0);
        const int64_t p0 = blk * kBlock, pn = imin(kBlock, P - p0);
        for (int64_t c = 0; c < cn; ++c)
          load_f32(a.features, a.features_dtype, feature_offset + (c0 + c) * P + p0, pn,
                   stage + c * kBlock);
        float* dst = ft + (q * P + p0) * kChunk;
        for (int64_t p = 0; p < pn; ++p) {
          float* d = dst + p * kChunk;
          for (int64_t c = 0; c < cn; ++c) d[c] = stage[c * kBlock + p];
          for (int64_t c = cn; c < kChunk; ++c) d[c] = 0.0f;
        }
      }
    }

#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t n = 0; n < N; ++n) {
      float* m = mask_rows.as<float>() + static_cast<int64_t>(thread_id()) * mP;
      load_f32(a.masks, a.masks_dtype, mask_offset + n * mP, mP, m);
      int32_t* list = idx + n * P;
      int64_t count = 0;
      for (int64_t y = 0; y < H; ++y) {
        const float* r0 = m + a.y_lo[y] * mw;
        const float* r1 = m + a.y_hi[y] * mw;
        const float wy1 = a.y_w[y], wy0 = 1.0f - wy1;
        for (int64_t x = 0; x < W; ++x) {
          const int64_t x0 = a.x_lo[x], x1 = a.x_hi[x];
          const float wx1 = a.x_w[x], wx0 = 1.0f - wx1;
          // Same association as PyTorch's bilinear kernel.
          const float v = wy0 * (wx0 * r0[x0] + wx1 * r0[x1]) + wy1 * (wx0 * r1[x0] + wx1 * r1[x1]);
          if (v > a.threshold) list[count++] = static_cast<int32_t>(y * W + x);
        }
      }
      cnt[n] = count;
    }

#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t q = 0; q < chunks; ++q) {
      for (int64_t n = 0; n < N; ++n) {
        vfloat acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = vfloat{};
        const int32_t* list = idx + n * P;
        const float* base = ft + q * P * kChunk;
        for (int64_t i = 0; i < cnt[n]; ++i) {
          const float* row = base + static_cast<int64_t>(list[i]) * kChunk;
#pragma GCC unroll 8
          for (int j = 0; j < 8; ++j) acc[j] += vload(row + j * kVec);
        }
        const float inv = cnt[n] > 0 ? 1.0f / static_cast<float>(cnt[n]) : 0.0f;
        float tmp[kChunk];
        for (int j = 0; j < 8; ++j) vstore(tmp + j * kVec, acc[j] * inv);
        const int64_t c0 = q * kChunk;
        std::memcpy(a.out + (b * N + n) * C + c0, tmp,
                    static_cast<size_t>(imin(kChunk, C - c0)) * sizeof(float));
      }
    }
  }
}

// out[c, p] = sum_n probs[n, c] * sigmoid(logits[n, p]): a [C x N] x [N x P] product whose right
// factor is made on the fly, one panel of kNR pixels at a time, so the sigmoid of every logit is
// computed exactly once and the panel stays in L1 while all class tiles pass over it.
void semantic_merge(const SemanticMergeArgs& a) {
  constexpr int kMR = kVec == 16 ? 8 : 6;  // class rows per register tile
  constexpr int kNR = 2 * kVec;            // pixel columns per register tile
  const int64_t N = a.num_masks, C = a.num_classes, P = a.pixels;
  const int64_t tiles = (C + kMR - 1) / kMR, panels = (P + kNR - 1) / kNR;
  const int threads = thread_count();

  // Class probabilities packed tile-major: packed[(t * N + n) * kMR + r] = probs[n, t * kMR + r].
  Scratch packed_buf(static_cast<size_t>(tiles * N * kMR) * sizeof(float));
  Scratch row_buf(static_cast<size_t>(C > 0 ? C : 1) * sizeof(float));
  float* packed = packed_buf.as<float>();
  float* row = row_buf.as<float>();
  for (int64_t n = 0; n < N; ++n) {
    load_f32(a.probs, a.probs_dtype, n * C, C, row);
    for (int64_t t = 0; t < tiles; ++t)
      for (int r = 0; r < kMR; ++r) {
        const int64_t c = t * kMR + r;
        packed[(t * N + n) * kMR + r] = c < C ? row[c] : 0.0f;
      }
  }
  Scratch panel_buf(static_cast<size_t>(threads * N * kNR) * sizeof(float));

#pragma omp parallel
  {
    float* panel = panel_buf.as<float>() + static_cast<int64_t>(thread_id()) * N * kNR;
#pragma omp for schedule(static)
    for (int64_t j = 0; j < panels; ++j) {
      const int64_t p0 = j * kNR, valid = imin(kNR, P - p0);
      for (int64_t n = 0; n < N; ++n) {
        float* s = panel + n * kNR;
        load_f32(a.logits, a.logits_dtype, n * P + p0, valid, s);
        for (int64_t i = valid; i < kNR; ++i) s[i] = 0.0f;
        vstore(s, vsigmoid(vload(s)));
        vstore(s + kVec, vsigmoid(vload(s + kVec)));
        for (int64_t i = valid; i < kNR; ++i) s[i] = 0.0f;  // padding contributes nothing
      }
      for (int64_t t = 0; t < tiles; ++t) {
        const float* ap = packed + t * N * kMR;
        vfloat acc0[kMR], acc1[kMR];
        for (int r = 0; r < kMR; ++r) acc0[r] = acc1[r] = vfloat{};
        for (int64_t n = 0; n < N; ++n) {
          const vfloat s0 = vload(panel + n * kNR), s1 = vload(panel + n * kNR + kVec);
          const float* an = ap + n * kMR;
#pragma GCC unroll 8
          for (int r = 0; r < kMR; ++r) {
            acc0[r] += an[r] * s0;
            acc1[r] += an[r] * s1;
          }
        }
        const int64_t rows = imin(kMR, C - t * kMR);
        for (int64_t r = 0; r < rows; ++r) {
          float* dst = a.out + (t * kMR + r) * P + p0;
          if (valid == kNR) {
            vstore(dst, acc0[r]);
            vstore(dst + kVec, acc1[r]);
          } else {
            float tmp[kNR];
            vstore(tmp, acc0[r]);
            vstore(tmp + kVec, acc1[r]);
            std::memcpy(dst, tmp, static_cast<size_t>(valid) * sizeof(float));
          }
        }
      }
    }
  }
}

}  // namespace knnclip::cpu::KNNCLIP_ISA_NAMESPACE
