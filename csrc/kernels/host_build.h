// The host build of the CUDA kernels' per-element bodies (kernels/bodies.h): the same loops the
// kernels run, one element at a time on the CPU, for the tests (knnclip._C.device_bodies).
// float32 inputs, C-contiguous, validated by the caller.
#pragma once

#include <cstdint>

namespace knnclip::kernels::host {

// out[n] = rows @ x[n] @ cols^T, each element over the bands of its row and column.
void resample(const float* x, int64_t n, int64_t h, int64_t w, const float* rows, int64_t out_h, const float* cols,
              int64_t out_w, float* out);

// labels[p] = argmax_c sum_n probs[n, c] * sigmoid(logits[n, p]) (first of equals).
void semantic_argmax(const float* probs, const float* logits, int64_t n, int64_t c, int64_t pixels, int32_t* labels);

// As the panoptic_owner op: owner, own and each kept query's mask pixels.
void panoptic_owner(const float* scores, const float* masks, const int64_t* queries, int64_t k, int64_t pixels,
                    int32_t* owner, uint8_t* own, int64_t* mask_pixels);

// As the retrieval_probs op (out [rows, classes] zeroed here); returns ErrorFlag bits.
uint32_t retrieval_probs(const float* sims, const int64_t* labels, int64_t rows, int64_t k, int64_t classes, float tau,
                         float* out);

// As the fuse op: rows whose max p_ret >= threshold blend, the others keep p_base.
void fuse(const float* base, const float* ret, int64_t rows, int64_t classes, float threshold, float lam, float* out);

// As mask_pool's first step: masks [N, mh, mw] resized bilinearly to H x W and thresholded.
void binarize(const float* masks, int64_t n, int64_t mh, int64_t mw, int64_t height, int64_t width, float threshold,
              uint8_t* out);

}  // namespace knnclip::kernels::host
