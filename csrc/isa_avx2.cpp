// Hot kernels built for avx2; CMakeLists.txt gives this file its own -m flags.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "dispatch.h"

namespace sparsify {
namespace isa_avx2 {

#define SPARSIFY_SIMD_AVX2 1
#define SPARSIFY_GEMM_R 4
#ifndef SPARSIFY_SPMM_NV
#define SPARSIFY_SPMM_NV 4
#define SPARSIFY_SPMM_U 2
#endif
#ifndef SPARSIFY_SPMM_SHORT
#define SPARSIFY_SPMM_SHORT 10
#endif
#ifndef SPARSIFY_SPMM_PERM
#define SPARSIFY_SPMM_PERM 1
#endif
#define SPARSIFY_GEMM_TP 2  // narrow tiles: 2 panels x 6 columns of accumulators
#define SPARSIFY_GEMM_TC 6
#define SPARSIFY_ISA_NAME "avx2"
#include "simd.h"
#include "kernels_impl.h"

}  // namespace isa_avx2

const KernelTable& table_avx2() { return isa_avx2::kTable; }

}  // namespace sparsify
