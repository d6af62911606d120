// CPU kernels of knnclip._C. Inputs are C-contiguous host buffers that the bindings validated
// (shapes, dtypes, finiteness); outputs are float32.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common.h"

namespace knnclip::cpu {

// Arguments of the instruction-set specific kernels (see isa_impl.h).
struct MaskPoolArgs {
  const void* features;  // [B, C, H, W]
  DType features_dtype;
  const void* masks;  // [B, N, h, w] logits
  DType masks_dtype;
  int64_t batch, channels, height, width, num_masks, mask_height, mask_width;
  float threshold;
  // With check_masks, nonfinite_masks[b * N + n] is set to 1 when a mask row the resize reads
  // holds NaN or Inf (the caller zeroes it).
  bool check_masks;
  uint8_t* nonfinite_masks;
  // Bilinear resize tables (align_corners=False), one entry per output row / column:
  // value = (1 - w) * src[lo] + w * src[hi].
  const int64_t* y_lo;
  const int64_t* y_hi;
  const float* y_w;
  const int64_t* x_lo;
  const int64_t* x_hi;
  const float* x_w;
  float* out;  // [B, N, C]
};

struct SemanticMergeArgs {
  const void* probs;  // [N, C]
  DType probs_dtype;
  const void* logits;  // [N, P] with P = H * W
  DType logits_dtype;
  int64_t num_masks, num_classes, pixels;
  float* out;  // [C, P]
};

struct ResampleArgs {
  const void* x;  // [N, h, w]
  DType x_dtype;
  int64_t n, h, w, out_h, out_w;
  const float* rows;  // [out_h, h]; row i is zero outside [row_lo[i], row_hi[i])
  const int64_t* row_lo;
  const int64_t* row_hi;
  const float* cols;  // [out_w, w]; row x is zero outside [col_lo[x], col_hi[x])
  const int64_t* col_lo;
  const int64_t* col_hi;
  int64_t used_lo, used_hi;  // the source rows any output row reads
  float* out;                // [N, out_h, out_w]
};

struct PanopticOwnerArgs {
  const float* scores;    // [K]
  const void* masks;      // [Q, P] logits
  DType masks_dtype;
  const int64_t* queries;  // [K] rows of masks
  int64_t k, pixels;
  int32_t* owner;         // [P] in [0, K)
  uint8_t* own;           // [P]
  int64_t* mask_pixels;   // [K]
};

#define KNNCLIP_DECLARE_ISA(ns)                        \
  namespace ns {                                       \
  void mask_pool(const MaskPoolArgs& args);            \
  void semantic_merge(const SemanticMergeArgs& args);  \
  void semantic_argmax(const SemanticMergeArgs& args, int32_t* labels); \
  void resample(const ResampleArgs& args);             \
  void panoptic_owner(const PanopticOwnerArgs& args);  \
  }
KNNCLIP_DECLARE_ISA(generic)
KNNCLIP_DECLARE_ISA(avx2)
KNNCLIP_DECLARE_ISA(avx512)
#undef KNNCLIP_DECLARE_ISA

// ---- entry points used by the bindings --------------------------------------------------------

// With check, returns kNonFinite when a mask row the resize samples holds NaN or Inf (the rows it
// never reads cannot change the result and are not scanned); features are the caller's to check.
uint32_t mask_pool(const void* features, DType features_dtype, const void* masks, DType masks_dtype,
                   int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t num_masks,
                   int64_t mask_height, int64_t mask_width, float threshold, bool check, float* out);

void semantic_merge(const void* probs, DType probs_dtype, const void* logits, DType logits_dtype,
                    int64_t num_masks, int64_t num_classes, int64_t pixels, float* out);

// labels[p] = argmax_c of semantic_merge's out[c, p] (first of equals), without storing out.
void semantic_argmax(const void* probs, DType probs_dtype, const void* logits, DType logits_dtype,
                     int64_t num_masks, int64_t num_classes, int64_t pixels, int32_t* labels);

// out[n] = rows @ x[n] @ cols^T, visiting only each row's band of non-zeros (bilinear resizes).
void resample(const void* x, DType x_dtype, int64_t n, int64_t h, int64_t w, const float* rows, int64_t out_h,
              const float* cols, int64_t out_w, float* out);

// owner[p] = argmax_k scores[k] * sigmoid(masks[queries[k], p]) (first of equals),
// own[p] = masks[queries[owner[p]], p] >= 0, mask_pixels[k] = #{p : masks[queries[k], p] >= 0}.
void panoptic_owner(const float* scores, const void* masks, DType masks_dtype, const int64_t* queries, int64_t k,
                    int64_t pixels, int32_t* owner, uint8_t* own, int64_t* mask_pixels);

void retrieval_probs(const void* sims, DType sims_dtype, const int64_t* labels, int64_t rows,
                     int64_t k, int64_t num_classes, float tau, float* out);

void fuse(const void* p_base, DType base_dtype, const void* p_ret, DType ret_dtype, int64_t rows,
          int64_t num_classes, float threshold, float lam, float* out);

// Validation passes: return ErrorFlag bits (0 = fine).
uint32_t check_finite(const void* data, DType dtype, int64_t count);
// Labels must be -1 or in [0, num_classes); similarities of real neighbours must be finite.
uint32_t check_neighbours(const void* sims, DType sims_dtype, const int64_t* labels, int64_t count,
                          int64_t num_classes);

// Instruction-set selection (the kernels are compiled once per set, chosen at run time).
std::vector<std::string> compiled_isas();
std::vector<std::string> supported_isas();  // compiled and usable on this CPU
std::string active_isa();
void set_isa(const std::string& name);  // throws std::invalid_argument if not supported

int max_threads();

}  // namespace knnclip::cpu
