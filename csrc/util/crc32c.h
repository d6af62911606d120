// CRC-32C (Castagnoli), the checksum of the database's write-ahead log records.
#pragma once

#include <cstddef>
#include <cstdint>

namespace knnclip {

// Extends `crc` (the CRC-32C of the bytes before `data`, 0 for none) over `size` more bytes.
// Uses the SSE4.2 crc32 instruction when the CPU has it, a slicing-by-8 table otherwise.
uint32_t crc32c_extend(uint32_t crc, const void* data, size_t size);

// The portable table implementation alone (tests compare it with the hardware one).
uint32_t crc32c_extend_table(uint32_t crc, const void* data, size_t size);

// Which implementation crc32c_extend uses on this CPU: "sse4.2" or "table".
const char* crc32c_implementation();

}  // namespace knnclip
