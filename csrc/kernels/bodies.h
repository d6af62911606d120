// The per-element bodies of the CUDA kernels, compiled twice: by nvcc into the kernels
// (cuda/ops_cuda.cu) and by the host compiler into the host build of the same loops
// (kernels/host_build.cpp, exposed as knnclip._C.device_bodies), so the CPU tests run the code the
// GPU runs beside the float64 references. Plain functions of their inputs: no shared memory, no
// atomics, no thread indices; the kernels decide which element each thread computes.
#pragma once

#include <cstdint>

#include <cmath>

#include "common.h"

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define KNNCLIP_HD __host__ __device__ __forceinline__
#else
#define KNNCLIP_HD inline
#endif

namespace knnclip::kernels {

KNNCLIP_HD float load(float x) { return x; }
#ifdef __CUDACC__
KNNCLIP_HD float load(__half x) { return __half2float(x); }
#endif

KNNCLIP_HD float negative_infinity() { return -INFINITY; }

// The logistic function as the CPU kernels compute it: 0 where exp(-x) overflows float32.
KNNCLIP_HD float sigmoid(float x) { return x < -88.72283f ? 0.0f : 1.0f / (1.0f + expf(-x)); }

// PyTorch's bilinear source coordinate (align_corners=False) for output index `dst` of a resize
// from `in` samples with `scale` = in / out, rounded step by step (no fused multiply-add) so
// host and device pick the same source samples: value = (1 - w) * src[lo] + w * src[hi].
KNNCLIP_HD void source_index(int64_t dst, int64_t in, float scale, int64_t& lo, int64_t& hi, float& w) {
#ifdef __CUDA_ARCH__
  float src = __fsub_rn(__fmul_rn(scale, __fadd_rn(static_cast<float>(dst), 0.5f)), 0.5f);
#else
  volatile float shifted = static_cast<float>(dst) + 0.5f;  // volatile: no contraction into an FMA
  volatile float scaled = scale * shifted;
  float src = scaled - 0.5f;
#endif
  if (src < 0.0f) src = 0.0f;
  int64_t i0 = static_cast<int64_t>(floorf(src));
  if (i0 > in - 1) i0 = in - 1;
  lo = i0;
  hi = i0 + (i0 < in - 1 ? 1 : 0);
  w = fminf(fmaxf(src - static_cast<float>(i0), 0.0f), 1.0f);
}

// Mask `src` [mh, mw] resized bilinearly (align_corners=False) to an output whose pixel (y, x)
// this is; sy = mh / H and sx = mw / W.
template <class T>
KNNCLIP_HD float bilinear_at(const T* src, int64_t mh, int64_t mw, int64_t y, int64_t x, float sy, float sx) {
  int64_t y0, y1, x0, x1;
  float wy, wx;
  source_index(y, mh, sy, y0, y1, wy);
  source_index(x, mw, sx, x0, x1, wx);
  return (1.0f - wy) * ((1.0f - wx) * load(src[y0 * mw + x0]) + wx * load(src[y0 * mw + x1])) +
         wy * ((1.0f - wx) * load(src[y1 * mw + x0]) + wx * load(src[y1 * mw + x1]));
}

// The band [lo, hi) of a row's non-zeros (lo == hi for a row of zeros).
KNNCLIP_HD void band(const float* row, int64_t n, int64_t& lo, int64_t& hi) {
  lo = 0;
  while (lo < n && row[lo] == 0.0f) ++lo;
  hi = n;
  while (hi > lo && row[hi - 1] == 0.0f) --hi;
}

// One output element of a separable resize, out[y, x] = rows[y] @ src @ cols[x]^T, over the
// bands of rows[y] ([r0, r1)) and cols[x] ([c0, c1)) only.
template <class T>
KNNCLIP_HD float resample_at(const T* src, int64_t w, const float* rows_y, int64_t r0, int64_t r1, const float* cols_x,
                             int64_t c0, int64_t c1) {
  float acc = 0.0f;
  for (int64_t i = r0; i < r1; ++i) {
    float inner = 0.0f;
    for (int64_t j = c0; j < c1; ++j) inner += cols_x[j] * load(src[i * w + j]);
    acc += rows_y[i] * inner;
  }
  return acc;
}

// FC-CLIP's semantic decision at one pixel: argmax_c sum_n probs[n, c] * sig(n), first of equals,
// where sig(n) is the sigmoid of mask n's logit there.
template <class TP, class Sig>
KNNCLIP_HD int32_t semantic_argmax_at(const TP* probs, int64_t N, int64_t C, Sig sig) {
  int32_t best_c = 0;
  float best = negative_infinity();
  for (int64_t c = 0; c < C; ++c) {
    float acc = 0.0f;
    for (int64_t n = 0; n < N; ++n) acc += load(probs[n * C + c]) * sig(n);
    if (acc > best) best = acc, best_c = static_cast<int32_t>(c);
  }
  return best_c;
}

// Mask2Former's pixel assignment at one pixel: the kept query k with the highest
// scores[k] * sigmoid(logit(k)) (first of equals), and whether its own logit is >= 0.
template <class Logit>
KNNCLIP_HD void panoptic_at(const float* scores, int64_t K, Logit logit, int32_t& owner, bool& own) {
  float best = -1.0f, own_logit = 0.0f;
  owner = 0;
  for (int64_t k = 0; k < K; ++k) {
    const float x = logit(k);
    const float v = scores[k] * sigmoid(x);
    if (v > best) best = v, owner = static_cast<int32_t>(k), own_logit = x;
  }
  own = own_logit >= 0.0f;
}

// One row of retrieval_probs: the softmax over the row's real neighbours (labels != -1) of
// sims / tau, summed per class into `out` (zeroed by the caller). Returns ErrorFlag bits: a label
// outside [-1, C) or a non-finite similarity of a real neighbour leaves the row untouched.
template <class T>
KNNCLIP_HD uint32_t retrieval_row(const T* s, const int64_t* labels, int64_t k, int64_t C, float inv_tau,
                                  float* out) {
  float best = negative_infinity();
  for (int64_t j = 0; j < k; ++j) {
    if (labels[j] == -1) continue;
    if (labels[j] < -1 || labels[j] >= C) return kLabelOutOfRange;
    const float v = load(s[j]);
    if (!(v - v == 0.0f)) return kNonFinite;  // NaN or Inf
    best = fmaxf(best, v);
  }
  if (best == negative_infinity()) return 0;
  float total = 0.0f;
  for (int64_t j = 0; j < k; ++j)
    if (labels[j] >= 0) total += neighbour_weight(load(s[j]), best, inv_tau);
  for (int64_t j = 0; j < k; ++j)
    if (labels[j] >= 0) out[labels[j]] += neighbour_weight(load(s[j]), best, inv_tau) / total;
  return 0;
}

// The fused class probability of one element: lam * ret + (1 - lam) * base where the row's
// retrieval confidence reached the threshold (`use`), else base.
KNNCLIP_HD float fuse_at(float base, float ret, bool use, float lam) {
  return use ? lam * ret + (1.0f - lam) * base : base;
}

}  // namespace knnclip::kernels
