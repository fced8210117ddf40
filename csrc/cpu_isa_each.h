// Includes FASTVID_ISA_SOURCE once per ISA path (see cpu_isa.h): inside it FASTVID_ISA is the
// namespace to open (isa_avx512, isa_avx2, isa_baseline) and FASTVID_VEC_BYTES the vector width.
// No include guard: each kernel file includes it once.
#include "cpu_isa.h"

#ifdef FASTVID_ISA_X86
FASTVID_ISA_PUSH_avx512
#define FASTVID_ISA isa_avx512
#define FASTVID_VEC_BYTES 64
#include FASTVID_ISA_SOURCE
#undef FASTVID_ISA
#undef FASTVID_VEC_BYTES
FASTVID_ISA_POP

FASTVID_ISA_PUSH_avx2
#define FASTVID_ISA isa_avx2
#define FASTVID_VEC_BYTES 32
#include FASTVID_ISA_SOURCE
#undef FASTVID_ISA
#undef FASTVID_VEC_BYTES
FASTVID_ISA_POP
#endif

#define FASTVID_ISA isa_baseline
#define FASTVID_VEC_BYTES 16
#include FASTVID_ISA_SOURCE
#undef FASTVID_ISA
#undef FASTVID_VEC_BYTES
