// Hot kernels built for portable; CMakeLists.txt gives this file its own -m flags.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "dispatch.h"

namespace sparsify {
namespace isa_portable {

#define SPARSIFY_SIMD_SSE2 1
#define SPARSIFY_GEMM_R 4
#ifndef SPARSIFY_SPMM_NV
#define SPARSIFY_SPMM_NV 4
#define SPARSIFY_SPMM_U 2
#endif
#define SPARSIFY_GEMM_TP 1  // narrow tiles: 1 panels x 6 columns of accumulators
#define SPARSIFY_GEMM_TC 6
#define SPARSIFY_ISA_NAME "portable"
#include "simd.h"
#include "kernels_impl.h"

}  // namespace isa_portable

const KernelTable& table_portable() { return isa_portable::kTable; }

}  // namespace sparsify
