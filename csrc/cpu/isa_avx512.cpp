// The hot CPU kernels compiled for the avx512 instruction set (see isa_impl.h).
#if !defined(__AVX512F__)
#error "isa_avx512.cpp must be compiled with -mavx512f"
#endif
#define KNNCLIP_ISA_NAMESPACE avx512
#include "cpu/isa_impl.h"
