// CUDA kernels of knnclip._C, behind a plain C++ interface (no CUDA headers) so the bindings
// compile with the host compiler. Only built with the CUDA kernels (CMake's KNNCLIP_CUDA).
//
// Each device's work is queued on a non-blocking stream of the ops' own (not serialised with the
// legacy default stream, where other libraries' work may be queued); inputs are ordered after
// their producers' streams (CAI v3 `stream`, or DLPack's `stream=` argument, which the bindings
// prefer whenever an array's interface names no stream). Every op waits for its work before it
// returns, so its results are ready on any stream and a kernel fault is raised by the op that
// caused it; with `check` it also reads its validation flags (one 4-byte copy), so bad input
// raises before the result is handed back. Scratch and output memory come from a private
// stream-ordered pool per device that keeps at most 256 MiB between calls.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "common.h"

namespace knnclip::cuda {

int device_count();                 // 0 when there is no driver or no device
std::string device_problem();       // why no device is usable ("" when one is)
std::string runtime_version();      // the CUDA runtime this module was built with, "13.0"
int pointer_device(const void* p);  // the device that owns p, -1 if p is not device memory

void* device_malloc(size_t bytes, int device);
void device_free(void* p, int device) noexcept;
void copy_to_host(void* dst, const void* src, size_t bytes, int device);
// Orders the ops' stream after the work queued so far on `stream` (a producer's CAI v3 stream:
// 1 legacy default, 2 per-thread default, else a handle).
void order_after_stream(uintptr_t stream, int device);
// The ops' stream on `device`, as a handle for DLPack's `stream=` (made on first use).
uintptr_t stream_handle(int device);

// Each returns ErrorFlag bits (0 when check is false). Pointers are device memory on `device`.
uint32_t mask_pool(const void* features, DType features_dtype, const void* masks,
                   DType masks_dtype, int64_t batch, int64_t channels, int64_t height,
                   int64_t width, int64_t num_masks, int64_t mask_height, int64_t mask_width,
                   float threshold, float* out, int device, bool check);

uint32_t semantic_merge(const void* probs, DType probs_dtype, const void* logits,
                        DType logits_dtype, int64_t num_masks, int64_t num_classes,
                        int64_t pixels, float* out, int device, bool check);

uint32_t retrieval_probs(const void* sims, DType sims_dtype, const int64_t* labels, int64_t rows,
                         int64_t k, int64_t num_classes, float tau, float* out, int device,
                         bool check);

uint32_t fuse(const void* p_base, DType base_dtype, const void* p_ret, DType ret_dtype,
              int64_t rows, int64_t num_classes, float threshold, float lam, float* out,
              int device, bool check);

uint32_t resample(const void* x, DType x_dtype, int64_t n, int64_t h, int64_t w, const float* rows, int64_t out_h,
                  const float* cols, int64_t out_w, float* out, int device, bool check);

uint32_t semantic_argmax(const void* probs, DType probs_dtype, const void* logits, DType logits_dtype,
                         int64_t num_masks, int64_t num_classes, int64_t pixels, int32_t* labels, int device,
                         bool check);

// queries are checked against num_masks on the device (kLabelOutOfRange) before anything reads them.
uint32_t panoptic_owner(const float* scores, const void* masks, DType masks_dtype, const int64_t* queries, int64_t k,
                        int64_t num_masks, int64_t pixels, int32_t* owner, uint8_t* own, int64_t* mask_pixels,
                        int device, bool check);

}  // namespace knnclip::cuda
