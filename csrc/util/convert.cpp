#include "util/convert.h"

#include "common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define KNNCLIP_F16C 1
#endif

namespace knnclip {
namespace {

constexpr size_t kChunk = 1 << 16;  // elements per task: big enough to amortise the fork

void convert_scalar(const uint16_t* src, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = half_bits_to_float(src[i]);
}

#ifdef KNNCLIP_F16C
__attribute__((target("avx,f16c"))) void convert_f16c(const uint16_t* src, float* out, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  convert_scalar(src + i, out + i, n - i);
}

bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return yes;
}
#endif

void convert_range(const uint16_t* src, float* out, size_t n) {
#ifdef KNNCLIP_F16C
  if (has_f16c()) return convert_f16c(src, out, n);
#endif
  convert_scalar(src, out, n);
}

}  // namespace

void f16_to_f32(const uint16_t* src, float* out, size_t n) {
  const long long chunks = static_cast<long long>((n + kChunk - 1) / kChunk);
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (long long c = 0; c < chunks; ++c) {
    const size_t begin = static_cast<size_t>(c) * kChunk;
    const size_t count = begin + kChunk <= n ? kChunk : n - begin;
    convert_range(src + begin, out + begin, count);
  }
}

}  // namespace knnclip
