// Kernel table shared by every ISA build of the hot loops, and the one place that picks it.
//
// The hot kernels are compiled three times (isa_avx512.cpp, isa_avx2.cpp, isa_portable.cpp),
// each with its own -m flags and its own namespace, so a CPU without AVX-512 never executes an
// AVX-512 instruction. dispatch.cpp picks one table once at import (SPARSIFY_ISA overrides).
#pragma once

#include <cmath>
#include <cstdint>

namespace sparsify {

// Activation codes shared with kernels.py / reference.parse_act. Gelu is the exact (erf) form
// of ONNX Gelu / torch.nn.GELU(), not the tanh approximation. Silu is x * sigmoid(x) (torch's
// export writes it as Sigmoid and Mul); HardSigmoid is clip(lo * x + hi, 0, 1) with lo = alpha
// and hi = beta, and HardSwish x times that (ONNX HardSwish: alpha 1/6, beta 1/2).
enum Act : int {
  kActNone = 0, kActRelu = 1, kActClip = 2, kActGelu = 3, kActSigmoid = 4, kActSilu = 5,
  kActHardSigmoid = 6, kActHardSwish = 7, kActLast = kActHardSwish
};

// The activation on one float, for scalar epilogues (relu arrives as clip to [0, inf)).
inline float act_scalar(float v, int act, float lo, float hi) {
  switch (act) {
    case kActNone: return v;
    case kActGelu: return 0.5f * v * std::erfc(-v * 0.70710678118654752f);
    case kActSigmoid: return 1.f / (1.f + std::exp(-v));
    case kActSilu: return v / (1.f + std::exp(-v));
    case kActHardSigmoid:
    case kActHardSwish: {
      const float t = lo * v + hi;
      const float h = t > 0.f ? (t < 1.f ? t : 1.f) : (t != t ? t : 0.f);
      return act == kActHardSwish ? v * h : h;
    }
    default: return v < lo ? lo : (v > hi ? hi : v);
  }
}

// What happens to an output tile after the reduction: y = act(acc + bias[row] + res).
// Pointers are already offset to the tile's first row / element; null means absent.
struct Epilogue {
  const float* bias = nullptr;  // one value per output row
  const float* res = nullptr;   // same layout (and leading dimension) as the output
  int64_t ld_res = 0;
  int act = kActNone;
  float lo = 0.f, hi = 0.f;
};

// Dense weight panels hold kGemmMR consecutive rows interleaved along K: [panel][k][kGemmMR].
constexpr int kGemmMR = 8;

// Modes of a dense tile: first K block starts from zero, last applies the epilogue.
// kTileChanVec (conv_tile_t only, with first and last, no residual): column c's rows go to
// y[c * ldy + r] as they lie in the accumulators, untransposed, in whole row vectors (ldy a
// multiple of conv_t_panels * kGemmMR; the rows past `rows` of the last vector hold garbage).
enum TileMode : int { kTileFirst = 1, kTileLast = 2, kTileChanVec = 4 };

// A sparse weight laid out for the kernel: rows in their own order and K cut into blocks of
// `kb` so one packed X tile (kb x spmm_nt floats, in scratch) stays in L2. (Rows sorted by
// nonzero count, for a predictable inner-loop exit, wrote the output and read the residual in
// random row order: 1.3-1.5x slower into an output buffer not in cache, as every engine run's
// is, and no faster on a hot one.)
struct SpmmArgs {
  const int32_t* row_ptr;  // [nblocks][rows + 1], indexes off / val
  int64_t rp_stride;       // rows + 1
  // (col - block start) * spmm_nt: where the nonzero reads the tile. 16 bits, as a tile holds
  // at most 64 KB (kSpmmTileBytes): 6 bytes a nonzero instead of 8, the stream that every
  // column tile reads again.
  const uint16_t* off;
  const float* val;
  int64_t row0;            // the weight row that is row 0 of y, bias and res (a group's first)
  int64_t nblocks, kb, K;
  const int64_t* koff;     // X(k, n) = x[koff[k] + n * cs]
  const float* x;
  int64_t cs;              // 1, or K when X arrives transposed (linear's [T, K] input)
  // Tiles packed once by the driver and shared by all threads, [n / spmm_nt][K][spmm_nt] (zero
  // padded; only with n0 = 0), or null: each call then packs its own. (Reading X in place
  // instead of packing was measured slower: the strided rows span many pages and lines.)
  const float* packed = nullptr;
  int64_t packed_ld = 0;  // floats per tile in `packed` (0: K * spmm_nt)
  // Rows per block: 1, or 4 for 4x1 blocks (SparseLayout::rb): row_ptr then indexes blocks by
  // row group (rp_stride = M / 4 + 1), val holds four weights a block, and [m0, m1) and row0
  // are multiples of 4.
  int rb = 1;
  // Vectors per column tile: the layout's (SparseLayout::tile_cols / simd_width), 0 or the
  // default kSpmmNV (spmm_nt columns), or 1 (the narrow layout).
  int tile_nv = 0;
};

// One flat signature per kernel family (XNNPACK style); drivers own threading and blocking.
struct KernelTable {
  const char* name;
  int simd_width;  // floats per vector
  int gemm_nr;     // columns of a full packed-X panel
  int spmm_nt;     // columns of a sparse-kernel tile

  // f32 sparse x dense, Y = W X over weight rows [m0, m1) and columns [n0, n1); see SpmmArgs.
  void (*spmm)(const SpmmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* y,
               int64_t ldy, const Epilogue& ep, float* scratch);

  // Packs X[k][n] = x[koff[k] + n * cs] for k < kc, n < nc into panels of gemm_nr columns
  // (the last one rounded up to the vector width, zero padded): panel j at xp + j * gemm_nr * kc.
  void (*gemm_pack_x)(const float* x, const int64_t* koff, int64_t cs, int64_t kc, int64_t nc,
                      float* xp);

  // One tile: rows [0, rows) (rows <= kGemmMR) of a weight panel times one packed-X panel of
  // width `width` (a multiple of simd_width, <= gemm_nr), writing `cols` columns of y.
  void (*gemm_tile)(int64_t kc, const float* wp, const float* xp, int width, int rows, int cols,
                    float* y, int64_t ldy, int mode, const Epilogue& ep);

  // Dense matrix-vector product over whole weight panels [p0, p1): out[(p - p0) * kGemmMR + r] =
  // sum_k panel[k][r] * x[k], with xexp[k * kGemmMR + r] = x[k] (and 32 zero floats after). The
  // GEMM's panel tiles would use one lane in 16 when X has a single column.
  void (*gemv)(const float* wp, int64_t p0, int64_t p1, int64_t K, const float* xexp, float* out);

  // Narrow outputs (few columns, e.g. 7x7 planes): vectors run along the rows instead, so no
  // column is padded to the vector width. A tile is up to gemm_t_rows rows (whole weight panels,
  // panel p at wp + p * pstride) times up to gemm_t_cols columns over a K block of kc, from X
  // packed by gemm_pack_xt as [kc][gemm_t_cols] (xp[k * gemm_t_cols + c] = x[koff[k] + c * cs]);
  // mode as for gemm_tile (the first block stores, later ones add, the last applies ep).
  int gemm_t_rows;
  int gemm_t_cols;
  void (*gemm_pack_xt)(const float* x, const int64_t* koff, int64_t cs, int64_t K, int nc,
                       float* xp);
  void (*gemm_tile_t)(int64_t kc, int64_t pstride, const float* wp, const float* xp, int rows,
                      int cols, float* y, int64_t ldy, int mode, const Epilogue& ep);
  // The same tile reading X in place: column c of K row k is x[koff[k] + c] (a conv's phase
  // planes at one output row, so no column is packed or wasted; see conv.cpp's rowwise path).
  // Its weights come as row vectors of conv_t_panels panels, [vector][k][conv_t_panels *
  // kGemmMR] (DenseWeight::vector_panels), pstride floats apart.
  int conv_t_panels;
  // Its widest tile: up to conv_t_rows rows when it has at most conv_t_wide_cols columns (else
  // gemm_t_rows x gemm_t_cols).
  int conv_t_rows;
  int conv_t_wide_cols;
  void (*conv_tile_t)(int64_t kc, int64_t pstride, const float* wp, const float* x,
                      const int64_t* koff, int rows, int cols, float* y, int64_t ldy, int mode,
                      const Epilogue& ep);

  // Depthwise conv on simd_width channels at once (for small planes, where per-plane work is too
  // little to fill vectors): in is the padded input, channels interleaved per pixel
  // [hp][wp][simd_width]; wv holds each tap's channel weights [taps][simd_width] followed by the
  // bias; out is [oh * ow][simd_width].
  void (*dw_channels)(const float* in, int64_t wp, const float* wv, int kh, int kw, int sh,
                      int sw, int dh, int dw, int64_t oh, int64_t ow, float* out,
                      const Epilogue& ep);

  // Windowed plane ops on a padded input stored as column phases (see conv.cpp): output (oy, ox)
  // reduces x[oy * row_step + ox + tap_off[t]] over the taps t.
  // op 0 = weighted sum with w[t] (depthwise conv), 1 = max, 2 = sum.
  void (*window_plane)(int op, const float* x, const int64_t* tap_off, int taps, int64_t row_step,
                       const float* w, int64_t oh, int64_t ow, float* y, const Epilogue& ep);

  // 3x3 max pool with stride 2 and dilation 1, one output row of ow: rows[0, nrows) are the
  // window's rows inside the image (w floats each), pl the left pad; vm is scratch for 2 ow + 1
  // floats.
  void (*max_pool3s2_row)(const float* const* rows, int nrows, int64_t w, int pl, int64_t ow,
                          float* vm, float* y);
  // The same on channel vectors (kTileChanVec's layout): pixel x of window row r is the ldc
  // floats at rows[r] + x * ldc (ldc a multiple of simd_width), the left pad 1; writes pooled
  // pixel i's ldc floats to y + i * ldc.
  void (*max_pool3s2_cv)(const float* const* rows, int nrows, int64_t w, int64_t ldc, int64_t ow,
                         float* y);

  // y = act(a * scale + shift + b) over n floats (act as in Epilogue; b may be null, y may be a
  // or b).
  void (*act_row)(const float* a, const float* b, int64_t n, float scale, float shift, int act,
                  float lo, float hi, float* y);

  // Row-wise ops over the last axis of one row of n floats (y may be x).
  void (*softmax_row)(const float* x, int64_t n, float* y);
  // y = (x - mean) / sqrt(var + eps) * scale + bias; bias may be null.
  void (*layer_norm_row)(const float* x, int64_t n, const float* scale, const float* bias,
                         float eps, float* y);
};

const KernelTable& kernels();            // the active table
const char* active_isa();                // "avx512" | "avx2" | "portable"
bool set_isa(const char* name);          // false when this CPU cannot run it
bool isa_supported(const char* name);

const KernelTable& table_avx512();
const KernelTable& table_avx2();
const KernelTable& table_portable();

// The thread count kernels plan for: 1 inside a chunk of parallel_for (which runs nested work
// inline), so a layer run per image on each thread does not split itself for threads it will
// not get (extra X packings, partial sums to add).
int num_threads();
void set_num_threads(int n);
bool in_parallel_task();  // parallel.cpp

}  // namespace sparsify
