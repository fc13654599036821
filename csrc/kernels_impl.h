// The hot loops, written once over the Simd traits and compiled once per ISA.
// Included by isa_*.cpp inside a per-ISA namespace after Simd is defined; define
// SPARSIFY_GEMM_R (rows per dense micro-tile), SPARSIFY_GEMM_TP / SPARSIFY_GEMM_TC (panels and
// columns of a narrow tile) and SPARSIFY_ISA_NAME first.
// No standard-library templates here: an inline template instantiated under -mavx512f could be
// merged by the linker into the portable build.

using V = Simd::V;
constexpr int W = Simd::W;
constexpr int kSpmmNV = SPARSIFY_SPMM_NV;  // vectors per sparse tile
constexpr int kSpmmU = SPARSIFY_SPMM_U;
// The loop choices of spmm_tile, each on where its isa_*.cpp opts in (AVX2 both, measured on
// Zen 3; AVX-512 the short-row one, measured on a Xeon); the portable build keeps the plain loop.
#ifndef SPARSIFY_SPMM_PERM
#define SPARSIFY_SPMM_PERM 0
#endif
#ifndef SPARSIFY_SPMM_SHORT
#define SPARSIFY_SPMM_SHORT 0
#endif
constexpr bool kSpmmPerm = SPARSIFY_SPMM_PERM;  // see spmm_tile
// Rows averaging at least this many nonzeros take PERM's 4-steps (Zen 3: ResNet-50's 90% layers
// 5-8% faster; on rows of ~6 the extra remainder steps made K=64 layers 7-15% slower).
constexpr int kSpmmPermMin = 16;
// Rows averaging fewer nonzeros than this run one accumulator set: the second set's remainder
// step mispredicts on most rows of a few nonzeros (Zen 3, rows of 5-10 nonzeros: 1.2-1.5x
// faster with one set; from ~11 on two sets win). 0 keeps two sets everywhere.
constexpr int kSpmmShort = SPARSIFY_SPMM_SHORT;
constexpr int kGemmNV = 3;   // vectors per packed-X panel: 48 columns with AVX-512
constexpr int kGemmR = SPARSIFY_GEMM_R;
constexpr int kWinNV = 4;

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// dst[0, NV * W) = src[0, n) then zeros; inline vectors instead of a memcpy call per short row
// (packing issues one per K row per tile, and the call overhead showed up in the profile).
template <int NV>
static inline void copy_row(const float* src, int n, float* dst) {
  if (n == NV * W) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) Simd::store(dst + v * W, Simd::load(src + v * W));
    return;
  }
  for (int v = 0; v < NV; ++v) {
    const int left = n - v * W;
    const V x = left >= W ? Simd::load(src + v * W)
                          : left > 0 ? Simd::loadn(src + v * W, left) : Simd::zero();
    Simd::store(dst + v * W, x);
  }
}

// e^x: x = n ln2 + r with |r| <= ln2 / 2, e^r from its Taylor series to r^7 (truncation below
// 6e-9 relative), times 2^n. Clamped so that 2^n stays a normal float.
static inline V vexp(V x) {
  x = Simd::min(Simd::set1(88.3f), Simd::max(Simd::set1(-87.3f), x));
  const V n = Simd::round(Simd::mul(x, Simd::set1(1.44269504088896341f)));
  // ln 2 in two parts: n * hi is exact for the n that occur, so r keeps its low bits
  V r = Simd::fma(n, Simd::set1(-0.693359375f), x);
  r = Simd::fma(n, Simd::set1(2.12194440054690583e-4f), r);
  V p = Simd::set1(1.f / 5040.f);
  p = Simd::fma(p, r, Simd::set1(1.f / 720.f));
  p = Simd::fma(p, r, Simd::set1(1.f / 120.f));
  p = Simd::fma(p, r, Simd::set1(1.f / 24.f));
  p = Simd::fma(p, r, Simd::set1(1.f / 6.f));
  p = Simd::fma(p, r, Simd::set1(0.5f));
  p = Simd::fma(p, r, Simd::set1(1.f));
  p = Simd::fma(p, r, Simd::set1(1.f));
  return Simd::scale2(p, n);
}

// Exact GELU x * Phi(x) written as relu(x) - |x| / 2 * erfc(|x| / sqrt 2), so the tail is a
// small product instead of a difference of nearly equal terms. erfc by Abramowitz & Stegun
// 7.1.26 (absolute error 1.5e-7), the formula ops_nn.erf_ uses too. |x| is capped at 16 for the
// erfc term (it is below 1e-37 there) so that +-inf gives inf / 0 rather than inf * 0.
// N vectors in lockstep, each step for all of them before the next: one vector's GELU is a chain
// of ~35 dependent operations, so an epilogue that finished its vectors one after another
// waited on latency (~23 cycles a vector after BERT's first FFN layer, ~30% less this way).
template <int N>
static inline void gelu_n(V* x) {
  V s[N], a[N], t[N], p[N];
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    s[i] = Simd::min(Simd::set1(16.f), Simd::abs(x[i]));  // NaN stays NaN: min takes it second
    a[i] = Simd::mul(s[i], Simd::set1(0.70710678118654752f));
    t[i] = Simd::div(Simd::set1(1.f), Simd::fma(a[i], Simd::set1(0.3275911f), Simd::set1(1.f)));
  }
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    p[i] = Simd::fma(Simd::set1(1.061405429f), t[i], Simd::set1(-1.453152027f));
    p[i] = Simd::fma(p[i], t[i], Simd::set1(1.421413741f));
    p[i] = Simd::fma(p[i], t[i], Simd::set1(-0.284496736f));
    p[i] = Simd::fma(p[i], t[i], Simd::set1(0.254829592f));
    p[i] = Simd::mul(p[i], t[i]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    const V erfc = Simd::mul(p[i], vexp(Simd::mul(Simd::sub(Simd::zero(), a[i]), a[i])));
    const V h = Simd::mul(Simd::mul(Simd::set1(0.5f), s[i]), erfc);
    x[i] = Simd::sub(Simd::max(Simd::zero(), x[i]), h);
  }
}

// 1 / (1 + e^-x) on N vectors. e^-x saturates at e^88.3 (vexp's clamp), where the quotient is
// 4.5e-39; taking 5e-39 off (and flooring at 0) makes that exactly 0, as the unclamped
// exponential would, so silu(-inf) = -inf * 0 = NaN like the Sigmoid-and-Mul graph it replaces.
template <int N>
static inline void sigmoid_n(const V* x, V* s) {
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    const V e = vexp(Simd::sub(Simd::zero(), x[i]));
    s[i] = Simd::div(Simd::set1(1.f), Simd::add(Simd::set1(1.f), e));
    s[i] = Simd::max(Simd::zero(), Simd::sub(s[i], Simd::set1(5e-39f)));
  }
}

// Sigmoid, SiLU and the hard activations, out of line: inlined next to GELU, they made GCC stop
// inlining activate_n into the kernels, whose relu epilogues then paid a call and spilled
// their accumulators.
template <int N>
__attribute__((noinline)) static void activate_other(V* v, int act, V lo, V hi) {
  if (act == kActSigmoid || act == kActSilu) {
    V s[N];
    sigmoid_n<N>(v, s);
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) v[i] = act == kActSilu ? Simd::mul(v[i], s[i]) : s[i];
  } else if (act == kActHardSigmoid || act == kActHardSwish) {
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) {
      const V h = Simd::min(Simd::set1(1.f), Simd::max(Simd::zero(), Simd::fma(lo, v[i], hi)));
      v[i] = act == kActHardSwish ? Simd::mul(v[i], h) : h;
    }
  }
}

// The activation on N vectors; lo/hi already hold (0, inf) for relu, and min/max take the value
// second so NaN propagates.
template <int N>
__attribute__((always_inline)) static inline void activate_n(V* v, int act, V lo, V hi) {
  if (act == kActNone) return;
  if (act == kActRelu || act == kActClip) {
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) v[i] = Simd::min(hi, Simd::max(lo, v[i]));
    return;
  }
  if (act == kActGelu) return gelu_n<N>(v);  // inline, as before: BERT's FFN epilogues
  activate_other<N>(v, act, lo, hi);
}

static inline V activate(V v, int act, V lo, V hi) {
  activate_n<1>(&v, act, lo, hi);
  return v;
}

// ---------------------------------------------------------------------------------------------
// One nonzero: its weight times one row of the packed X tile, into the NV accumulators a.
template <int NV>
static inline void spmm_step(const float* xr, V wv, V* a) {
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) a[v] = Simd::fma(wv, Simd::load(xr + v * W), a[v]);
}

// f32 SpMM, tile = NV vectors of one output row; each nonzero broadcasts its weight against the
// matching row of the packed X tile. U nonzeros go into U accumulator sets so consecutive FMAs
// do not wait on each other. With PERM, four nonzeros at a time take their weights from one
// 16-byte load (splatted by in-register shuffles) and their offsets from one 8-byte load,
// instead of a broadcast load and an index load each: the loop is bound by loads, not FMAs
// (see kSpmmPermMin for where it pays). Mode says whether this K block starts (from zero, or
// from the residual) or ends (bias, activation). The residual starts the sum rather than joining
// it at the end, so y may be the residual's own buffer: each element is read before it is
// written, and the partial sums of earlier K blocks, kept in y, no longer overwrite a residual
// still to be read.
template <int NV, int U, bool TAIL, bool PERM>
static void spmm_tile(const int32_t* rp, const uint16_t* off, const float* val, int64_t row0,
                      int64_t m0, int64_t m1, const float* x, int tail, float* y, int64_t ldy,
                      int mode, const Epilogue& ep) {
  const V lo = Simd::set1(ep.lo), hi = Simd::set1(ep.hi);
  const bool first = mode & kTileFirst, last = mode & kTileLast;
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t r = m - row0;
    float* yr = y + r * ldy;
    const float* from = first ? (ep.res ? ep.res + r * ep.ld_res : nullptr) : yr;
    V a[U][NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const bool part = TAIL && v == NV - 1;
      a[0][v] = !from ? Simd::zero() : part ? Simd::loadn(from + v * W, tail) : Simd::load(from + v * W);
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u) a[u][v] = Simd::zero();
    }
    int32_t j = rp[m];
    const int32_t e = rp[m + 1];
    if (PERM) for (; j + 4 <= e; j += 4) {
      const V w4 = Simd::bcast4(val + j);
      uint64_t o4;
      std::memcpy(&o4, off + j, sizeof o4);
      spmm_step<NV>(x + (o4 & 0xffffu), Simd::template lane<0>(w4), a[0]);
      spmm_step<NV>(x + ((o4 >> 16) & 0xffffu), Simd::template lane<1>(w4), a[1 % U]);
      spmm_step<NV>(x + ((o4 >> 32) & 0xffffu), Simd::template lane<2>(w4), a[2 % U]);
      spmm_step<NV>(x + (o4 >> 48), Simd::template lane<3>(w4), a[3 % U]);
    }
    for (; j + U <= e; j += U) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        const float* xr = x + off[j + u];
        const V wv = Simd::set1(val[j + u]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v)
          a[u][v] = Simd::fma(wv, Simd::load(xr + v * W), a[u][v]);
      }
    }
    for (; j < e; ++j) {
      const float* xr = x + off[j];
      const V wv = Simd::set1(val[j]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) a[0][v] = Simd::fma(wv, Simd::load(xr + v * W), a[0][v]);
    }
    const V bias = (last && ep.bias) ? Simd::set1(ep.bias[r]) : Simd::zero();
    V s[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      s[v] = a[0][v];
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u) s[v] = Simd::add(s[v], a[u][v]);
      if (last) s[v] = Simd::add(s[v], bias);
    }
    if (last) activate_n<NV>(s, ep.act, lo, hi);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if (TAIL && v == NV - 1) Simd::storen(yr + v * W, s[v], tail); else Simd::store(yr + v * W, s[v]);
    }
  }
}

// Column remainder: picks the tile with exactly nv vectors, the last one partial.
template <int NV, int U, bool PERM>
static void spmm_tail(int nv, const int32_t* rp, const uint16_t* off, const float* val,
                      int64_t row0, int64_t m0, int64_t m1, const float* x, int tail,
                      float* y, int64_t ldy, int mode, const Epilogue& ep) {
  if constexpr (NV >= 1) {
    if (nv == NV)
      spmm_tile<NV, U, true, PERM>(rp, off, val, row0, m0, m1, x, tail, y, ldy, mode, ep);
    else
      spmm_tail<NV - 1, U, PERM>(nv, rp, off, val, row0, m0, m1, x, tail, y, ldy, mode, ep);
  }
}

template <int TNV, int U, bool PERM>
static void spmm_block(int nv, const int32_t* rp, const uint16_t* off, const float* val,
                       int64_t row0, int64_t m0, int64_t m1, const float* x, int tail, float* y,
                       int64_t ldy, int mode, const Epilogue& ep) {
  if (nv == TNV && tail == W)
    spmm_tile<TNV, U, false, PERM>(rp, off, val, row0, m0, m1, x, tail, y, ldy, mode, ep);
  else
    spmm_tail<TNV, U, PERM>(nv, rp, off, val, row0, m0, m1, x, tail, y, ldy, mode, ep);
}

// f32 SpMM over 4x1 blocks (SparseLayout::rb == 4): each block is one column shared by four
// consecutive rows, so each vector of X loaded serves P rows' multiply-adds instead of one (the
// unstructured kernel above is bound by those loads). P rows per pass: all four with AVX-512's
// 32 registers, two passes of two with 16. off and val are per block (val: its four weights);
// rp indexes blocks by row group. Mode and the residual as in spmm_tile.
constexpr int kSpmm4Pass = W >= 16 ? 4 : 2;
template <int NV, bool TAIL>
static void spmm4_tile(const int32_t* rp, const uint16_t* off, const float* val, int64_t row0,
                       int64_t m0, int64_t m1, const float* x, int tail, float* y, int64_t ldy,
                       int mode, const Epilogue& ep) {
  constexpr int P = kSpmm4Pass;
  const V lo = Simd::set1(ep.lo), hi = Simd::set1(ep.hi);
  const bool first = mode & kTileFirst, last = mode & kTileLast;
  for (int64_t m = m0; m < m1; m += 4) {
    const int32_t j0 = rp[m / 4], e = rp[m / 4 + 1];
    for (int q = 0; q < 4; q += P) {
      V a[P][NV];
#pragma GCC unroll 4
      for (int i = 0; i < P; ++i) {
        const int64_t r = m + q + i - row0;
        const float* from = first ? (ep.res ? ep.res + r * ep.ld_res : nullptr) : y + r * ldy;
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
          const bool part = TAIL && v == NV - 1;
          a[i][v] = !from ? Simd::zero() : part ? Simd::loadn(from + v * W, tail) : Simd::load(from + v * W);
        }
      }
      for (int32_t j = j0; j < e; ++j) {
        const float* xr = x + off[j];
        const float* w4 = val + 4 * (int64_t)j + q;
        V xv[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) xv[v] = Simd::load(xr + v * W);
#pragma GCC unroll 4
        for (int i = 0; i < P; ++i) {
          const V wv = Simd::set1(w4[i]);
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) a[i][v] = Simd::fma(wv, xv[v], a[i][v]);
        }
      }
#pragma GCC unroll 4
      for (int i = 0; i < P; ++i) {
        const int64_t r = m + q + i - row0;
        float* yr = y + r * ldy;
        if (last) {
          const V bias = ep.bias ? Simd::set1(ep.bias[r]) : Simd::zero();
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) a[i][v] = Simd::add(a[i][v], bias);
          activate_n<NV>(a[i], ep.act, lo, hi);
        }
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
          if (TAIL && v == NV - 1) Simd::storen(yr + v * W, a[i][v], tail); else Simd::store(yr + v * W, a[i][v]);
        }
      }
    }
  }
}

template <int NV>
static void spmm4_tail(int nv, const int32_t* rp, const uint16_t* off, const float* val,
                       int64_t row0, int64_t m0, int64_t m1, const float* x, int tail,
                       float* y, int64_t ldy, int mode, const Epilogue& ep) {
  if constexpr (NV >= 1) {
    if (nv == NV)
      spmm4_tile<NV, true>(rp, off, val, row0, m0, m1, x, tail, y, ldy, mode, ep);
    else
      spmm4_tail<NV - 1>(nv, rp, off, val, row0, m0, m1, x, tail, y, ldy, mode, ep);
  }
}

template <int TNV>
static void spmm4_block(int nv, const int32_t* rp, const uint16_t* off, const float* val,
                        int64_t row0, int64_t m0, int64_t m1, const float* x, int tail, float* y,
                        int64_t ldy, int mode, const Epilogue& ep) {
  if (nv == TNV && tail == W)
    spmm4_tile<TNV, false>(rp, off, val, row0, m0, m1, x, tail, y, ldy, mode, ep);
  else
    spmm4_tail<TNV>(nv, rp, off, val, row0, m0, m1, x, tail, y, ldy, mode, ep);
}

// Column tiles outer, K blocks inner: the packed X block serves every row while in cache and the
// output tile stays in cache between K blocks. The block comes from the driver's shared packing
// when there is one, else it is packed here into `buf`; either way zero padded past `width` so
// partial vectors can be read whole.
template <int TNV>
static void spmm_t(const SpmmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* y,
                   int64_t ldy, const Epilogue& ep, float* buf) {
  constexpr int NT = TNV * W;
  Epilogue e = ep;
  for (int64_t n = n0; n < n1; n += NT) {
    const int64_t width = imin(NT, n1 - n);
    const int nv = (int)((width + W - 1) / W);
    const int tail = (int)(width - (int64_t)(nv - 1) * W);
    const float* shared =
        a.packed ? a.packed + (n / NT) * (a.packed_ld ? a.packed_ld : a.K * NT) : nullptr;
    e.res = ep.res ? ep.res + n : nullptr;
    for (int64_t b = 0; b < a.nblocks; ++b) {
      const int64_t k0 = b * a.kb, kc = imin(a.kb, a.K - k0);
      const float* xb = buf;
      if (shared) {
        xb = shared + k0 * NT;
      } else if (a.cs == 1) {
        const bool ahead = n + NT < n1;
        for (int64_t k = 0; k < kc; ++k) {
          const float* src = a.x + a.koff[k0 + k] + n;
          copy_row<NT / W>(src, (int)width, buf + k * NT);
          // the next tile's copy of this row: on its way to L2 while this tile computes
          if (ahead)
            for (int l = 0; l < NT; l += 16) __builtin_prefetch(src + NT + l, 0, 2);
        }
      } else {
        // transposed source: runs of 16 k along each memory row, so reads stay on one line
        for (int64_t kk = 0; kk < kc; kk += 16) {
          const int64_t ke = imin(kc, kk + 16);
          for (int64_t j = 0; j < width; ++j) {
            const float* src = a.x + (n + j) * a.cs;
            for (int64_t k = kk; k < ke; ++k) buf[k * NT + j] = src[a.koff[k0 + k]];
          }
          for (int64_t k = kk; k < ke; ++k)
            for (int64_t j = width; j < NT; ++j) buf[k * NT + j] = 0.f;
        }
      }
      const int32_t* rp = a.row_ptr + b * a.rp_stride;
      const int mode = (b == 0 ? kTileFirst : 0) | (b + 1 == a.nblocks ? kTileLast : 0);
      if (a.rb == 4) {
        spmm4_block<TNV>(nv, rp, a.off, a.val, a.row0, m0, m1, xb, tail, y + n, ldy, mode, e);
        continue;
      }
      // the loop by the average row length in this block over all the weight's rows (kSpmmPermMin,
      // kSpmmShort), not just [m0, m1): the loops add in different orders, so a choice made per
      // row range would make the result depend on how the threads split the rows
      const int64_t rows = a.rp_stride - 1, nnz = rp[rows] - rp[0];
      const auto block = kSpmmPerm && nnz >= kSpmmPermMin * rows ? &spmm_block<TNV, kSpmmU, true>
                         : nnz < kSpmmShort * rows               ? &spmm_block<TNV, 1, false>
                                                                 : &spmm_block<TNV, kSpmmU, false>;
      block(nv, rp, a.off, a.val, a.row0, m0, m1, xb, tail, y + n, ldy, mode, e);
    }
  }
}

// The tile width is the layout's (SpmmArgs::tile_nv): kSpmmNV vectors, or one for outputs of at
// most one vector of columns (a conv on a 4x4 or smaller plane), whose narrow layout packs a
// quarter of the floats and cuts K into blocks four times as long.
static void spmm(const SpmmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* y,
                 int64_t ldy, const Epilogue& ep, float* buf) {
  if (a.tile_nv == 1) spmm_t<1>(a, m0, m1, n0, n1, y, ldy, ep, buf);
  else spmm_t<kSpmmNV>(a, m0, m1, n0, n1, y, ldy, ep, buf);
}

// ---------------------------------------------------------------------------------------------
// Dense GEMM: X packed per call into panels [k][width]; W packed once into [k][kGemmMR].
static void gemm_pack_x(const float* x, const int64_t* koff, int64_t cs, int64_t kc, int64_t nc,
                        float* xp) {
  constexpr int NR = kGemmNV * W;
  int64_t j0 = 0;
  if (cs == 1) {
    // full panels row by row: each source row is read once, in order, instead of one short
    // piece per panel from kc rows a plane apart (which cost a TLB walk per piece)
    const int64_t full = nc / NR;
    for (int64_t k = 0; k < kc; ++k) {
      const float* src = x + koff[k];
      for (int64_t j = 0; j < full; ++j)
        copy_row<kGemmNV>(src + j * NR, NR, xp + (j * kc + k) * NR);
    }
    j0 = full * NR;
  }
  for (; j0 < nc; j0 += NR) {
    const int64_t w = imin(NR, nc - j0);
    const int64_t width = (w + W - 1) / W * W;
    float* dst = xp + j0 * kc;
    if (cs == 1 && width == NR) {
      for (int64_t k = 0; k < kc; ++k) copy_row<kGemmNV>(x + koff[k] + j0, (int)w, dst + k * NR);
    } else if (cs == 1) {
      for (int64_t k = 0; k < kc; ++k) {
        std::memcpy(dst + k * width, x + koff[k] + j0, sizeof(float) * w);
        for (int64_t j = w; j < width; ++j) dst[k * width + j] = 0.f;
      }
    } else {
      // columns of X are rows of memory here (linear's X [T, K]): walk each in runs of 16 k so
      // the reads stay on one cache line instead of touching `w` lines a stride apart per k
      for (int64_t k0 = 0; k0 < kc; k0 += 16) {
        const int64_t k1 = imin(kc, k0 + 16);
        for (int64_t j = 0; j < w; ++j) {
          const float* src = x + (j0 + j) * cs;
          for (int64_t k = k0; k < k1; ++k) dst[k * width + j] = src[koff[k]];
        }
        for (int64_t k = k0; k < k1; ++k)
          for (int64_t j = w; j < width; ++j) dst[k * width + j] = 0.f;
      }
    }
  }
}

// The first K block starts from the residual (or zero), later ones from y; the last adds the
// bias and applies the activation. As in spmm_tile, y may be the residual's own buffer.
template <int R, int NV>
static void gemm_micro(int64_t kc, const float* wp, const float* xp, int rows, int cols, float* y,
                       int64_t ldy, int mode, const Epilogue& ep) {
  V acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const float* from = !(mode & kTileFirst) ? y + r * ldy
                        : ep.res && r < rows ? ep.res + r * ep.ld_res : nullptr;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const int left = cols - v * W;
      if (!from || r >= rows || left <= 0) acc[r][v] = Simd::zero();
      else if (left >= W) acc[r][v] = Simd::load(from + v * W);
      else acc[r][v] = Simd::loadn(from + v * W, left);
    }
  }
  for (int64_t k = 0; k < kc; ++k) {
    V xv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) xv[v] = Simd::load(xp + k * (NV * W) + v * W);
    const float* wk = wp + k * kGemmMR;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const V wv = Simd::set1(wk[r]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = Simd::fma(wv, xv[v], acc[r][v]);
    }
  }
  const bool last = mode & kTileLast;
  const V lo = Simd::set1(ep.lo), hi = Simd::set1(ep.hi);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    if (r >= rows) break;
    const V bias = (last && ep.bias) ? Simd::set1(ep.bias[r]) : Simd::zero();
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      if (last) acc[r][v] = Simd::add(acc[r][v], bias);
    if (last) activate_n<NV>(acc[r], ep.act, lo, hi);  // the row's vectors in lockstep
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const int left = cols - v * W;
      if (left <= 0) break;
      if (left >= W) Simd::store(y + r * ldy + v * W, acc[r][v]);
      else Simd::storen(y + r * ldy + v * W, acc[r][v], left);
    }
  }
}

template <int NV>
static void gemm_rows(int64_t kc, const float* wp, const float* xp, int rows, int cols, float* y,
                      int64_t ldy, int mode, const Epilogue& ep) {
  for (int r0 = 0; r0 < rows; r0 += kGemmR) {
    Epilogue e = ep;
    if (e.bias) e.bias += r0;
    if (e.res) e.res += r0 * e.ld_res;
    const int nr = rows - r0 < kGemmR ? rows - r0 : kGemmR;
    gemm_micro<kGemmR, NV>(kc, wp + r0, xp, nr, cols, y + r0 * ldy, ldy, mode, e);
  }
}

static void gemm_tile(int64_t kc, const float* wp, const float* xp, int width, int rows, int cols,
                      float* y, int64_t ldy, int mode, const Epilogue& ep) {
  switch (width / W) {
    case 1: gemm_rows<1>(kc, wp, xp, rows, cols, y, ldy, mode, ep); break;
    case 2: gemm_rows<2>(kc, wp, xp, rows, cols, y, ldy, mode, ep); break;
    default: gemm_rows<3>(kc, wp, xp, rows, cols, y, ldy, mode, ep); break;
  }
}

// ---------------------------------------------------------------------------------------------
// Narrow-output dense GEMM with vectors along the rows: each weight panel's kGemmMR rows at one k
// are one 8-float vector and each column of X is a broadcast, so a 7x7 plane (49 columns) costs
// 49 columns of work instead of the 64 that 16-column vectors round it up to. Eight floats are
// one ymm with AVX2, two xmm in the portable build. The AVX-512 tile (RV below) holds two
// panels per zmm and uses these 8-float pieces only in its epilogue.
#if defined(SPARSIFY_SIMD_AVX512) || defined(SPARSIFY_SIMD_AVX2)
struct P8 { __m256 v; };
static inline P8 p8_zero() { return {_mm256_setzero_ps()}; }
static inline P8 p8_set1(float a) { return {_mm256_set1_ps(a)}; }
static inline P8 p8_load(const float* p) { return {_mm256_loadu_ps(p)}; }
static inline void p8_store(float* p, P8 a) { _mm256_storeu_ps(p, a.v); }
static inline P8 p8_fma(P8 a, P8 b, P8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
static inline P8 p8_add(P8 a, P8 b) { return {_mm256_add_ps(a.v, b.v)}; }
static inline P8 p8_clamp(P8 a, P8 lo, P8 hi) {
  return {_mm256_min_ps(hi.v, _mm256_max_ps(lo.v, a.v))};
}
#if defined(SPARSIFY_SIMD_AVX512)
static inline P8 p8_loadn(const float* p, int n) {
  return {_mm256_maskz_loadu_ps((__mmask8)((1u << n) - 1u), p)};
}
static inline void p8_storen(float* p, P8 a, int n) {
  _mm256_mask_storeu_ps(p, (__mmask8)((1u << n) - 1u), a.v);
}
#else
static inline P8 p8_loadn(const float* p, int n) { return {Simd::loadn(p, n)}; }
static inline void p8_storen(float* p, P8 a, int n) { Simd::storen(p, a.v, n); }
#endif
// a[i] lane j -> a[j] lane i
static inline void p8_transpose(P8* a) {
  const __m256 t0 = _mm256_unpacklo_ps(a[0].v, a[1].v), t1 = _mm256_unpackhi_ps(a[0].v, a[1].v);
  const __m256 t2 = _mm256_unpacklo_ps(a[2].v, a[3].v), t3 = _mm256_unpackhi_ps(a[2].v, a[3].v);
  const __m256 t4 = _mm256_unpacklo_ps(a[4].v, a[5].v), t5 = _mm256_unpackhi_ps(a[4].v, a[5].v);
  const __m256 t6 = _mm256_unpacklo_ps(a[6].v, a[7].v), t7 = _mm256_unpackhi_ps(a[6].v, a[7].v);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  a[0].v = _mm256_permute2f128_ps(u0, u4, 0x20);
  a[1].v = _mm256_permute2f128_ps(u1, u5, 0x20);
  a[2].v = _mm256_permute2f128_ps(u2, u6, 0x20);
  a[3].v = _mm256_permute2f128_ps(u3, u7, 0x20);
  a[4].v = _mm256_permute2f128_ps(u0, u4, 0x31);
  a[5].v = _mm256_permute2f128_ps(u1, u5, 0x31);
  a[6].v = _mm256_permute2f128_ps(u2, u6, 0x31);
  a[7].v = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#else
struct P8 { __m128 a, b; };
static inline P8 p8_zero() { return {_mm_setzero_ps(), _mm_setzero_ps()}; }
static inline P8 p8_set1(float a) { return {_mm_set1_ps(a), _mm_set1_ps(a)}; }
static inline P8 p8_load(const float* p) { return {_mm_loadu_ps(p), _mm_loadu_ps(p + 4)}; }
static inline void p8_store(float* p, P8 a) { _mm_storeu_ps(p, a.a); _mm_storeu_ps(p + 4, a.b); }
static inline P8 p8_fma(P8 a, P8 b, P8 c) {
  return {_mm_add_ps(_mm_mul_ps(a.a, b.a), c.a), _mm_add_ps(_mm_mul_ps(a.b, b.b), c.b)};
}
static inline P8 p8_add(P8 a, P8 b) { return {_mm_add_ps(a.a, b.a), _mm_add_ps(a.b, b.b)}; }
static inline P8 p8_clamp(P8 a, P8 lo, P8 hi) {
  return {_mm_min_ps(hi.a, _mm_max_ps(lo.a, a.a)), _mm_min_ps(hi.b, _mm_max_ps(lo.b, a.b))};
}
static inline P8 p8_loadn(const float* p, int n) {
  float t[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  std::memcpy(t, p, sizeof(float) * n);
  return p8_load(t);
}
static inline void p8_storen(float* p, P8 a, int n) {
  float t[8];
  p8_store(t, a);
  std::memcpy(p, t, sizeof(float) * n);
}
static inline void p8_transpose(P8* a) {
  float t[8][8];
  for (int i = 0; i < 8; ++i) p8_store(t[i], a[i]);
  for (int j = 0; j < 8; ++j) {
    float r[8];
    for (int i = 0; i < 8; ++i) r[i] = t[i][j];
    a[j] = p8_load(r);
  }
}
#endif
constexpr int kGemmTP = SPARSIFY_GEMM_TP;  // weight panels per narrow tile
constexpr int kGemmTC = SPARSIFY_GEMM_TC;  // columns per narrow tile, at most
static_assert(kGemmTC <= 8, "the epilogue transposes 8 x 8 blocks");

// X[k][c] for c < nc packed as [k][kGemmTC] (zero past nc), read by broadcasts.
static void gemm_pack_xt(const float* x, const int64_t* koff, int64_t cs, int64_t K, int nc,
                         float* xp) {
  if (cs == 1 && nc <= W) {
    for (int64_t k = 0; k < K; ++k) {
      const V v = nc == W ? Simd::load(x + koff[k]) : Simd::loadn(x + koff[k], nc);
      if (kGemmTC >= W) Simd::store(xp + k * kGemmTC, v);
      else Simd::storen(xp + k * kGemmTC, v, kGemmTC);
    }
    if (nc < kGemmTC && kGemmTC > W) {
      for (int64_t k = 0; k < K; ++k)
        for (int c = nc; c < kGemmTC; ++c) xp[k * kGemmTC + c] = 0.f;
    }
    return;
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int c = 0; c < nc; ++c) xp[k * kGemmTC + c] = x[koff[k] + c * cs];
    for (int c = nc; c < kGemmTC; ++c) xp[k * kGemmTC + c] = 0.f;
  }
}

// One panel's kGemmMR rows of a narrow tile, from its C column vectors t[0, C) (lane r = row
// r0 + r): bias as a vector, an 8 x 8 transpose into row pieces, then the residual or partial sum,
// the activation and the store of rows [r0, rows) (none when r0 >= rows).
template <int C>
static inline void tile_t_panel(P8* t, int r0, int rows, int cols, float* y, int64_t ldy, int mode,
                                const Epilogue& ep) {
  const bool first = mode & kTileFirst, last = mode & kTileLast;
  const P8 lo = p8_set1(ep.lo), hi = p8_set1(ep.hi);
  const bool clamp = last && (ep.act == kActRelu || ep.act == kActClip);
  const int nr = rows - r0 < kGemmMR ? rows - r0 : kGemmMR;
  const P8 b = !(last && ep.bias) || nr <= 0 ? p8_zero()
               : nr == kGemmMR             ? p8_load(ep.bias + r0)
                                           : p8_loadn(ep.bias + r0, nr);
#pragma GCC unroll 8
  for (int c = 0; c < 8; ++c) t[c] = c < C ? p8_add(t[c], b) : p8_zero();
  p8_transpose(t);
  for (int r = 0; r < nr; ++r) {
    float* yr = y + (int64_t)(r0 + r) * ldy;
    P8 v = t[r];
    // the first K block adds the residual, later ones the partial sum in y: each element is
    // read before it is written, so y may be the residual's buffer
    const float* from = !first ? yr : ep.res ? ep.res + (int64_t)(r0 + r) * ep.ld_res : nullptr;
    if (from) v = p8_add(v, cols == 8 ? p8_load(from) : p8_loadn(from, cols));
    if (clamp) v = p8_clamp(v, lo, hi);
    if (cols == 8) p8_store(yr, v); else p8_storen(yr, v, cols);
    // the other activations in their vector form (which keeps gelu(-inf) = 0, not NaN)
    if (last && !clamp && ep.act != kActNone)
      for (int c = 0; c < cols; c += W) {
        const int n = cols - c < W ? cols - c : W;
        Simd::storen(yr + c, activate(Simd::loadn(yr + c, n), ep.act, Simd::set1(ep.lo), Simd::set1(ep.hi)), n);
      }
  }
}

// The narrow tile's row vector: kRvPanels consecutive weight panels at one k. AVX-512 holds two
// panels (16 rows) per zmm, each half from its own panel: a ymm's 8 rows left half of every FMA
// idle on Intel's cores, which run two zmm FMAs a cycle (the ymm tile topped out at 126 GFLOP/s,
// half the peak). Elsewhere one panel per P8. `lone`: the second panel does not exist (a tile of
// an odd number of panels, the weight's last), so the upper half is zero.
#if defined(SPARSIFY_SIMD_AVX512)
using RV = __m512;
constexpr int kRvPanels = 2;
static inline RV rv_zero() { return _mm512_setzero_ps(); }
static inline RV rv_set1(float a) { return _mm512_set1_ps(a); }
static inline RV rv_fma(RV a, RV b, RV c) { return _mm512_fmadd_ps(a, b, c); }
static inline RV rv_load(const float* p, int64_t pstride, bool lone) {
  const __m256 lo = _mm256_loadu_ps(p);
  return lone ? _mm512_zextps256_ps512(lo)
              : _mm512_insertf32x8(_mm512_castps256_ps512(lo), _mm256_loadu_ps(p + pstride), 1);
}
static inline P8 rv_half(RV v, int h) {
  return {h ? _mm512_extractf32x8_ps(v, 1) : _mm512_extractf32x8_ps(v, 0)};
}
static inline RV rv_load1(const float* p) { return _mm512_loadu_ps(p); }
#else
using RV = P8;
constexpr int kRvPanels = 1;
static inline RV rv_zero() { return p8_zero(); }
static inline RV rv_set1(float a) { return p8_set1(a); }
static inline RV rv_fma(RV a, RV b, RV c) { return p8_fma(a, b, c); }
static inline RV rv_load(const float* p, int64_t, bool) { return p8_load(p); }
static inline P8 rv_half(RV v, int) { return v; }
static inline RV rv_load1(const float* p) { return p8_load(p); }
#endif
static_assert(kGemmTP % kRvPanels == 0, "narrow tiles take whole row vectors");
// Row vectors of the widest conv tile (KernelTable::conv_t_rows), with up to 24 / kConvQ columns:
// AVX-512's 32 registers hold 4 x 6 accumulators and the 4 row vectors.
#if defined(SPARSIFY_SIMD_AVX512)
constexpr int kConvQ = 4;
#else
constexpr int kConvQ = kGemmTP / kRvPanels;
#endif

// kTileChanVec's epilogue: accumulator column c plus the bias, activated, to y + c * ldy, one row
// vector (kRvPanels * kGemmMR rows) at a time. Bias lanes past `rows` are zero.
template <int Q, int C>
static inline void store_chanvec(RV (*acc)[Q], int rows, int cols, float* y, int64_t ldy,
                                 const Epilogue& ep) {
  constexpr int R = kRvPanels * kGemmMR;
  const bool clamp = ep.act == kActRelu || ep.act == kActClip;
#pragma GCC unroll 4
  for (int q = 0; q < Q; ++q) {
    const int nr = rows - q * R;
    alignas(64) float bt[R] = {};
    if (ep.bias && nr > 0) std::memcpy(bt, ep.bias + q * R, sizeof(float) * (nr < R ? nr : R));
#if defined(SPARSIFY_SIMD_AVX512)
    const __m512 b = _mm512_load_ps(bt), lo = _mm512_set1_ps(ep.lo), hi = _mm512_set1_ps(ep.hi);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      if (c >= cols) break;
      __m512 v = _mm512_add_ps(acc[c][q], b);
      if (clamp) v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
      _mm512_storeu_ps(y + c * ldy + q * R, v);
    }
#else
    const P8 b = p8_load(bt), lo = p8_set1(ep.lo), hi = p8_set1(ep.hi);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      if (c >= cols) break;
      P8 v = p8_add(acc[c][q], b);
      if (clamp) v = p8_clamp(v, lo, hi);
      p8_store(y + c * ldy + q * R, v);
    }
#endif
  }
  if (clamp || ep.act == kActNone) return;
  // the other activations in their vector form, over the stored rows
  const V lo = Simd::set1(ep.lo), hi = Simd::set1(ep.hi);
  for (int c = 0; c < cols; ++c)
    for (int r = 0; r < Q * R; r += W) {
      float* p = y + c * ldy + r;
      Simd::store(p, activate(Simd::load(p), ep.act, lo, hi));
    }
}

// Rows [0, rows) of Q row vectors (Q * kRvPanels consecutive panels, panel p at wp + p * pstride;
// with ODD the last vector's second panel is absent) times X over a K block of kc; adds into
// columns [0, cols) of y unless this K block is the first, and applies the epilogue on the last.
// X is the packed tile [kc][kGemmTC], or with DIRECT read in place: column c of K row k at
// xp[koff[k] + c] (a conv's phase planes, see conv_tile_t). DIRECT also takes the weights as row
// vectors whole, [vector][k][kRvPanels * kGemmMR] with vectors pstride apart (one load each).
template <int Q, bool ODD, int C, bool DIRECT>
static void gemm_micro_t(int64_t kc, int64_t pstride, const float* wp, const float* xp,
                         const int64_t* koff, int rows, int cols, float* y, int64_t ldy, int mode,
                         const Epilogue& ep) {
  RV acc[C][Q];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c)
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) acc[c][q] = rv_zero();
  // DIRECT streams its weights from L2 once per tile (the first tile of a row block from
  // memory); prefetched 64 k ahead where they outgrow L1, ResNet-50's 3x3 convs on 14x14 and
  // 7x7 ran 4-9% faster than without, and its 512-channel 3x3 (9.4 MB of weights) 4-13% faster
  // than 8 k ahead (AVX-512; its stem, 37 KB, lost 2% with the prefetch)
  const bool pf = DIRECT && kc * Q * (int64_t)sizeof(RV) > 48 * 1024;
  for (int64_t k = 0; k < kc; ++k) {
    RV wv[Q];
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q)
      wv[q] = DIRECT ? rv_load1(wp + q * pstride + k * kRvPanels * kGemmMR)
                     : rv_load(wp + kRvPanels * q * pstride + k * kGemmMR, pstride, ODD && q == Q - 1);
    if (DIRECT && pf)
#pragma GCC unroll 4
      for (int q = 0; q < Q; ++q) __builtin_prefetch(wp + q * pstride + (k + 64) * kRvPanels * kGemmMR, 0, 3);
    const float* xk = DIRECT ? xp + koff[k] : xp + k * kGemmTC;
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const RV xv = rv_set1(xk[c]);
#pragma GCC unroll 4
      for (int q = 0; q < Q; ++q) acc[c][q] = rv_fma(wv[q], xv, acc[c][q]);
    }
  }
  if (DIRECT && (mode & kTileChanVec)) return store_chanvec<Q, C>(acc, rows, cols, y, ldy, ep);
#pragma GCC unroll 4
  for (int q = 0; q < Q; ++q)
    for (int h = 0; h < kRvPanels; ++h) {
      if (ODD && q == Q - 1 && h == 1) break;
      P8 t[8];
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) t[c] = rv_half(acc[c][q], h);
      tile_t_panel<C>(t, (kRvPanels * q + h) * kGemmMR, rows, cols, y, ldy, mode, ep);
    }
}

// The tile with q row vectors (at most Q), odd: its last vector has one panel.
template <int C, int Q, bool DIRECT>
static void gemm_t_rows(int q, bool odd, int64_t kc, int64_t pstride, const float* wp,
                        const float* xp, const int64_t* koff, int rows, int cols, float* y,
                        int64_t ldy, int mode, const Epilogue& ep) {
  if constexpr (Q >= 1) {
    if (q < Q)
      return gemm_t_rows<C, Q - 1, DIRECT>(q, odd, kc, pstride, wp, xp, koff, rows, cols, y, ldy,
                                           mode, ep);
    if constexpr (kRvPanels > 1)
      if (odd)
        return gemm_micro_t<Q, true, C, DIRECT>(kc, pstride, wp, xp, koff, rows, cols, y, ldy,
                                                mode, ep);
    gemm_micro_t<Q, false, C, DIRECT>(kc, pstride, wp, xp, koff, rows, cols, y, ldy, mode, ep);
  }
}

template <int C, bool DIRECT>
static void gemm_t_cols(int64_t kc, int64_t pstride, const float* wp, const float* xp,
                        const int64_t* koff, int rows, int cols, float* y, int64_t ldy, int mode,
                        const Epilogue& ep) {
  if constexpr (C >= 1) {
    if (cols < C)
      return gemm_t_cols<C - 1, DIRECT>(kc, pstride, wp, xp, koff, rows, cols, y, ldy, mode, ep);
    // whole panels only: rows past `rows` read the zero padding of the last panel, and panels
    // after it are left out by a smaller tile
    const int panels = (rows + kGemmMR - 1) / kGemmMR;
    // the conv tile goes up to kConvQ row vectors where its columns leave the registers for them
    constexpr int QMAX = DIRECT && C * kConvQ <= 24 ? kConvQ : kGemmTP / kRvPanels;
    gemm_t_rows<C, QMAX, DIRECT>((panels + kRvPanels - 1) / kRvPanels, panels % kRvPanels != 0,
                                 kc, pstride, wp, xp, koff, rows, cols, y, ldy, mode, ep);
  }
}

// rows <= kGemmTP * kGemmMR, cols <= kGemmTC; wp at the block's first k, panels pstride apart
static void gemm_tile_t(int64_t kc, int64_t pstride, const float* wp, const float* xp, int rows,
                        int cols, float* y, int64_t ldy, int mode, const Epilogue& ep) {
  gemm_t_cols<kGemmTC, false>(kc, pstride, wp, xp, nullptr, rows, cols, y, ldy, mode, ep);
}

static void conv_tile_t(int64_t kc, int64_t pstride, const float* wp, const float* x,
                        const int64_t* koff, int rows, int cols, float* y, int64_t ldy, int mode,
                        const Epilogue& ep) {
  gemm_t_cols<kGemmTC, true>(kc, pstride, wp, x, koff, rows, cols, y, ldy, mode, ep);
}

static void gemv(const float* wp, int64_t p0, int64_t p1, int64_t K, const float* xexp,
                 float* out) {
  constexpr int G = 16 / W;  // vectors per 16 floats (two K steps of a panel)
  const int64_t len = K * kGemmMR;
  for (int64_t p = p0; p < p1; ++p) {
    const float* a = wp + p * K * kGemmMR;
    V acc0[G], acc1[G];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) acc0[g] = acc1[g] = Simd::zero();
    int64_t i = 0;
    for (; i + 32 <= len; i += 32) {
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        acc0[g] = Simd::fma(Simd::load(a + i + g * W), Simd::load(xexp + i + g * W), acc0[g]);
        acc1[g] = Simd::fma(Simd::load(a + i + 16 + g * W), Simd::load(xexp + i + 16 + g * W),
                            acc1[g]);
      }
    }
    for (; i < len; i += 16)  // at most two more steps; the last may be half a vector wide
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        const int64_t left = len - i - g * W;
        if (left <= 0) break;
        const V av = left >= W ? Simd::load(a + i + g * W) : Simd::loadn(a + i + g * W, (int)left);
        acc0[g] = Simd::fma(av, Simd::load(xexp + i + g * W), acc0[g]);
      }
    float t[16];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) Simd::store(t + g * W, Simd::add(acc0[g], acc1[g]));
    for (int r = 0; r < kGemmMR; ++r) out[(p - p0) * kGemmMR + r] = t[r] + t[r + 8];
  }
}

// Four output pixels per step so four FMA chains are in flight.
static void dw_channels(const float* in, int64_t wp, const float* wv, int kh, int kw, int sh,
                        int sw, int dh, int dw, int64_t oh, int64_t ow, float* out,
                        const Epilogue& ep) {
  const int taps = kh * kw;
  const V bias = Simd::load(wv + taps * W);
  const V lo = Simd::set1(ep.lo), hi = Simd::set1(ep.hi);
  const int64_t step = (int64_t)sw * W;
  for (int64_t oy = 0; oy < oh; ++oy) {
    int64_t ox = 0;
    for (; ox + 4 <= ow; ox += 4) {
      V a0 = bias, a1 = bias, a2 = bias, a3 = bias;
      for (int i = 0; i < kh; ++i) {
        const float* row = in + (oy * sh + (int64_t)i * dh) * wp * W + ox * step;
        for (int j = 0; j < kw; ++j) {
          const V wt = Simd::load(wv + (i * kw + j) * W);
          const float* p = row + (int64_t)j * dw * W;
          a0 = Simd::fma(wt, Simd::load(p), a0);
          a1 = Simd::fma(wt, Simd::load(p + step), a1);
          a2 = Simd::fma(wt, Simd::load(p + 2 * step), a2);
          a3 = Simd::fma(wt, Simd::load(p + 3 * step), a3);
        }
      }
      float* o = out + (oy * ow + ox) * W;
      Simd::store(o, activate(a0, ep.act, lo, hi));
      Simd::store(o + W, activate(a1, ep.act, lo, hi));
      Simd::store(o + 2 * W, activate(a2, ep.act, lo, hi));
      Simd::store(o + 3 * W, activate(a3, ep.act, lo, hi));
    }
    for (; ox < ow; ++ox) {
      V a = bias;
      for (int i = 0; i < kh; ++i) {
        const float* row = in + (oy * sh + (int64_t)i * dh) * wp * W + ox * step;
        for (int j = 0; j < kw; ++j)
          a = Simd::fma(Simd::load(wv + (i * kw + j) * W), Simd::load(row + (int64_t)j * dw * W), a);
      }
      Simd::store(out + (oy * ow + ox) * W, activate(a, ep.act, lo, hi));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Windowed plane ops (depthwise conv, max/sum pooling) over a padded plane stored as column
// phases, so every tap reads a contiguous run of the output row's width.
template <int OP, int NV, bool TAIL>
static inline void window_block(const float* x, const int64_t* tap_off, int taps, const float* w,
                                int tail, float* y, const Epilogue& ep) {
  V acc[NV];
  const V init = OP == 1 ? Simd::set1(-__builtin_inff()) : Simd::zero();
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = init;
  for (int t = 0; t < taps; ++t) {
    const float* src = x + tap_off[t];
    const V wv = OP == 0 ? Simd::set1(w[t]) : Simd::zero();
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const V xv = (TAIL && v == NV - 1) ? Simd::loadn(src + v * W, tail) : Simd::load(src + v * W);
      if (OP == 0) acc[v] = Simd::fma(wv, xv, acc[v]);
      else if (OP == 1) acc[v] = Simd::maxp(acc[v], xv);
      else acc[v] = Simd::add(acc[v], xv);
    }
  }
  const V lo = Simd::set1(ep.lo), hi = Simd::set1(ep.hi);
  const V bias = (OP == 0 && ep.bias) ? Simd::set1(ep.bias[0]) : Simd::zero();
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    V s = acc[v];
    if (OP == 0) s = activate(Simd::add(s, bias), ep.act, lo, hi);
    if (TAIL && v == NV - 1) Simd::storen(y + v * W, s, tail); else Simd::store(y + v * W, s);
  }
}

template <int OP>
static void window_plane_t(const float* x, const int64_t* tap_off, int taps, int64_t row_step,
                           const float* w, int64_t oh, int64_t ow, float* y, const Epilogue& ep) {
  constexpr int NT = kWinNV * W;
  for (int64_t oy = 0; oy < oh; ++oy) {
    const float* xr = x + oy * row_step;
    float* yr = y + oy * ow;
    int64_t ox = 0;
    for (; ox + NT <= ow; ox += NT)
      window_block<OP, kWinNV, false>(xr + ox, tap_off, taps, w, W, yr + ox, ep);
    for (; ox < ow; ox += W) {
      const int64_t left = ow - ox;
      if (left >= W) window_block<OP, 1, false>(xr + ox, tap_off, taps, w, W, yr + ox, ep);
      else window_block<OP, 1, true>(xr + ox, tap_off, taps, w, (int)left, yr + ox, ep);
    }
  }
}

static void window_plane(int op, const float* x, const int64_t* tap_off, int taps,
                         int64_t row_step, const float* w, int64_t oh, int64_t ow, float* y,
                         const Epilogue& ep) {
  if (op == 0) window_plane_t<0>(x, tap_off, taps, row_step, w, oh, ow, y, ep);
  else if (op == 1) window_plane_t<1>(x, tap_off, taps, row_step, w, oh, ow, y, ep);
  else window_plane_t<2>(x, tap_off, taps, row_step, w, oh, ow, y, ep);
}

// 3x3 max pool with stride 2 (ResNet's and GoogLeNet's stem pools), one output row.
// vm[pl + c] = the elementwise max over the window's rows that lie inside the image (rows[0,
// nrows), each w floats) of input column c, -inf on padded columns; then y[ox] = the max of
// vm[2 ox .. 2 ox + 2]. Both fold as a max from -inf that keeps NaN (Simd::maxp), as
// window_block does, so results are the same bit for bit, and a window holding a NaN gives NaN.
static void max_pool3s2_row(const float* const* rows, int nrows, int64_t w, int pl, int64_t ow,
                            float* vm, float* y) {
  const float ninf = -__builtin_inff();
  const int64_t span = 2 * ow + 1;  // padded columns the windows read
  for (int64_t i = 0; i < pl && i < span; ++i) vm[i] = ninf;
  for (int64_t i = pl + w; i < span; ++i) vm[i] = ninf;
  float* v = vm + pl;
  const int64_t cw = span - pl < w ? span - pl : w;
  int64_t c = 0;
  for (; c + W <= cw; c += W) {
    V acc = Simd::set1(ninf);
    for (int r = 0; r < nrows; ++r) acc = Simd::maxp(acc, Simd::load(rows[r] + c));
    Simd::store(v + c, acc);
  }
  if (c < cw) {
    const int left = (int)(cw - c);
    V acc = Simd::set1(ninf);
    for (int r = 0; r < nrows; ++r) acc = Simd::maxp(acc, Simd::loadn(rows[r] + c, left));
    Simd::storen(v + c, acc, left);
  }
  for (int64_t ox = 0; ox < ow; ++ox) {  // the compiler vectorizes this stride-2 loop
    const float* q = vm + 2 * ox;
    // NaN wins, as in the vertical step (x != x: NaN)
    float acc = q[0];
    acc = q[1] > acc || q[1] != q[1] ? q[1] : acc;
    y[ox] = q[2] > acc || q[2] != q[2] ? q[2] : acc;
  }
}

static void max_pool3s2_cv(const float* const* rows, int nrows, int64_t w, int64_t ldc,
                           int64_t ow, float* y) {
  const V ninf = Simd::set1(-__builtin_inff());
  for (int64_t ox = 0; ox < ow; ++ox) {
    const int64_t x0 = 2 * ox - 1 < 0 ? 0 : 2 * ox - 1, x1 = 2 * ox + 2 < w ? 2 * ox + 2 : w;
    for (int64_t c = 0; c < ldc; c += W) {
      V acc = ninf;
      for (int r = 0; r < nrows; ++r)
        for (int64_t x = x0; x < x1; ++x) acc = Simd::maxp(acc, Simd::load(rows[r] + x * ldc + c));
      Simd::store(y + ox * ldc + c, acc);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Row-wise softmax and layer normalization (the last axis of BERT's scores and hidden states).
static inline float hsum(V v) {
  float t[W];
  Simd::store(t, v);
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += t[i];
  return s;
}

// y = act(a * scale + shift + b) over n floats, b optional; y may be a or b. (An activation on
// its own, an add with one, an inference BatchNormalization channel, a gated plane.)
static void act_row(const float* a, const float* b, int64_t n, float scale, float shift, int act,
                    float lo, float hi, float* y) {
  const V vlo = Simd::set1(lo), vhi = Simd::set1(hi), vs = Simd::set1(scale), vt = Simd::set1(shift);
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    V v[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      v[j] = Simd::fma(Simd::load(a + i + j * W), vs, vt);
      if (b) v[j] = Simd::add(v[j], Simd::load(b + i + j * W));
    }
    activate_n<4>(v, act, vlo, vhi);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) Simd::store(y + i + j * W, v[j]);
  }
  for (; i < n; i += W) {
    const int m = n - i < W ? (int)(n - i) : W;
    V v = Simd::fma(Simd::loadn(a + i, m), vs, vt);
    if (b) v = Simd::add(v, Simd::loadn(b + i, m));
    Simd::storen(y + i, activate(v, act, vlo, vhi), m);
  }
}

// max, then exp(x - max) into y with its sum, then one scaling pass; NaN anywhere in the row
// reaches the sum and so every output, as in NumPy.
static void softmax_row(const float* x, int64_t n, float* y) {
  if (n <= 0) return;
  float mx = x[0];
  int64_t i = 0;
  if (n >= W) {
    V m = Simd::load(x);
    for (i = W; i + W <= n; i += W) m = Simd::max(m, Simd::load(x + i));
    float t[W];
    Simd::store(t, m);
    for (int j = 0; j < W; ++j) mx = t[j] > mx ? t[j] : mx;
  }
  for (; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
  const V vm = Simd::set1(mx);
  V acc = Simd::zero();
  float tail_sum = 0.f;
  for (i = 0; i + W <= n; i += W) {
    const V e = vexp(Simd::sub(Simd::load(x + i), vm));
    acc = Simd::add(acc, e);
    Simd::store(y + i, e);
  }
  if (i < n) {
    const int left = (int)(n - i);
    float t[W];
    Simd::store(t, vexp(Simd::sub(Simd::loadn(x + i, left), vm)));
    for (int j = 0; j < left; ++j) tail_sum += t[j];
    Simd::storen(y + i, Simd::load(t), left);
  }
  const V inv = Simd::set1(1.f / (hsum(acc) + tail_sum));
  for (i = 0; i + W <= n; i += W) Simd::store(y + i, Simd::mul(Simd::load(y + i), inv));
  if (i < n) Simd::storen(y + i, Simd::mul(Simd::loadn(y + i, (int)(n - i)), inv), (int)(n - i));
}

// Two passes for the statistics (mean, then squared deviations) so the variance does not
// cancel; the lanes past n read as zero and are left out of the deviations by hand.
static void layer_norm_row(const float* x, int64_t n, const float* scale, const float* bias,
                           float eps, float* y) {
  if (n <= 0) return;
  V acc = Simd::zero();
  int64_t i = 0;
  for (; i + W <= n; i += W) acc = Simd::add(acc, Simd::load(x + i));
  float sum = hsum(acc);
  for (int64_t j = i; j < n; ++j) sum += x[j];
  const float mean = sum / (float)n;
  const V vm = Simd::set1(mean);
  acc = Simd::zero();
  for (i = 0; i + W <= n; i += W) {
    const V d = Simd::sub(Simd::load(x + i), vm);
    acc = Simd::fma(d, d, acc);
  }
  float sq = hsum(acc);
  for (int64_t j = i; j < n; ++j) sq += (x[j] - mean) * (x[j] - mean);
  const V inv = Simd::set1(1.f / __builtin_sqrtf(sq / (float)n + eps));
  for (i = 0; i < n; i += W) {
    const int left = n - i >= W ? W : (int)(n - i);
    const bool full = left == W;
    const V xv = full ? Simd::load(x + i) : Simd::loadn(x + i, left);
    const V sv = full ? Simd::load(scale + i) : Simd::loadn(scale + i, left);
    V v = Simd::mul(Simd::mul(Simd::sub(xv, vm), inv), sv);
    if (bias) v = Simd::add(v, full ? Simd::load(bias + i) : Simd::loadn(bias + i, left));
    if (full) Simd::store(y + i, v); else Simd::storen(y + i, v, left);
  }
}

static const KernelTable kTable = {
    SPARSIFY_ISA_NAME, W, kGemmNV * W, kSpmmNV * W, &spmm, &gemm_pack_x, &gemm_tile, &gemv,
    kGemmTP * kGemmMR, kGemmTC, &gemm_pack_xt, &gemm_tile_t, kRvPanels, kConvQ * kRvPanels * kGemmMR, 24 / kConvQ < kGemmTC ? 24 / kConvQ : kGemmTC, &conv_tile_t,
    &dw_channels, &window_plane, &max_pool3s2_row, &max_pool3s2_cv, &act_row, &softmax_row, &layer_norm_row,
};
