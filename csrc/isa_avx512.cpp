// Hot kernels built for avx512; CMakeLists.txt gives this file its own -m flags.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "dispatch.h"

namespace sparsify {
namespace isa_avx512 {

#define SPARSIFY_SIMD_AVX512 1
#define SPARSIFY_GEMM_R 8
#ifndef SPARSIFY_SPMM_NV
#define SPARSIFY_SPMM_NV 4
#define SPARSIFY_SPMM_U 2
#endif
// one accumulator set on rows of under 10 nonzeros (kSpmmShort): ResNet-50's 64 -> 256 1x1
// layers at 90% (6 a row) 9-12% faster, all its 90% layers 1% (Xeon, 1 thread); PERM's 4-steps
// measured the same as the plain loop here and stay off
#ifndef SPARSIFY_SPMM_SHORT
#define SPARSIFY_SPMM_SHORT 10
#endif
#define SPARSIFY_GEMM_TP 6  // narrow tiles: 3 zmm (6 panels) x 8 columns of accumulators
#define SPARSIFY_GEMM_TC 8
#define SPARSIFY_ISA_NAME "avx512"
#include "simd.h"
#include "kernels_impl.h"

}  // namespace isa_avx512

const KernelTable& table_avx512() { return isa_avx512::kTable; }

}  // namespace sparsify
