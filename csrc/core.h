// Drivers over the kernel table: packing, blocking, threading and conv lowering. Raw pointers
// only; bindings.cpp is the single file that sees Python.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <vector>

#include "dispatch.h"

namespace sparsify {

// 64-byte aligned float storage that grows and never shrinks (scratch and packed panels).
class FloatBuf {
 public:
  FloatBuf() = default;
  FloatBuf(const FloatBuf&) = delete;
  FloatBuf& operator=(const FloatBuf&) = delete;
  ~FloatBuf() { std::free(p_); }
  float* get(size_t n) {
    if (n > n_) {
      std::free(p_);
      p_ = static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64));
      if (!p_) throw std::bad_alloc();
      n_ = n;
    }
    return p_;
  }
  float* data() const { return p_; }
  void release() {
    std::free(p_);
    p_ = nullptr;
    n_ = 0;
  }

 private:
  float* p_ = nullptr;
  size_t n_ = 0;
};

// The sparse kernel's view of a weight (see SpmmArgs): K cut into blocks, offsets scaled to the
// packed tile width. rb = 4: a weight whose rows come in groups of four sharing their columns
// (4x1 block pruning) is kept per block, four weights each (SpmmArgs::rb).
struct SparseLayout {
  int64_t nblocks = 1, kb = 0;
  int rb = 1;
  int tile_cols = 0;  // columns of the packed X tile the offsets are scaled to
  std::vector<int32_t> row_ptr;
  std::vector<uint16_t> off;
  std::vector<float> val;
};

// CSR over rows of W[M, K]; column indices are K offsets.
struct SparseWeight {
  SparseWeight(const float* w, int64_t m, int64_t k);
  SparseWeight(const SparseWeight&) = delete;
  SparseWeight& operator=(const SparseWeight&) = delete;
  void to_dense(float* out) const;
  int64_t nnz() const { return row_ptr.back(); }
  // Built once per tile width and kept; call with the GIL held. With `blocks`, the 4x1 block
  // layout where four_row_blocks() holds, else the plain one.
  const SparseLayout& layout_for(int tile_cols, bool blocks = false);
  // Whether the rows, in groups of four, share their columns closely enough for the 4x1 block
  // kernel (kBlockFill in gemm.cpp); computed once.
  bool four_row_blocks();
  int64_t M, K;
  std::vector<int32_t> row_ptr, col;
  std::vector<float> val;
  std::map<int, std::unique_ptr<SparseLayout>> layouts;
  int blocks_ = -1;  // four_row_blocks(): -1 not yet known
};

// Rows grouped in panels of kGemmMR, interleaved along K: [panel][k][kGemmMR], zero padded.
struct DenseWeight {
  DenseWeight(const float* w, int64_t m, int64_t k);
  void to_dense(float* out) const;
  // Panels whose boundaries fall on group boundaries (built once per group count on first use;
  // call with the GIL held). *per_group receives the panel count of one group.
  const float* panels_for(int64_t groups, int64_t* per_group);
  // The same rows as row vectors of `vp` panels ([vector][K][vp * kGemmMR], zero padded), each
  // group starting a vector (KernelTable::conv_tile_t); *per_group receives a group's vectors.
  // The first ungrouped request with vp > 1 makes that layout the stored one and frees the
  // panels (a conv weight runs one way on a given CPU; panels_for rebuilds them if asked).
  const float* vector_panels(int64_t groups, int64_t vp, int64_t* per_group);
  int64_t M, K;

 private:
  FloatBuf panels;  // [panel][K][kGemmMR], unless freed for vectors[{1, stored_vp}]
  int64_t stored_vp = 0;
  std::map<int64_t, std::unique_ptr<FloatBuf>> grouped;
  std::map<std::pair<int64_t, int64_t>, std::unique_ptr<FloatBuf>> vectors;
};

// A weight bound to one kernel and one layout of X.
struct WeightRef {
  const SparseWeight* sparse = nullptr;
  const SparseLayout* layout = nullptr;  // sparse: the kernel's layout
  const float* dense_panels = nullptr;  // dense: first panel of the row range
  int64_t panels_per_group = 0;         // dense: panels of one conv group
  int64_t panel_rows = kGemmMR;         // dense: rows per panel (more for vector_panels)
};

// Prepares w for X rows at koff (sparse: offsets; dense: group-aligned panels).
// `cols`: the GEMM's column count where known at binding (a conv's plan), else 0.
WeightRef bind_weight(SparseWeight* sw, DenseWeight* dw, const std::vector<int64_t>& koff,
                      int64_t groups = 1, int64_t cols = 0);

// y[rows, n] = W[m0 : m0 + rows] X with X(k, j) = x[koff[k] + j * cs]; epilogue applied.
void run_gemm(const WeightRef& w, int64_t m0, int64_t rows, int64_t K, const float* x,
              const int64_t* koff, int64_t cs, int64_t n, float* y, int64_t ldy,
              const Epilogue& ep);

// Y[T, M] = act(X[T, K] W^T + bias + res) via the [M, T] formulation; X is read transposed
// in place (koff[k] = k, column stride K).
void run_linear(const WeightRef& w, int64_t M, int64_t K, const float* x, const int64_t* koff,
                int64_t t, const float* bias, const float* res, int act, float lo, float hi,
                float* y);

// Which of a block's activations (input, residual, output) are feature-major [features, T]
// rather than token-major [T, features]: between two blocks the residual stream can stay
// feature-major, so neither block transposes it.
enum BlockLayout : int { kInFM = 1, kResFM = 2, kOutFM = 4 };

// Layer normalization over the last axis applied to a layer's input on its way in (null: none).
struct RowNorm {
  const float* scale;
  const float* bias;  // may be null
  float eps;
};

// y = act2(act1(X W1^T + bias1) W2^T + bias2 + res) for X [T, K1] (normalized by ln first): two linear layers whose
// hidden [T, M1] activation nothing else reads (a transformer's feed-forward block). The hidden
// activation stays feature-major between them, skipping two whole-matrix transposes.
void run_linear_chain(const WeightRef& w1, int64_t M1, int64_t K1, const float* bias1, int act1,
                      float lo1, float hi1, const WeightRef& w2, int64_t M2, const float* bias2,
                      int act2, float lo2, float hi2, const float* x, const RowNorm* ln,
                      int64_t T, const float* res, int layout, float* y);

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols, on the calling thread (16 x 16
// blocks of SSE 4 x 4 transposes).
void transpose_serial(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                      int64_t ldd);

struct ConvShape {
  int64_t n, c, h, w, m, oh, ow;
  int kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, group;
};

// How one group of a conv becomes a GEMM: which buffer holds X and where its K rows start.
struct ConvPlan {
  // kRowwise: a dense weight over the phase planes one output row at a time (conv_tile_t)
  enum Mode { kDirect, kPhased, kIm2col, kRowwise } mode;
  int64_t hq = 0, wq = 0;  // phased: rows / row pitch of each phase plane
  int64_t n_virtual = 0;   // GEMM columns (oh * wq when phased)
  int64_t buf = 0;         // floats of the lowered input per group (0 = read x directly)
  std::vector<int64_t> koff;
  // im2col: the phase planes it gathers from (`phase_buf` floats, hq x wq each) and where each
  // K row starts in them
  int64_t phase_buf = 0;
  std::vector<int64_t> poff;
};
// `sparse`: the weight runs on the sparse kernel, whose cost follows whole vectors of columns, so
// the phased layout's wasted columns are free whenever they fit in the vectors a row needs anyway
// (3x3 on 7x7: 63 columns instead of 49, both 4 vectors of 16, and no im2col copy).
ConvPlan plan_conv(const ConvShape& s, bool sparse = false);

void run_conv2d(const WeightRef& w, const ConvPlan& plan, const float* x, const ConvShape& s,
                const float* bias, const float* res, int act, float lo, float hi, float* y);
// The conv (no residual) and a 3x3 stride-2 max pool with pads 1 on its output, into y of the
// pooled shape; a rowwise conv pools from scratch rows without writing its own output.
void run_conv2d_maxpool(const WeightRef& w, const ConvPlan& plan, const float* x,
                        const ConvShape& s, const float* bias, int act, float lo, float hi,
                        float* y);
// Windowed planes over padded phase planes: op 0 depthwise (w [C][kh*kw], bias per channel),
// 1 max, 2 sum; `pad` fills the border (0, or -inf for max).
void run_window_planes(int op, const float* w, const float* x, const ConvShape& s, float pad,
                       const float* bias, int act, float lo, float hi, float* y);
void run_depthwise(const float* w, const float* x, const ConvShape& s, const float* bias, int act,
                   float lo, float hi, float* y);
// Whether run_depthwise takes the per-plane path for this shape (the one the fused 1x1 below uses).
bool depthwise_per_plane(const ConvShape& s);
// A 1x1 conv (stride 1, no pads; weight [m][c], bias1, act1) and the depthwise conv of shape s
// (s.c = m channels of s.h x s.w; weight wd [m][kh * kw], bias2, act2) on its output, in bands of
// output rows: each band runs the 1x1 on the input rows it reads into scratch and the depthwise
// conv from there, so the 1x1's output never goes to memory. x is [s.n][c][s.h][s.w].
void run_conv1x1_depthwise(const WeightRef& w1, const float* x, int64_t c, const float* bias1,
                           int act1, float lo1, float hi1, const float* wd, const ConvShape& s,
                           const float* bias2, int act2, float lo2, float hi2, float* y);
void run_max_pool(const float* x, const ConvShape& s, float* y);
void run_avg_pool(const float* x, const ConvShape& s, bool count_include_pad, float* y);
void run_global_avg_pool(const float* x, int64_t planes, int64_t size, float* y);
void run_add_act(const float* a, const float* b, int64_t n, int act, float lo, float hi, float* y);
// y[i][j][:] = act(x[i][j][:] * scale[k] + shift[k]) over [n][c][hw], k = (i * c + j) % per:
// per = c gives one value per channel (BatchNormalization), n * c one per plane (a squeeze-and-
// excitation gate). shift may be null (0); y may be x.
void run_channel_affine(const float* x, int64_t n, int64_t c, int64_t hw, const float* scale,
                        const float* shift, int64_t per, int act, float lo, float hi, float* y);
// Row-wise over the last axis: x and y are [rows, n] (y may be x).
void run_softmax(const float* x, int64_t rows, int64_t n, float* y);
void run_layer_norm(const float* x, int64_t rows, int64_t n, const float* scale,
                    const float* bias, float eps, float* y);
// y[b] = a[b] @ x[b] for a [batch, M, K], x [batch, K, N] (attention: activations on both sides).
void run_batched_matmul(const float* a, const float* x, int64_t batch, int64_t M, int64_t K,
                        int64_t N, float* y);

// Scaled dot-product attention over tokens stored [B, S, H * D] (what the Q/K/V projections
// write): out(b, s, h, :) = sum_t softmax_t(scale * Q(b, h, s, :) . K(b, h, t, :) + mask) V(b, h, t, :)
// with Q(b, h, s, d) = q[(b * Sq + s) * ldq + h * D + d] (K, V, out alike, Sk tokens for K and V)
// and mask(b, h, s, t) = mask[b * msb + h * msh + s * msr + t] (strides 0 broadcast; null: none).
struct AttentionShape {
  int64_t B, H, Sq, Sk, D, ldq, ldk, ldv, ldo;
  int64_t msb = 0, msh = 0, msr = 0;
};
void run_attention(const float* q, const float* k, const float* v, const AttentionShape& s,
                   float scale, const float* mask, float* out);

// A whole self-attention sublayer on X [B * S, K] (normalized by ln first when given): the
// Q, K, V projections stacked in one weight wqkv [3 * H * D, K] (bias bqkv), attention as in
// run_attention (Sq = Sk = S), then the output projection wo [M, H * D] with bias, residual and
// activation: y [B * S, M]. Between the projections everything stays feature-major, so X is
// transposed once and only the result is transposed back.
void run_attention_block(const float* x, const RowNorm* ln, int64_t B, int64_t S, int64_t K,
                         const WeightRef& wqkv, const float* bqkv, int64_t H, int64_t D,
                         float scale,
                         const float* mask, int64_t msb, int64_t msh, int64_t msr,
                         const WeightRef& wo, int64_t M, const float* bo, const float* res,
                         int act, float lo, float hi, int layout, float* y);

// The GEMM drivers of gemm.cpp for linear.cpp: a sparse weight's rows [m0, m0 + rows); the
// dense panel GEMM split over threads, or on the calling thread for columns [c0, c1).
void pack_weight_panels(const float* w, int64_t m, int64_t k, float* dst);
void sparse_gemm_rows(const WeightRef& w, int64_t m0, int64_t rows, const float* x,
                      const int64_t* koff, int64_t cs, int64_t n, float* y, int64_t ldy,
                      const Epilogue& ep);
void dense_gemm_threaded(const float* wp, int64_t rows, int64_t K, const float* x,
                         const int64_t* koff, int64_t cs, int64_t n, float* y, int64_t ldy,
                         const Epilogue& ep);
void dense_gemm_serial(const float* wp, int64_t rows, int64_t K, const float* x,
                       const int64_t* koff, int64_t cs, int64_t c0, int64_t c1, float* y,
                       int64_t ldy, const Epilogue& ep);

}  // namespace sparsify
