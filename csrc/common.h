// Types shared by the CPU kernels, the CUDA kernels and the bindings. No pybind11 here.
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>

namespace knnclip {

enum class DType : int { F32 = 0, F16 = 1, I64 = 2 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::I64: return "int64";
  }
  return "?";
}

// The element types an op returns (float32 scores, int32 labels, bool flags, int64 counts).
enum class Element : int { F32 = 0, I32 = 1, Bool = 2, I64 = 3 };

// IEEE 754 binary16 -> binary32, exact for every input (subnormals, Inf, NaN included).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else {
    // zero or subnormal: mantissa * 2^-24 is exact in float32
    float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &magnitude, sizeof bits);
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// Bit-level finiteness tests: exact, and they vectorise (no floating-point compare of NaN).
inline bool f32_bits_finite(uint32_t bits) { return (bits & 0x7f800000u) != 0x7f800000u; }
inline bool f16_bits_finite(uint16_t bits) { return (bits & 0x7c00u) != 0x7c00u; }

#ifdef __CUDACC__
#define KNNCLIP_HOST_DEVICE __host__ __device__
#else
#define KNNCLIP_HOST_DEVICE
#endif

// The softmax weight of a neighbour whose similarity is `s` in a row whose largest is `best`:
// exp((s - best) / tau), computed as (s - best) * inv_tau so that it never overflows: the
// difference is <= 0 and finite for finite similarities, any size; a tau so small that 1/tau is
// Inf (or a float32 tau that underflowed to 0) leaves the nearest neighbours weight 1 and the
// others 0 instead of NaN.
KNNCLIP_HOST_DEVICE inline float neighbour_weight(float s, float best, float inv_tau) {
  const float d = s - best;
  return d == 0.0f ? 1.0f : expf(d * inv_tau);
}

// Error flags a kernel can raise; the bindings turn them into Python exceptions.
enum ErrorFlag : uint32_t {
  kNonFinite = 1u << 0,
  kLabelOutOfRange = 1u << 1,
};

}  // namespace knnclip
