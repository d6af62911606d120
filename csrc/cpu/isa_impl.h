// The hot CPU kernels (mask pooling, semantic merge), written once with GCC/Clang vector
// extensions and compiled once per instruction set: isa_generic.cpp, isa_avx2.cpp and
// isa_avx512.cpp each define KNNCLIP_ISA_NAMESPACE, include this file and get their own -m
// flags. Everything but the two entry points has internal linkage, so the linker can never hand
// an AVX-512 copy of a helper to code running on a CPU without AVX-512. For the same reason no
// standard-library template is instantiated here.
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__x86_64__) || defined(__i386__)
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
inline vfloat vsplat(float x) {
  // An intrinsic, not `vfloat{} + x`: that costs a real add (0 + -0 is +0) on the FMA ports,
  // and an element-wise loop is not always folded into one broadcast.
#if defined(__AVX512F__)
  return reinterpret_cast<vfloat>(_mm512_set1_ps(x));
#elif defined(__AVX__)
  return reinterpret_cast<vfloat>(_mm256_set1_ps(x));
#elif defined(__SSE__)
  return reinterpret_cast<vfloat>(_mm_set1_ps(x));
#else
  vfloat v;
  for (int i = 0; i < kVec; ++i) v[i] = x;
  return v;
#endif
}

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

// dst[i * dst_stride + j] = src[j * src_stride + i] for a 16 x 16 block of floats.
inline void transpose16(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
#if defined(__AVX512F__)
  // Three rounds of interleaving: pairs of floats, pairs of doubles, then 128-bit lanes (twice).
  __m512 r[16], t[16], u[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * src_stride);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // u[g + k]: column k (mod 4) of rows g..g+3, per lane
    const __m512d t0 = _mm512_castps_pd(t[g]), t1 = _mm512_castps_pd(t[g + 1]);
    const __m512d t2 = _mm512_castps_pd(t[g + 2]), t3 = _mm512_castps_pd(t[g + 3]);
    u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int k = 0; k < 4; ++k) {  // columns k, k + 4, k + 8, k + 12
    const __m512 v0 = _mm512_shuffle_f32x4(u[k], u[k + 4], 0x88), v1 = _mm512_shuffle_f32x4(u[k], u[k + 4], 0xdd);
    const __m512 v2 = _mm512_shuffle_f32x4(u[k + 8], u[k + 12], 0x88);
    const __m512 v3 = _mm512_shuffle_f32x4(u[k + 8], u[k + 12], 0xdd);
    _mm512_storeu_ps(dst + k * dst_stride, _mm512_shuffle_f32x4(v0, v2, 0x88));
    _mm512_storeu_ps(dst + (k + 8) * dst_stride, _mm512_shuffle_f32x4(v0, v2, 0xdd));
    _mm512_storeu_ps(dst + (k + 4) * dst_stride, _mm512_shuffle_f32x4(v1, v3, 0x88));
    _mm512_storeu_ps(dst + (k + 12) * dst_stride, _mm512_shuffle_f32x4(v1, v3, 0xdd));
  }
#else
  for (int j = 0; j < 16; ++j)
    for (int i = 0; i < 16; ++i) dst[i * dst_stride + j] = src[j * src_stride + i];
#endif
}

// Register tile of the products below: kMR rows x kNV vectors of columns.
#ifndef KNNCLIP_TILE_MR
#define KNNCLIP_TILE_MR (kVec == 16 ? 6 : 4)
#endif
#ifndef KNNCLIP_TILE_NV
#define KNNCLIP_TILE_NV (kVec == 16 ? 4 : 3)
#endif
constexpr int kMR = KNNCLIP_TILE_MR;
constexpr int kNV = KNNCLIP_TILE_NV;
constexpr int kNR = kNV * kVec;

// acc[r][v] = sum_i a[i * kMR + r] * b[k_i * kNR + v * kVec : ...] over i < depth, where
// k_i = index[i] (or i when index is null): a row tile packed k-major (a) times a column panel
// packed k-major (b), the inner step of a blocked GEMM that may skip rows of b.
inline void tile_product(const float* a, const float* b, const int32_t* index, int64_t depth,
                         vfloat (&acc)[kMR][kNV]) {
  for (int r = 0; r < kMR; ++r)
    for (int v = 0; v < kNV; ++v) acc[r][v] = vfloat{};
  for (int64_t i = 0; i < depth; ++i) {
    const float* bk = b + (index != nullptr ? static_cast<int64_t>(index[i]) : i) * kNR;
    vfloat bv[kNV];
#pragma GCC unroll 8
    for (int v = 0; v < kNV; ++v) bv[v] = vload(bk + v * kVec);
    const float* ai = a + i * kMR;
#pragma GCC unroll 16
    for (int r = 0; r < kMR; ++r) {
      const vfloat ar = vsplat(ai[r]);
#pragma GCC unroll 8
      for (int v = 0; v < kNV; ++v) acc[r][v] += ar * bv[v];
    }
  }
}

// Stores rows [0, rows) and columns [0, cols) of a tile, each row scaled, at dst + r * stride.
inline void store_tile(const vfloat (&acc)[kMR][kNV], int64_t rows, int64_t cols, const float* row_scale,
                       float* dst, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const float s = row_scale != nullptr ? row_scale[r] : 1.0f;
    float* d = dst + r * stride;
    if (cols == kNR) {
      for (int v = 0; v < kNV; ++v) vstore(d + v * kVec, acc[r][v] * s);
    } else {
      float tmp[kNR];
      for (int v = 0; v < kNV; ++v) vstore(tmp + v * kVec, acc[r][v] * s);
      std::memcpy(d, tmp, static_cast<size_t>(cols) * sizeof(float));
    }
  }
}

}  // namespace

// Rows y_lo and y_hi of a mask as float32: straight from a float32 source, converted (and
// cached per row) from a float16 one. Only the rows the resize samples are ever read; with
// check, each is scanned for NaN/Inf when first fetched (it is in cache then), which replaces a
// scan of the whole array: the rows never sampled cannot change the result.
class MaskRows {
 public:
  MaskRows(const void* masks, DType dtype, int64_t offset, int64_t width, float* buffer, bool check)
      : masks_(masks), dtype_(dtype), offset_(offset), width_(width), buffer_(buffer), check_(check) {}
  const float* row(int64_t y, int slot) {
    const float* src = dtype_ == DType::F32 ? static_cast<const float*>(masks_) + offset_ + y * width_
                                            : buffer_ + slot * width_;
    if (cached_[slot] == y) return src;
    cached_[slot] = y;
    if (dtype_ != DType::F32) load_f32(masks_, dtype_, offset_ + y * width_, width_, buffer_ + slot * width_);
    if (check_) nonfinite_ |= any_nonfinite(src, width_);
    return src;
  }
  bool nonfinite() const { return nonfinite_; }

 private:
  static bool any_nonfinite(const float* x, int64_t n) {
    uint32_t bad = 0;
#pragma omp simd reduction(| : bad)
    for (int64_t i = 0; i < n; ++i) {
      uint32_t bits;
      std::memcpy(&bits, x + i, sizeof bits);
      bad |= (bits & 0x7f800000u) == 0x7f800000u;
    }
    return bad != 0;
  }

  const void* masks_;
  DType dtype_;
  int64_t offset_, width_;
  float* buffer_;
  bool check_;
  bool nonfinite_ = false;
  int64_t cached_[2] = {-1, -1};
};

// out[b, n, :] = mean of features[b, :, p] over the pixels p where the bilinearly resized mask
// logit is > threshold; zeros for an empty mask. Computed as a product of the binary masks
// [N x P] with the transposed features [P x C], scaled by 1 / count per mask, every feature
// load shared by kMR masks. A tile of kMR masks only visits the pixels inside at least one of
// them, so sparse masks (most FC-CLIP queries) cost little.
void mask_pool(const MaskPoolArgs& a) {
  const int64_t C = a.channels, H = a.height, W = a.width, P = H * W;
  const int64_t N = a.num_masks, mh = a.mask_height, mw = a.mask_width, mP = mh * mw;
  const int64_t row_tiles = (N + kMR - 1) / kMR, panels = (C + kNR - 1) / kNR;
  const int threads = thread_count();
  // Per row tile: the active pixels (inside any of its masks) and, for each, the kMR indicators.
  Scratch packed_masks(static_cast<size_t>(row_tiles * P * kMR) * sizeof(float));
  Scratch active_pixels(static_cast<size_t>(row_tiles * P) * sizeof(int32_t));
  Scratch active_counts(static_cast<size_t>(row_tiles) * sizeof(int64_t));
  Scratch inside_buf(static_cast<size_t>(threads * kMR * P));
  // features packed per column panel, pixel-major: panel[(j * P + p) * kNR + c] = f[j * kNR + c, p]
  Scratch packed_features(static_cast<size_t>(panels * P * kNR) * sizeof(float));
  Scratch inverse_counts(static_cast<size_t>(row_tiles * kMR) * sizeof(float));
  Scratch row_buf(static_cast<size_t>(threads * 2 * mw) * sizeof(float));
  constexpr int64_t kBlock = 32;  // pixels per transposition block
  Scratch staging(static_cast<size_t>(threads * kNR * kBlock) * sizeof(float));
  float* am = packed_masks.as<float>();
  int32_t* active = active_pixels.as<int32_t>();
  int64_t* active_n = active_counts.as<int64_t>();
  float* bf = packed_features.as<float>();
  float* inv = inverse_counts.as<float>();
  const int64_t blocks = (P + kBlock - 1) / kBlock;

  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t feature_offset = b * C * P;
    const int64_t mask_offset = b * N * mP;

#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t j = 0; j < panels; ++j) {
      for (int64_t blk = 0; blk < blocks; ++blk) {
        float* stage = staging.as<float>() + static_cast<int64_t>(thread_id()) * kNR * kBlock;
        const int64_t c0 = j * kNR, cn = imin(kNR, C - c0);
        const int64_t p0 = blk * kBlock, pn = imin(kBlock, P - p0);
        // float32 rows are read in place, float16 ones converted into the stage first; the block
        // (kNR x kBlock floats each way) stays in L1 while it is transposed.
        const float* src = stage;
        int64_t stride = kBlock;
        if (a.features_dtype == DType::F32) {
          src = static_cast<const float*>(a.features) + feature_offset + c0 * P + p0;
          stride = P;
        } else {
          for (int64_t c = 0; c < cn; ++c)
            load_f32(a.features, a.features_dtype, feature_offset + (c0 + c) * P + p0, pn, stage + c * kBlock);
        }
        float* dst = bf + (j * P + p0) * kNR;
        const int64_t cn16 = cn / 16 * 16, pn16 = pn / 16 * 16;
        for (int64_t c = 0; c < cn16; c += 16)
          for (int64_t p = 0; p < pn16; p += 16) transpose16(src + c * stride + p, stride, dst + p * kNR + c, kNR);
        for (int64_t c = 0; c < cn; ++c)  // the edges
          for (int64_t p = c < cn16 ? pn16 : 0; p < pn; ++p) dst[p * kNR + c] = src[c * stride + p];
        for (int64_t p = 0; p < pn; ++p)
          for (int64_t c = cn; c < kNR; ++c) dst[p * kNR + c] = 0.0f;
      }
    }

#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t t = 0; t < row_tiles; ++t) {
      uint8_t* inside = inside_buf.as<uint8_t>() + static_cast<int64_t>(thread_id()) * kMR * P;
      float* rows = row_buf.as<float>() + static_cast<int64_t>(thread_id()) * 2 * mw;
      for (int r = 0; r < kMR; ++r) {
        const int64_t n = t * kMR + r;
        uint8_t* in = inside + r * P;
        if (n >= N) {  // padding rows of the last tile
          std::memset(in, 0, static_cast<size_t>(P));
          inv[n] = 0.0f;
          continue;
        }
        MaskRows mask(a.masks, a.masks_dtype, mask_offset + n * mP, mw, rows, a.check_masks);
        int64_t count = 0;
        for (int64_t y = 0; y < H; ++y) {
          const float* r0 = mask.row(a.y_lo[y], 0);
          const float* r1 = mask.row(a.y_hi[y], 1);
          const float wy1 = a.y_w[y], wy0 = 1.0f - wy1;
          for (int64_t x = 0; x < W; ++x) {
            const int64_t x0 = a.x_lo[x], x1 = a.x_hi[x];
            const float wx1 = a.x_w[x], wx0 = 1.0f - wx1;
            // Same association as PyTorch's bilinear kernel.
            const float v = wy0 * (wx0 * r0[x0] + wx1 * r0[x1]) + wy1 * (wx0 * r1[x0] + wx1 * r1[x1]);
            in[y * W + x] = v > a.threshold ? 1 : 0;
            count += v > a.threshold;
          }
        }
        inv[n] = count > 0 ? 1.0f / static_cast<float>(count) : 0.0f;
        if (mask.nonfinite()) a.nonfinite_masks[b * N + n] = 1;
      }
      float* packed = am + t * P * kMR;
      int32_t* list = active + t * P;
      int64_t m = 0;
      for (int64_t p = 0; p < P; ++p) {
        int any = 0;
        for (int r = 0; r < kMR; ++r) any |= inside[r * P + p];
        if (!any) continue;
        for (int r = 0; r < kMR; ++r) packed[m * kMR + r] = static_cast<float>(inside[r * P + p]);
        list[m++] = static_cast<int32_t>(p);
      }
      active_n[t] = m;
    }

#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t j = 0; j < panels; ++j) {
      for (int64_t t = 0; t < row_tiles; ++t) {
        vfloat acc[kMR][kNV];
        tile_product(am + t * P * kMR, bf + j * P * kNR, active + t * P, active_n[t], acc);
        store_tile(acc, imin(kMR, N - t * kMR), imin(kNR, C - j * kNR), inv + t * kMR,
                   a.out + (b * N + t * kMR) * C + j * kNR, C);
      }
    }
  }
}

namespace {
// The [C x N] x [N x P] product of semantic inference, scores[c, p] = sum_n probs[n, c] *
// sigmoid(logits[n, p]), whose right factor is made on the fly one panel of kNR pixels at a time,
// so the sigmoid of every logit is computed exactly once and the panel stays in cache while all
// class tiles pass over it. Each tile of scores goes to on_tile(thread, tile, acc, p0, valid).
template <typename OnTile>
void semantic_panels(const SemanticMergeArgs& a, OnTile on_tile) {
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
    const int thread = thread_id();
    float* panel = panel_buf.as<float>() + static_cast<int64_t>(thread) * N * kNR;
#pragma omp for schedule(static)
    for (int64_t j = 0; j < panels; ++j) {
      const int64_t p0 = j * kNR, valid = imin(kNR, P - p0);
      for (int64_t n = 0; n < N; ++n) {
        float* s = panel + n * kNR;
        const float* src = static_cast<const float*>(a.logits) + n * P + p0;
        if (a.logits_dtype != DType::F32 || valid < kNR) {  // stage: convert and/or pad
          load_f32(a.logits, a.logits_dtype, n * P + p0, valid, s);
          for (int64_t i = valid; i < kNR; ++i) s[i] = 0.0f;
          src = s;
        }
        for (int v = 0; v < kNV; ++v) vstore(s + v * kVec, vsigmoid(vload(src + v * kVec)));
        for (int64_t i = valid; i < kNR; ++i) s[i] = 0.0f;  // padding contributes nothing
      }
      for (int64_t t = 0; t < tiles; ++t) {
        vfloat acc[kMR][kNV];
        tile_product(packed + t * N * kMR, panel, nullptr, N, acc);
        on_tile(thread, t, acc, p0, valid);
      }
    }
  }
}
}  // namespace

void semantic_merge(const SemanticMergeArgs& a) {
  const int64_t C = a.num_classes, P = a.pixels;
  semantic_panels(a, [&](int, int64_t t, const vfloat(&acc)[kMR][kNV], int64_t p0, int64_t valid) {
    store_tile(acc, imin(kMR, C - t * kMR), valid, nullptr, a.out + t * kMR * P + p0, P);
  });
}

// labels[p] = argmax_c scores[c, p] (the first of equals) without storing the [C, P] scores:
// each panel's running best is updated tile by tile, classes in increasing order.
void semantic_argmax(const SemanticMergeArgs& a, int32_t* labels) {
  const int64_t C = a.num_classes;
  const int threads = thread_count();
  Scratch best_buf(static_cast<size_t>(threads * kNR) * sizeof(float));
  Scratch index_buf(static_cast<size_t>(threads * kNR) * sizeof(int32_t));
  const int64_t tiles = (C + kMR - 1) / kMR;
  semantic_panels(a, [&](int thread, int64_t t, const vfloat(&acc)[kMR][kNV], int64_t p0, int64_t valid) {
    float* best = best_buf.as<float>() + static_cast<int64_t>(thread) * kNR;
    int32_t* index = index_buf.as<int32_t>() + static_cast<int64_t>(thread) * kNR;
    if (t == 0)
      for (int i = 0; i < kNR; ++i) best[i] = -__builtin_inff(), index[i] = 0;
    const int64_t rows = imin(kMR, C - t * kMR);
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t c = static_cast<int32_t>(t * kMR + r);
      for (int v = 0; v < kNV; ++v)
        for (int l = 0; l < kVec; ++l) {
          const int i = v * kVec + l;
          if (acc[r][v][l] > best[i]) best[i] = acc[r][v][l], index[i] = c;
        }
    }
    if (t == tiles - 1) std::memcpy(labels + p0, index, static_cast<size_t>(valid) * sizeof(int32_t));
  });
}

// out[n] = rows @ x[n] @ cols^T with banded rows and cols (a bilinear resize composed with a
// crop and another resize has a handful of non-zeros per row): first each used source row is
// resampled along the width (tmp = x[n] @ cols^T, a gather of a few taps per output column),
// then each output row is a short weighted sum of tmp rows, vectorised along the width.
void resample(const ResampleArgs& a) {
  const int64_t h = a.h, w = a.w, W = a.out_w;
  const int threads = thread_count();
  Scratch tmp_buf(static_cast<size_t>(threads) * static_cast<size_t>(h * W) * sizeof(float));
  Scratch row_buf(static_cast<size_t>(threads) * static_cast<size_t>(w) * sizeof(float));
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t n = 0; n < a.n; ++n) {
    float* tmp = tmp_buf.as<float>() + static_cast<int64_t>(thread_id()) * h * W;
    float* src = row_buf.as<float>() + static_cast<int64_t>(thread_id()) * w;
    for (int64_t j = a.used_lo; j < a.used_hi; ++j) {
      load_f32(a.x, a.x_dtype, (n * h + j) * w, w, src);
      float* t = tmp + j * W;
      for (int64_t x = 0; x < W; ++x) {
        const float* c = a.cols + x * w;
        float acc = 0.0f;
        for (int64_t s = a.col_lo[x]; s < a.col_hi[x]; ++s) acc += c[s] * src[s];
        t[x] = acc;
      }
    }
    for (int64_t i = 0; i < a.out_h; ++i) {
      float* o = a.out + (n * a.out_h + i) * W;
      const float* r = a.rows + i * h;
      int64_t x = 0;
      for (; x + kVec <= W; x += kVec) {
        vfloat acc = vfloat{};
        for (int64_t j = a.row_lo[i]; j < a.row_hi[i]; ++j) acc += r[j] * vload(tmp + j * W + x);
        vstore(o + x, acc);
      }
      for (; x < W; ++x) {
        float acc = 0.0f;
        for (int64_t j = a.row_lo[i]; j < a.row_hi[i]; ++j) acc += r[j] * tmp[j * W + x];
        o[x] = acc;
      }
    }
  }
}

// Mask2Former's pixel assignment: over a tile of pixels, every kept query's mask row passes once
// (contiguous, in cache), updating the running best score x sigmoid(logit) and its query.
// sigmoid is 0 where exp(-logit) overflows float32, as NumPy's float32 computation gives.
void panoptic_owner(const PanopticOwnerArgs& a) {
  constexpr int64_t kTile = 1024;
  const int64_t K = a.k, P = a.pixels, tiles = (P + kTile - 1) / kTile;
  const int threads = thread_count();
  Scratch counts_buf(static_cast<size_t>(threads * K) * sizeof(int64_t));
  Scratch row_buf(static_cast<size_t>(threads * kTile) * sizeof(float));
  std::memset(counts_buf.as<int64_t>(), 0, static_cast<size_t>(threads * K) * sizeof(int64_t));
  const vfloat overflow = vsplat(-88.72283f);  // exp(-x) is inf in float32 below this
#pragma omp parallel
  {
    int64_t* counts = counts_buf.as<int64_t>() + static_cast<int64_t>(thread_id()) * K;
    float* stage = row_buf.as<float>() + static_cast<int64_t>(thread_id()) * kTile;
    alignas(64) float best[kTile];
    alignas(64) float own_logit[kTile];
    int32_t owner[kTile];
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t p0 = t * kTile, pn = imin(kTile, P - p0);
      for (int64_t p = 0; p < pn; ++p) best[p] = -1.0f, owner[p] = 0, own_logit[p] = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t offset = a.queries[k] * P + p0;
        const float* m = static_cast<const float*>(a.masks) + offset;
        if (a.masks_dtype != DType::F32) {
          load_f32(a.masks, a.masks_dtype, offset, pn, stage);
          m = stage;
        }
        const float score = a.scores[k];
        const vfloat vscore = vsplat(score);
        int64_t inside = 0, p = 0;
        vint inside_v = vint{};
        vint vk;
        for (int l = 0; l < kVec; ++l) vk[l] = static_cast<int32_t>(k);
        for (; p + kVec <= pn; p += kVec) {
          const vfloat x = vload(m + p);
          const vfloat v = vscore * (x < overflow ? vfloat{} : vsigmoid(x));
          const vfloat b = vload(best + p);
          const vint better = v > b;  // lanes: -1 where true
          vint o;
          std::memcpy(&o, owner + p, sizeof o);
          o = better ? vk : o;
          std::memcpy(owner + p, &o, sizeof o);
          vstore(best + p, better ? v : b);
          vstore(own_logit + p, better ? x : vload(own_logit + p));
          inside_v -= (x >= vfloat{});
        }
        for (int l = 0; l < kVec; ++l) inside += inside_v[l];
        for (; p < pn; ++p) {
          const float x = m[p];
          const float sig = x < -88.72283f ? 0.0f : 1.0f / (1.0f + vexp(vsplat(-x))[0]);
          const float v = score * sig;
          if (v > best[p]) best[p] = v, owner[p] = static_cast<int32_t>(k), own_logit[p] = x;
          inside += x >= 0.0f;
        }
        counts[k] += inside;
      }
      for (int64_t p = 0; p < pn; ++p) {
        a.owner[p0 + p] = owner[p];
        a.own[p0 + p] = own_logit[p] >= 0.0f ? 1 : 0;
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    int64_t total = 0;
    for (int th = 0; th < threads; ++th) total += counts_buf.as<int64_t>()[th * K + k];
    a.mask_pixels[k] = total;
  }
}

}  // namespace knnclip::cpu::KNNCLIP_ISA_NAMESPACE
