// CUDA kernels of knnclip._C, behind a plain C++ interface (no CUDA headers) so the bindings
// compile with the host compiler. Only built when CMake found a CUDA compiler.
//
// All work is queued on the legacy default stream, which orders itself with the default streams
// of PyTorch and CuPy. Every op waits for its work before it returns, so a kernel fault is raised
// by the op that caused it; with `check` it also reads its validation flags (one 4-byte copy), so
// bad input raises before the result is handed back. Scratch and output memory come from the
// stream-ordered pool, which keeps what it holds between calls (release threshold at its maximum).
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
// Orders the ops' stream after the work queued so far on `stream` (a producer's side stream).
void order_after_stream(uintptr_t stream, int device);

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

}  // namespace knnclip::cuda
