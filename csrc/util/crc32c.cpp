// CRC-32C with the reflected polynomial 0x82F63B78 (iSCSI, ext4, LevelDB use the same code).
// Register convention: the running value is kept inverted, so crc32c_extend(0, ...) of nothing is 0
// and extending in pieces equals one pass over the whole buffer.
#include "util/crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <nmmintrin.h>
#define KNNCLIP_CRC32C_HW 1
#endif

namespace knnclip {
namespace {

constexpr uint32_t kPolynomial = 0x82F63B78u;

// tables[j][b]: CRC of byte b followed by j zero bytes, for slicing-by-8.
using Tables = std::array<std::array<uint32_t, 256>, 8>;

Tables make_tables() {
  Tables t{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t c = b;
    for (int bit = 0; bit < 8; ++bit) c = (c >> 1) ^ ((c & 1u) ? kPolynomial : 0u);
    t[0][b] = c;
  }
  for (int j = 1; j < 8; ++j)
    for (uint32_t b = 0; b < 256; ++b) t[j][b] = (t[j - 1][b] >> 8) ^ t[0][t[j - 1][b] & 0xFFu];
  return t;
}

const Tables& tables() {
  static const Tables t = make_tables();
  return t;
}

uint32_t extend_table(uint32_t crc, const unsigned char* p, size_t n) {
  const Tables& t = tables();
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);  // the table layout assumes little-endian words
    word ^= crc;
    crc = t[7][word & 0xFF] ^ t[6][(word >> 8) & 0xFF] ^ t[5][(word >> 16) & 0xFF] ^ t[4][(word >> 24) & 0xFF] ^
          t[3][(word >> 32) & 0xFF] ^ t[2][(word >> 40) & 0xFF] ^ t[1][(word >> 48) & 0xFF] ^ t[0][word >> 56];
  }
  for (; n > 0; --n, ++p) crc = (crc >> 8) ^ t[0][(crc ^ *p) & 0xFFu];
  return crc;
}

#ifdef KNNCLIP_CRC32C_HW
__attribute__((target("sse4.2"))) uint32_t extend_hw(uint32_t crc, const unsigned char* p, size_t n) {
  uint64_t c = crc;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);
    c = _mm_crc32_u64(c, word);
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  for (; n > 0; --n, ++p) c32 = _mm_crc32_u8(c32, *p);
  return c32;
}

bool has_hw() {
  static const bool yes = __builtin_cpu_supports("sse4.2");
  return yes;
}
#endif

}  // namespace

uint32_t crc32c_extend(uint32_t crc, const void* data, size_t size) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint32_t c = ~crc;
#ifdef KNNCLIP_CRC32C_HW
  if (has_hw()) return ~extend_hw(c, p, size);
#endif
  return ~extend_table(c, p, size);
}

uint32_t crc32c_extend_table(uint32_t crc, const void* data, size_t size) {
  return ~extend_table(~crc, static_cast<const unsigned char*>(data), size);
}

const char* crc32c_implementation() {
#ifdef KNNCLIP_CRC32C_HW
  if (has_hw()) return "sse4.2";
#endif
  return "table";
}

}  // namespace knnclip
