// Bulk float16 -> float32 conversion (the database's fp16 scan decodes blocks with it).
#pragma once

#include <cstddef>
#include <cstdint>

namespace knnclip {

// out[i] = float(src[i]) for i < n, exactly (every float16 is a float32). F16C when the CPU has it.
// Parallel over OpenMP threads when n is large.
void f16_to_f32(const uint16_t* src, float* out, size_t n);

}  // namespace knnclip
