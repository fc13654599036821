// Drivers for transformer layers: linear layers on token-major activations ([T, K] in, [T, M]
// out), batched activation x activation products, and fused attention. The GEMMs themselves
// are gemm.cpp's; this file arranges operands around them.
#include <xmmintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core.h"
#include "parallel.h"

namespace sparsify {
namespace {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Work below this many multiply-adds runs on the calling thread: waking a worker costs more.
constexpr int64_t kSerialWork = 32 * 1024;

thread_local FloatBuf t_yt, t_xt, t_ln, t_h, t_qkv, t_ctx, t_att_pt, t_apanels, t_att_q, t_att_kt, t_att_s, t_att_p;

// dst[c][r] = src[r][c] for a rows x cols block; the fixed 16 x 16 case unrolls to straight loads
// and stores (a general strided loop with bounds checks ran at ~2.5 ns per element).
// Built from 4 x 4 SSE register transposes (SSE is in every x86-64 build): the scalar element
// loop cost ~0.4 ns per element, a fifth of the sparse linear layer's time on BERT's shapes.
template <int R, int C>
inline void transpose_fixed(const float* __restrict src, int64_t lds, float* __restrict dst,
                            int64_t ldd) {
  static_assert(R % 4 == 0 && C % 4 == 0, "blocks of 4 x 4");
  for (int r = 0; r < R; r += 4)
    for (int c = 0; c < C; c += 4) {
      __m128 a = _mm_loadu_ps(src + (r + 0) * lds + c), b = _mm_loadu_ps(src + (r + 1) * lds + c);
      __m128 e = _mm_loadu_ps(src + (r + 2) * lds + c), f = _mm_loadu_ps(src + (r + 3) * lds + c);
      _MM_TRANSPOSE4_PS(a, b, e, f);
      _mm_storeu_ps(dst + (c + 0) * ldd + r, a);
      _mm_storeu_ps(dst + (c + 1) * ldd + r, b);
      _mm_storeu_ps(dst + (c + 2) * ldd + r, e);
      _mm_storeu_ps(dst + (c + 3) * ldd + r, f);
    }
}

inline void transpose_any(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows,
                          int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// out[t, m] = act(yt[m, t] + res[t, m]) for yt [M, T]: also turns [T, K] into [K, T]
void transpose_out(const float* yt, int64_t M, int64_t T, const float* res, int act, float lo,
                   float hi, float* out) {
  constexpr int64_t B = 16;
  const int64_t bm = ceil_div(M, B), bt = ceil_div(T, B);
  parallel_range(bm * bt, M * T < kSerialWork, [&](int64_t blk) {
    const int64_t m0 = blk / bt * B, t0 = blk % bt * B;
    const int64_t mr = std::min(B, M - m0), tr = std::min(B, T - t0);
    float* dst = out + t0 * M + m0;
    if (mr == B && tr == B) {
      // through an L1 block, then whole output rows: writing a column at a time into rows a
      // power-of-two-ish stride apart thrashed one cache set (0.5 -> 2.5 ns per element)
      alignas(64) float tmp[B * B];
      transpose_fixed<B, B>(yt + m0 * T + t0, T, tmp, B);
      if (act == kActNone) {
        // the residual joins on the way out: one pass over the output instead of two
        for (int64_t t = 0; t < B; ++t) {
          const float* r = res ? res + (t0 + t) * M + m0 : nullptr;
          for (int64_t m = 0; m < B; m += 4) {
            __m128 v = _mm_load_ps(tmp + t * B + m);
            if (r) v = _mm_add_ps(v, _mm_loadu_ps(r + m));
            _mm_storeu_ps(dst + t * M + m, v);
          }
        }
        return;
      }
      for (int64_t t = 0; t < B; ++t)
        for (int64_t m = 0; m < B; ++m) dst[t * M + m] = tmp[t * B + m];
    } else {
      transpose_any(yt + m0 * T + t0, T, dst, M, mr, tr);
    }
    if (res || act != kActNone)
      for (int64_t t = 0; t < tr; ++t) {
        float* d = dst + t * M;
        const float* r = res ? res + (t0 + t) * M + m0 : nullptr;
        for (int64_t m = 0; m < mr; ++m) {
          float v = d[m] + (r ? r[m] : 0.f);
          v = act_scalar(v, act, lo, hi);
          d[m] = v;
        }
      }
  });
}

}  // namespace

// See core.h (one attention head's K; depthwise conv's channel interleave).
void transpose_serial(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                      int64_t ldd) {
  constexpr int64_t B = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += B)
    for (int64_t c0 = 0; c0 < cols; c0 += B) {
      const int64_t rr = std::min(B, rows - r0), cc = std::min(B, cols - c0);
      const float* s = src + r0 * lds + c0;
      float* d = dst + c0 * ldd + r0;
      if (rr == B && cc == B) transpose_fixed<B, B>(s, lds, d, ldd);
      else transpose_any(s, lds, d, ldd, rr, cc);
    }
}

namespace {

// Rows a[r * lda + k] (r < m) times `scale` into kGemmMR-row panels [panel][k][kGemmMR], the
// rows past m zero: the dense kernel's weight layout, built per call for an activation.
void pack_rows_scaled(const float* a, int64_t lda, int64_t m, int64_t k, float scale, float* dst) {
  const int64_t panels = ceil_div(m, kGemmMR);
  for (int64_t p = 0; p < panels; ++p) {
    float* pd = dst + p * k * kGemmMR;
    for (int r = 0; r < kGemmMR; ++r) {
      const int64_t row = p * kGemmMR + r;
      if (row >= m) {
        for (int64_t j = 0; j < k; ++j) pd[j * kGemmMR + r] = 0.f;
        continue;
      }
      const float* src = a + row * lda;
      for (int64_t j = 0; j < k; ++j) pd[j * kGemmMR + r] = scale * src[j];
    }
  }
}

}  // namespace

namespace {

// X [T, K] as the kernels want it, feature-major [K, T]. Threads that split a layer's rows each
// pack the same X tiles, and packing from the token-major source is a scalar gather per element
// (8 chunks x all of X at 2 threads), so it is transposed once here and every chunk copies whole
// vectors. One token is the same memory either way.
const float* feature_major(const float* x, int64_t T, int64_t K, const RowNorm* ln = nullptr) {
  if (!ln) {
    if (T == 1) return x;
    float* xt = t_xt.get(K * T);
    transpose_out(x, T, K, nullptr, kActNone, 0.f, 0.f, xt);
    return xt;
  }
  // the normalization the layer's input needs, 16 tokens at a time into L1 and from there
  // straight to their feature-major columns: one pass over X instead of an op of its own
  const KernelTable& kt = kernels();
  constexpr int64_t B = 16;
  float* xt = t_xt.get(K * T);
  parallel_range(ceil_div(T, B), K * T < kSerialWork, [&](int64_t blk) {
    const int64_t t0 = blk * B, rows = std::min(B, T - t0);
    float* tmp = T == 1 ? xt : t_ln.get(B * K);
    for (int64_t i = 0; i < rows; ++i)
      kt.layer_norm_row(x + (t0 + i) * K, K, ln->scale, ln->bias, ln->eps, tmp + i * K);
    if (T > 1) transpose_serial(tmp, K, rows, K, xt + t0, T);
  });
  return xt;
}

// yt [M, T] = W xfm for xfm feature-major [K, T], epilogue applied.
void gemm_feature_major(const WeightRef& w, int64_t M, int64_t K, const float* xfm, int64_t T,
                        const Epilogue& ep, float* yt) {
  std::vector<int64_t> koff(K);
  for (int64_t k = 0; k < K; ++k) koff[k] = k * T;
  if (w.sparse) sparse_gemm_rows(w, 0, M, xfm, koff.data(), 1, T, yt, T, ep);
  else dense_gemm_threaded(w.dense_panels, M, K, xfm, koff.data(), 1, T, yt, T, ep);
}

Epilogue bias_act(const float* bias, int act, float lo, float hi) {
  Epilogue ep;
  ep.bias = bias;
  ep.act = act;
  ep.lo = lo;
  ep.hi = hi;
  return ep;
}

// Layer normalization of each column of a feature-major x [K, T]: 64 tokens side by side, so
// the statistics accumulate as whole vectors down the features.
void layer_norm_columns(const float* x, int64_t K, int64_t T, const RowNorm& ln, float* y) {
  constexpr int64_t C = 64;
  parallel_range(ceil_div(T, C), K * T < kSerialWork, [&](int64_t blk) {
    const int64_t t0 = blk * C, n = std::min(C, T - t0);
    float mean[C] = {}, inv[C] = {};
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = 0; i < n; ++i) mean[i] += x[k * T + t0 + i];
    for (int64_t i = 0; i < n; ++i) mean[i] /= (float)K;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = 0; i < n; ++i) {
        const float d = x[k * T + t0 + i] - mean[i];
        inv[i] += d * d;
      }
    for (int64_t i = 0; i < n; ++i) inv[i] = 1.f / std::sqrt(inv[i] / (float)K + ln.eps);
    for (int64_t k = 0; k < K; ++k) {
      const float sc = ln.scale[k], b = ln.bias ? ln.bias[k] : 0.f;
      const float* r = x + k * T + t0;
      float* o = y + k * T + t0;
      for (int64_t i = 0; i < n; ++i) o[i] = (r[i] - mean[i]) * inv[i] * sc + b;
    }
  });
}

// A block's input as its first GEMM reads it: feature-major, normalized when ln is given.
const float* block_input(const float* x, int64_t T, int64_t K, const RowNorm* ln, int layout) {
  if (!(layout & kInFM)) return feature_major(x, T, K, ln);
  if (!ln) return x;
  float* xt = t_xt.get(K * T);
  layer_norm_columns(x, K, T, *ln, xt);
  return xt;
}

// y = act(W xfm + bias + res) in the layouts `layout` asks for. A feature-major residual
// joins in the GEMM's epilogue; a token-major one on the way through a transpose.
void block_output(const WeightRef& w, int64_t M, int64_t K, const float* xfm, int64_t T,
                  const float* bias, const float* res, int act, float lo, float hi, int layout,
                  float* y) {
  const bool res_fm = res && (layout & kResFM);
  Epilogue ep = bias_act(bias, res && !res_fm ? kActNone : act, lo, hi);
  if (res_fm) {
    ep.res = res;
    ep.ld_res = T;
  }
  if ((layout & kOutFM) && (!res || res_fm)) {
    gemm_feature_major(w, M, K, xfm, T, ep, y);
    return;
  }
  float* yt = t_yt.get(M * T);
  gemm_feature_major(w, M, K, xfm, T, ep, yt);
  if (layout & kOutFM) transpose_out(res, T, M, yt, act, lo, hi, y);  // y[m, t] = res[t, m] + ..
  else if (res_fm) transpose_out(yt, M, T, nullptr, kActNone, 0.f, 0.f, y);
  else transpose_out(yt, M, T, res, res ? act : kActNone, lo, hi, y);
}

}  // namespace

void run_linear(const WeightRef& w, int64_t M, int64_t K, const float* x, const int64_t* koff,
                int64_t T, const float* bias, const float* res, int act, float lo, float hi,
                float* y) {
  if (M <= 0 || T <= 0) return;
  float* yt = t_yt.get(M * T);
  // with a residual the activation must wait until the transposed residual is added
  gemm_feature_major(w, M, K, feature_major(x, T, K), T,
                     bias_act(bias, res ? kActNone : act, lo, hi), yt);
  transpose_out(yt, M, T, res, res ? act : kActNone, lo, hi, y);
}

void run_linear_chain(const WeightRef& w1, int64_t M1, int64_t K1, const float* bias1, int act1,
                      float lo1, float hi1, const WeightRef& w2, int64_t M2, const float* bias2,
                      int act2, float lo2, float hi2, const float* x, const RowNorm* ln,
                      int64_t T, const float* res, int layout, float* y) {
  if (M2 <= 0 || T <= 0) return;
  // the hidden activation is already feature-major, the layout the second layer reads
  float* h = t_h.get(M1 * T);
  gemm_feature_major(w1, M1, K1, block_input(x, T, K1, ln, layout), T,
                     bias_act(bias1, act1, lo1, hi1), h);
  block_output(w2, M2, M1, h, T, bias2, res, act2, lo2, hi2, layout, y);
}

// The left operand changes every call, so it is packed into panels per batch item here (a
// small cost: M*K floats against M*K*N multiply-adds). Batch items go to threads whole; with
// fewer items than threads each item's GEMM splits instead.
void run_batched_matmul(const float* a, const float* x, int64_t batch, int64_t M, int64_t K,
                        int64_t N, float* y) {
  if (batch <= 0 || M <= 0 || N <= 0) return;
  if (K == 0) {
    std::memset(y, 0, sizeof(float) * batch * M * N);
    return;
  }
  std::vector<int64_t> koff(K);
  for (int64_t k = 0; k < K; ++k) koff[k] = k * N;
  const int64_t mpanels = ceil_div(M, kGemmMR), panel_floats = mpanels * kGemmMR * K;
  const Epilogue ep;
  auto one = [&](int64_t b, bool split) {
    float* wp = t_apanels.get(panel_floats);
    pack_weight_panels(a + b * M * K, M, K, wp);
    if (split) dense_gemm_threaded(wp, M, K, x + b * K * N, koff.data(), 1, N, y + b * M * N, N, ep);
    else dense_gemm_serial(wp, M, K, x + b * K * N, koff.data(), 1, 0, N, y + b * M * N, N, ep);
  };
  const int nt = num_threads();
  if (nt > 1 && batch >= nt && batch * M * K * N >= kSerialWork) {
    parallel_for(batch, [&](int64_t b) { one(b, false); });
  } else {
    for (int64_t b = 0; b < batch; ++b) one(b, true);
  }
}

// One (batch, head) per chunk, all of it on one thread: the scores of a head (Sq x Sk floats,
// 64 KB for 128 tokens) stay in L2 from the product through the softmax to the second product,
// and Q, K, V are read in place from the projections' [B, S, H * D] outputs, so none of the
// reshapes, transposes, scale, mask add and softmax around the two products touch memory.
void run_attention(const float* q, const float* k, const float* v, const AttentionShape& s,
                   float scale, const float* mask, float* out) {
  const int64_t B = s.B, H = s.H, Sq = s.Sq, Sk = s.Sk, D = s.D;
  if (B <= 0 || H <= 0 || Sq <= 0 || D <= 0) return;
  if (Sk == 0) {  // nothing to attend to: an empty sum
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Sq; ++i)
        for (int64_t h = 0; h < H; ++h)
          std::memset(out + (b * Sq + i) * s.ldo + h * D, 0, sizeof(float) * D);
    return;
  }
  const KernelTable& kt = kernels();
  std::vector<int64_t> koff_kt(D), koff_v(Sk);
  for (int64_t d = 0; d < D; ++d) koff_kt[d] = d * Sk;
  for (int64_t t = 0; t < Sk; ++t) koff_v[t] = t * s.ldv;
  const int64_t qpanels = ceil_div(Sq, kGemmMR) * kGemmMR;
  auto head = [&](int64_t item) {
    const int64_t b = item / H, h = item % H;
    float* qp = t_att_q.get(qpanels * D);
    float* kt_buf = t_att_kt.get(D * Sk);
    float* sc = t_att_s.get(Sq * Sk);
    float* pp = t_att_p.get(qpanels * Sk);
    // the scale rides on Q's packing, so the scores come out scaled
    pack_rows_scaled(q + b * Sq * s.ldq + h * D, s.ldq, Sq, D, scale, qp);
    transpose_serial(k + b * Sk * s.ldk + h * D, s.ldk, Sk, D, kt_buf, Sk);
    Epilogue ep;
    if (mask) {
      ep.res = mask + b * s.msb + h * s.msh;
      ep.ld_res = s.msr;  // 0: one mask row for every query
    }
    dense_gemm_serial(qp, Sq, D, kt_buf, koff_kt.data(), 1, 0, Sk, sc, Sk, ep);
    for (int64_t i = 0; i < Sq; ++i) kt.softmax_row(sc + i * Sk, Sk, sc + i * Sk);
    pack_weight_panels(sc, Sq, Sk, pp);
    dense_gemm_serial(pp, Sq, Sk, v + b * Sk * s.ldv + h * D, koff_v.data(), 1, 0, D,
                      out + b * Sq * s.ldo + h * D, s.ldo, Epilogue());
  };
  const int64_t items = B * H;
  if (num_threads() <= 1 || items * Sq * Sk * D < kSerialWork) {
    for (int64_t i = 0; i < items; ++i) head(i);
  } else {
    parallel_for(items, head);
  }
}

namespace {

// One head of attention on feature-major Q, K, V ([H * D, T] each, token b * S + s in column
// b * S + s), writing the context feature-major too: out^T = V^T P^T, so the output projection
// reads it as is. The scores are token-major like run_attention's; P is transposed in L2.
void attention_head_fm(const float* qfm, const float* kfm, const float* vfm, int64_t T,
                       int64_t S, int64_t D, int64_t b, int64_t h, float scale, const float* mask,
                       int64_t ld_mask, const int64_t* koff_k, const int64_t* koff_p,
                       float* ctx) {
  const KernelTable& kt = kernels();
  const int64_t panels = ceil_div(S, kGemmMR), col0 = b * S, row0 = h * D;
  float* qp = t_att_q.get(panels * kGemmMR * D);
  float* sc = t_att_s.get(S * S);
  float* pt = t_att_pt.get(S * S);
  float* vp = t_att_p.get(ceil_div(D, kGemmMR) * kGemmMR * S);
  // Q's rows are tokens: each panel takes kGemmMR consecutive tokens of one feature row
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t rows = std::min<int64_t>(kGemmMR, S - p * kGemmMR);
    for (int64_t d = 0; d < D; ++d) {
      const float* src = qfm + (row0 + d) * T + col0 + p * kGemmMR;
      float* dst = qp + (p * D + d) * kGemmMR;
      for (int64_t r = 0; r < rows; ++r) dst[r] = scale * src[r];
      for (int64_t r = rows; r < kGemmMR; ++r) dst[r] = 0.f;
    }
  }
  Epilogue ep;
  ep.res = mask;
  ep.ld_res = ld_mask;
  dense_gemm_serial(qp, S, D, kfm + col0, koff_k + row0, 1, 0, S, sc, S, ep);
  for (int64_t i = 0; i < S; ++i) kt.softmax_row(sc + i * S, S, sc + i * S);
  transpose_serial(sc, S, S, S, pt, S);
  pack_rows_scaled(vfm + row0 * T + col0, T, D, S, 1.f, vp);
  dense_gemm_serial(vp, D, S, pt, koff_p, 1, 0, S, ctx + row0 * T + col0, T, Epilogue());
}

}  // namespace

void run_attention_block(const float* x, const RowNorm* ln, int64_t B, int64_t S, int64_t K,
                         const WeightRef& wqkv, const float* bqkv, int64_t H, int64_t D,
                         float scale,
                         const float* mask, int64_t msb, int64_t msh, int64_t msr,
                         const WeightRef& wo, int64_t M, const float* bo, const float* res,
                         int act, float lo, float hi, int layout, float* y) {
  const int64_t T = B * S, HD = H * D;
  if (T <= 0 || M <= 0) return;
  const float* xfm = block_input(x, T, K, ln, layout);
  // one GEMM for the three projections: X's tiles are packed once, one split over threads
  float* qkv = t_qkv.get(3 * HD * T);
  gemm_feature_major(wqkv, 3 * HD, K, xfm, T, bias_act(bqkv, kActNone, 0.f, 0.f), qkv);
  float* ctx = t_ctx.get(HD * T);
  std::vector<int64_t> koff_k(HD), koff_p(S);
  for (int64_t r = 0; r < HD; ++r) koff_k[r] = r * T;
  for (int64_t t = 0; t < S; ++t) koff_p[t] = t * S;
  auto head = [&](int64_t item) {
    const int64_t b = item / H, h = item % H;
    attention_head_fm(qkv, qkv + HD * T, qkv + 2 * HD * T, T, S, D, b, h, scale,
                      mask ? mask + b * msb + h * msh : nullptr, msr, koff_k.data(),
                      koff_p.data(), ctx);
  };
  const int64_t items = B * H;
  if (num_threads() <= 1 || items * S * S * D < kSerialWork) {
    for (int64_t i = 0; i < items; ++i) head(i);
  } else {
    parallel_for(items, head);
  }
  block_output(wo, M, HD, ctx, T, bo, res, act, lo, hi, layout, y);
}

}  // namespace sparsify
