// See host_build.h: the loops of the CUDA kernels with their bodies, on the host.
#include "kernels/host_build.h"

#include <vector>

#include "kernels/bodies.h"

namespace knnclip::kernels::host {

void resample(const float* x, int64_t n, int64_t h, int64_t w, const float* rows, int64_t out_h, const float* cols,
              int64_t out_w, float* out) {
  std::vector<int64_t> row_lo(out_h), row_hi(out_h), col_lo(out_w), col_hi(out_w);
  for (int64_t y = 0; y < out_h; ++y) band(rows + y * h, h, row_lo[y], row_hi[y]);
  for (int64_t c = 0; c < out_w; ++c) band(cols + c * w, w, col_lo[c], col_hi[c]);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t y = 0; y < out_h; ++y)
      for (int64_t c = 0; c < out_w; ++c)
        out[(i * out_h + y) * out_w + c] =
            resample_at(x + i * h * w, w, rows + y * h, row_lo[y], row_hi[y], cols + c * w, col_lo[c], col_hi[c]);
}

void semantic_argmax(const float* probs, const float* logits, int64_t n, int64_t c, int64_t pixels, int32_t* labels) {
  // The kernel reads precomputed sigmoids; so does this loop.
  std::vector<float> sig(static_cast<size_t>(n * pixels));
  for (int64_t i = 0; i < n * pixels; ++i) sig[i] = sigmoid(logits[i]);
  for (int64_t p = 0; p < pixels; ++p)
    labels[p] = semantic_argmax_at(probs, n, c, [&](int64_t q) { return sig[q * pixels + p]; });
}

void panoptic_owner(const float* scores, const float* masks, const int64_t* queries, int64_t k, int64_t pixels,
                    int32_t* owner, uint8_t* own, int64_t* mask_pixels) {
  for (int64_t p = 0; p < pixels; ++p) {
    bool mine = false;
    panoptic_at(scores, k, [&](int64_t j) { return masks[queries[j] * pixels + p]; }, owner[p], mine);
    own[p] = mine ? 1 : 0;
  }
  for (int64_t j = 0; j < k; ++j) {
    int64_t inside = 0;
    for (int64_t p = 0; p < pixels; ++p) inside += masks[queries[j] * pixels + p] >= 0.0f;
    mask_pixels[j] = inside;
  }
}

uint32_t retrieval_probs(const float* sims, const int64_t* labels, int64_t rows, int64_t k, int64_t classes, float tau,
                         float* out) {
  uint32_t flags = 0;
  for (int64_t i = 0; i < rows * classes; ++i) out[i] = 0.0f;
  for (int64_t r = 0; r < rows; ++r)
    flags |= retrieval_row(sims + r * k, labels + r * k, k, classes, 1.0f / tau, out + r * classes);
  return flags;
}

void fuse(const float* base, const float* ret, int64_t rows, int64_t classes, float threshold, float lam, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    float best = negative_infinity();
    for (int64_t c = 0; c < classes; ++c) best = fmaxf(best, ret[r * classes + c]);
    const bool use = classes > 0 && best >= threshold;
    for (int64_t c = 0; c < classes; ++c)
      out[r * classes + c] = fuse_at(base[r * classes + c], ret[r * classes + c], use, lam);
  }
}

void binarize(const float* masks, int64_t n, int64_t mh, int64_t mw, int64_t height, int64_t width, float threshold,
              uint8_t* out) {
  const float sy = static_cast<float>(mh) / static_cast<float>(height);
  const float sx = static_cast<float>(mw) / static_cast<float>(width);
  for (int64_t m = 0; m < n; ++m)
    for (int64_t y = 0; y < height; ++y)
      for (int64_t x = 0; x < width; ++x)
        out[(m * height + y) * width + x] =
            bilinear_at(masks + m * mh * mw, mh, mw, y, x, sy, sx) > threshold ? 1 : 0;
}

}  // namespace knnclip::kernels::host
