/* One instantiation of the type-generic kernels (kernels_tmpl.h) for float and for double.  Include with
 * LM_SFX_F32(name) / LM_SFX_F64(name) defined to the names of this copy (and LM_MV_WIDE in the AVX-512
 * copy: its libmvec-calling VM steps use 512-bit vectors, see LM_UNARY_MV) (kernels.h: the baseline copy;
 * kernels_isa.h: one per dispatched ISA, inside its `#pragma GCC target` region).  No include guard: it is
 * meant to be included several times.  LM_FN(f) names the element type's variant of math function f
 * (expf / exp): the VM's expressions (format.py) call functions through it. */
#define LM_T float
#define LM_SFX(name) LM_SFX_F32(name)
#define LM_FN(name) name##f
#define LM_EXP expf
#define LM_LOG logf
#define LM_SQRT sqrtf
#if defined(LM_MV_WIDE)
#define LM_SIMD_MV _Pragma("omp simd simdlen(16)")
#else
#define LM_SIMD_MV _Pragma("omp simd")
#endif
#include "kernels_tmpl.h"
#undef LM_SIMD_MV
#undef LM_T
#undef LM_SFX
#undef LM_FN
#undef LM_EXP
#undef LM_LOG
#undef LM_SQRT

#define LM_T double
#define LM_SFX(name) LM_SFX_F64(name)
#define LM_FN(name) name
#define LM_EXP exp
#define LM_LOG log
#define LM_SQRT sqrt
#if defined(LM_MV_WIDE)
#define LM_SIMD_MV _Pragma("omp simd simdlen(8)")
#else
#define LM_SIMD_MV _Pragma("omp simd")
#endif
#include "kernels_tmpl.h"
#undef LM_SIMD_MV
#undef LM_T
#undef LM_SFX
#undef LM_FN
#undef LM_EXP
#undef LM_LOG
#undef LM_SQRT
