// The hot CPU kernels compiled for the avx2 instruction set (see isa_impl.h).
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "isa_avx2.cpp must be compiled with -mavx2 -mfma -mf16c"
#endif
#define KNNCLIP_ISA_NAMESPACE avx2
#include "cpu/isa_impl.h"
