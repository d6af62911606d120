// The hot CPU kernels compiled for the generic instruction set (see isa_impl.h).
#define KNNCLIP_ISA_NAMESPACE generic
#include "cpu/isa_impl.h"
