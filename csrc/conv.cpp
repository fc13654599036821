// Conv lowering (1x1 direct, shifted phase planes, or im2col) and the windowed-plane driver
// shared by depthwise conv and pooling (pool.cpp).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "core.h"
#include "parallel.h"

namespace sparsify {
namespace {

constexpr int64_t kSerialWork = 32 * 1024;
// Scratch of one band of a 1x1 conv's output that a depthwise conv reads at once (a quarter of
// a 2 MB L2)
constexpr int64_t kBandBytes = 512 * 1024;
thread_local FloatBuf t_cols;

void copy_run(const float* __restrict src, int64_t lo, int64_t hi, float* __restrict d) {
  for (int64_t q = lo; q < hi; ++q) d[q] = src[q];
}

// Stride 2 is the common strided case (downsampling convs and pools); a constant stride lets the
// compiler vectorize the gather with shuffles.
void deinterleave2(const float* __restrict row, int64_t qlo, int64_t qhi, float* __restrict d) {
  for (int64_t q = qlo; q < qhi; ++q) d[q] = row[2 * q];
}

// Phase (a, b) of one padded plane: padded rows a, a + sh, ... and columns b, b + sw, ..., hq x wq,
// `pad` outside the image. The in-image column range is found once, so each row is a fill, one
// plain copy (or stride-2 gather) and a fill, with no test per element.
void fill_phase(const float* x, const ConvShape& s, int a, int b, int64_t hq, int64_t wq,
                float pad, float* dst) {
  const int64_t off = b - s.pl;
  const int64_t qlo = std::min(wq, off >= 0 ? 0 : (-off + s.sw - 1) / s.sw);
  const int64_t qhi =
      std::max(qlo, std::min(wq, s.w - off <= 0 ? 0 : (s.w - off + s.sw - 1) / s.sw));
  for (int64_t r = 0; r < hq; ++r) {
    float* d = dst + r * wq;
    const int64_t iy = r * s.sh + a - s.pt;
    if (iy < 0 || iy >= s.h) {
      for (int64_t q = 0; q < wq; ++q) d[q] = pad;
      continue;
    }
    const float* row = x + iy * s.w + off;
    for (int64_t q = 0; q < qlo; ++q) d[q] = pad;
    // plain loops, not memcpy: rows here are often a few floats and a call costs more
    if (s.sw == 1) copy_run(row, qlo, qhi, d);
    else if (s.sw == 2) deinterleave2(row, qlo, qhi, d);
    else for (int64_t q = qlo; q < qhi; ++q) d[q] = row[q * s.sw];
    for (int64_t q = qhi; q < wq; ++q) d[q] = pad;
  }
}

// Splits one zero- (or pad-) padded plane into sh x sw phases (fill_phase). A strided window
// then reads, for every tap, one contiguous run of a phase, and a whole output plane is one flat
// run (see window_planes), so even 7x7 planes fill whole vectors.
void fill_phases(const float* x, const ConvShape& s, int64_t hq, int64_t wq, float pad,
                 float* ph) {
  for (int a = 0; a < s.sh; ++a)
    for (int b = 0; b < s.sw; ++b)
      fill_phase(x, s, a, b, hq, wq, pad, ph + (a * s.sw + b) * hq * wq);
}

// op: 0 depthwise (w, bias per plane), 1 max, 2 sum
// y_plane: floats from one output plane to the next (0: oh * ow; a band of a larger output)
void window_planes(int op, const float* w, const float* x, const ConvShape& s, float pad,
                   const float* bias, int act, float lo, float hi, float* y, int64_t y_plane = 0) {
  if (y_plane == 0) y_plane = s.oh * s.ow;
  const KernelTable& kt = kernels();
  const int64_t planes = s.n * s.c;
  if (planes == 0 || s.oh == 0 || s.ow == 0) return;
  const int64_t hq = s.oh + (int64_t)(s.kh - 1) * s.dh / s.sh;
  const int64_t wq = s.ow + (int64_t)(s.kw - 1) * s.dw / s.sw;
  const int64_t phase = hq * wq, flat = s.oh * wq;
  const int taps = s.kh * s.kw;
  std::vector<int64_t> tap_off(taps);
  for (int i = 0; i < s.kh; ++i)
    for (int j = 0; j < s.kw; ++j) {
      const int64_t ri = (int64_t)i * s.dh, cj = (int64_t)j * s.dw;
      tap_off[i * s.kw + j] = ((ri % s.sh) * s.sw + cj % s.sw) * phase + (ri / s.sh) * wq + cj / s.sw;
    }
  parallel_range(planes, planes * flat * taps < kSerialWork, [&](int64_t pl) {
    thread_local FloatBuf t_ph, t_out;
    // slack: the flat run's last (wasted) columns read a little past the last phase
    float* ph = t_ph.get(s.sh * s.sw * phase + wq + 64);
    float* v = t_out.get(flat + 16);
    {
      const int64_t c = pl % s.c;
      fill_phases(x + pl * s.h * s.w, s, hq, wq, pad, ph);
      Epilogue ep;
      ep.bias = bias ? bias + c : nullptr;
      ep.act = act;
      ep.lo = lo;
      ep.hi = hi;
      float* out = y + pl * y_plane;
      // Wide stride-1 rows write the output row by row; elsewhere one flat run over the plane
      // (wasted columns included) fills more whole vectors and a copy drops the waste. 32
      // channels at 112x112: 0.205 ms against 0.251; 56x56 4% faster; 28x28 17% and stride 2
      // 0-7% slower row by row (1 thread, AVX-512).
      if (wq != s.ow && s.sw == 1 && s.ow >= 56) {
        kt.window_plane(op, ph, tap_off.data(), taps, wq, w ? w + c * taps : nullptr, s.oh, s.ow, out, ep);
      } else {
        kt.window_plane(op, ph, tap_off.data(), taps, 0, w ? w + c * taps : nullptr, 1, flat,
                        wq == s.ow ? out : v, ep);
        if (wq != s.ow)
          for (int64_t oy = 0; oy < s.oh; ++oy) copy_run(v + oy * wq, 0, s.ow, out + oy * s.ow);
      }
    }
  });
}

}  // namespace

ConvPlan plan_conv(const ConvShape& s, bool sparse) {
  ConvPlan p;
  const int64_t cg = s.c / s.group, taps = (int64_t)s.kh * s.kw;
  p.koff.resize(cg * taps);
  if (s.kh == 1 && s.kw == 1 && s.sh == 1 && s.sw == 1 && s.pt == 0 && s.pl == 0 && s.pb == 0 &&
      s.pr == 0) {
    p.mode = ConvPlan::kDirect;
    p.n_virtual = s.h * s.w;
    for (int64_t c = 0; c < cg; ++c) p.koff[c] = c * s.h * s.w;
    return p;
  }
  // Phased: each tap of the window reads a shifted copy of one phase plane, so X needs no
  // im2col; the price is (wq - ow) wasted columns per output row.
  const int64_t di = (int64_t)(s.kh - 1) * s.dh / s.sh, dj = (int64_t)(s.kw - 1) * s.dw / s.sw;
  p.hq = s.oh + di;
  p.wq = s.ow + dj;
  const int64_t plane = p.hq * p.wq, ch = (int64_t)s.sh * s.sw * plane;
  const int64_t phase_buf = cg * ch + p.wq + 64;  // slack: the last wasted columns read past the end
  std::vector<int64_t> poff(cg * taps);
  for (int64_t c = 0; c < cg; ++c)
    for (int i = 0; i < s.kh; ++i)
      for (int j = 0; j < s.kw; ++j) {
        const int64_t ri = (int64_t)i * s.dh, cj = (int64_t)j * s.dw;
        poff[(c * s.kh + i) * s.kw + j] = c * ch + ((ri % s.sh) * s.sw + cj % s.sw) * plane +
                                          (ri / s.sh) * p.wq + cj / s.sw;
      }
  // Dense weights over windows larger than 1x1 run rowwise (conv_rowwise): against the phased
  // or im2col GEMM, ResNet-50's 3x3 layers ran 1.00-1.19x as fast (AVX-512, 1 thread; 1.21x on
  // 14x14 and 7x7 at 2 threads), its 7x7 stem 1.21x, a 5x5 on 28x28 1.27x. On 1x1 strided ones
  // it lost 6-28% (the phased GEMM reads those without waste). It wants whole row vectors per
  // group, and on CPUs whose tile is narrower than an AVX-512 one (6 columns) rows that cut into
  // short runs: the AVX2 build lost 13% on 7x7 planes (runs of 3 and 4).
  const KernelTable& kt = kernels();
  const int64_t mg = s.m / s.group, tc = kt.gemm_t_cols, runs = (s.ow + tc - 1) / tc;
  if (!sparse && taps > 1 && mg >= kt.conv_t_panels * kGemmMR &&
      (kt.conv_t_panels > 1 || s.ow >= runs * (tc - 1))) {
    p.mode = ConvPlan::kRowwise;
    p.n_virtual = s.oh * s.ow;
    p.buf = phase_buf;
    p.koff = std::move(poff);
    return p;
  }
  const int64_t vw = kt.simd_width;
  const bool free_waste = sparse && (s.oh * p.wq + vw - 1) / vw <= (s.oh * s.ow + vw - 1) / vw;
  // The sparse kernel tolerates more waste than the dense one: its im2col copy is a larger share
  // of a layer that does a tenth of the products (ResNet-50's 3x3 on 7x7, 29% wasted columns:
  // 0.76 ms phased against 0.88 with im2col, AVX2, 90% sparse). The dense kernel pays for every
  // wasted column, but 14x14 outputs (16 columns a row, 14% waste) still ran phased in 0.81 ms
  // against 0.94 with im2col at 2 threads, 1.47 against 1.53 at 1 (256 channels, AVX-512; AVX2
  // had measured 3.18 against 3.03 at 1 thread before im2col gathered from phase planes). 7x7
  // ones (8 a row, 29% waste) stay im2col: 4.05 against 3.19 phased (AVX2), and im2col's 49
  // columns also take the narrow kernel.
  const int64_t max_waste = sparse ? 135 : 115;
  if (p.wq * 100 <= s.ow * max_waste || free_waste) {
    p.mode = ConvPlan::kPhased;
    p.n_virtual = s.oh * p.wq;
    p.buf = phase_buf;
    p.koff = std::move(poff);
    return p;
  }
  // im2col, gathered from the same phase planes: each K row is oh runs of ow floats at a pitch
  // of wq, with no bounds to test (the planes hold the padding)
  p.mode = ConvPlan::kIm2col;
  p.n_virtual = s.oh * s.ow;
  p.buf = cg * taps * p.n_virtual + 16;
  for (int64_t k = 0; k < cg * taps; ++k) p.koff[k] = k * p.n_virtual;
  p.phase_buf = phase_buf;
  p.poff = std::move(poff);
  return p;
}

namespace {

// Phase planes of the zero-padded input for channels [0, cg): phase (a, b) holds padded rows
// a, a + sh, ... and columns b, b + sw, ...; phases no tap reads are skipped.
void fill_conv_phases(const float* x, int64_t cg, const ConvShape& s, const ConvPlan& p,
                      float* buf) {
  const int64_t plane = p.hq * p.wq, ch = (int64_t)s.sh * s.sw * plane;
  std::vector<char> used(s.sh * s.sw, 0);
  for (int i = 0; i < s.kh; ++i)
    for (int j = 0; j < s.kw; ++j)
      used[((int64_t)i * s.dh % s.sh) * s.sw + (int64_t)j * s.dw % s.sw] = 1;
  const int64_t nph = (int64_t)s.sh * s.sw;
  parallel_range(cg * nph, cg * ch < kSerialWork, [&](int64_t idx) {
    const int64_t c = idx / nph, ph = idx % nph;
    if (used[ph])
      fill_phase(x + c * s.h * s.w, s, (int)(ph / s.sw), (int)(ph % s.sw), p.hq, p.wq, 0.f,
                 buf + c * ch + ph * plane);
  });
}

// cols[k][oy * ow + ox] = ph[poff[k] + oy * wq + ox]: im2col from the padded phase planes.
// Runs of ow floats as 4-float pieces (the last one overlapping the one before), which compile
// to plain vector moves: the bounds-tested per-row copy this replaces spent 0.26 ms on ResNet-50's
// 512-channel 3x3 conv on 7x7 (28-byte memcpy calls), 17% of the layer.
void gather_cols(const float* ph, const int64_t* poff, int64_t rows, const ConvShape& s,
                 int64_t wq, float* cols) {
  const int64_t plane = s.oh * s.ow, ow = s.ow;
  parallel_range(rows, rows * plane < kSerialWork, [&](int64_t k) {
    const float* src = ph + poff[k];
    float* dst = cols + k * plane;
    for (int64_t oy = 0; oy < s.oh; ++oy, src += wq, dst += ow) {
      if (ow < 4) {
        for (int64_t q = 0; q < ow; ++q) dst[q] = src[q];
        continue;
      }
      int64_t q = 0;
      for (; q + 4 <= ow; q += 4) std::memcpy(dst + q, src + q, 16);
      if (q < ow) std::memcpy(dst + ow - 4, src + ow - 4, 16);
    }
  });
}

thread_local FloatBuf t_phases;

// y[m][oy][ox] = act(v[m][oy * wq + ox] + res) : drops the wasted columns of the phased layout.
// One loop per case with no test per element, so the compiler vectorizes each (relu / clip as
// max(lo, v) then min(hi, v), which keep a NaN v as act_scalar does).
void compact_row(const float* __restrict src, const float* __restrict r, int64_t n, int act,
                 float lo, float hi, float* __restrict d) {
  if (act != kActNone && act != kActRelu && act != kActClip) {
    for (int64_t i = 0; i < n; ++i) d[i] = act_scalar(src[i] + (r ? r[i] : 0.f), act, lo, hi);
  } else if (act != kActNone) {
    if (r) {
      for (int64_t i = 0; i < n; ++i) {
        const float t = src[i] + r[i];
        const float u = lo > t ? lo : t;
        d[i] = hi < u ? hi : u;
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const float u = lo > src[i] ? lo : src[i];
        d[i] = hi < u ? hi : u;
      }
    }
  } else if (r) {
    for (int64_t i = 0; i < n; ++i) d[i] = src[i] + r[i];
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = src[i];
  }
}

void compact(const float* v, int64_t rows, const ConvShape& s, int64_t wq, const float* res,
             int act, float lo, float hi, float* y) {
  const int64_t plane = s.oh * s.ow;
  parallel_range(rows, rows * plane < kSerialWork, [&](int64_t m) {
    for (int64_t oy = 0; oy < s.oh; ++oy)
      compact_row(v + m * s.oh * wq + oy * wq, res ? res + m * plane + oy * s.ow : nullptr, s.ow,
                  act, lo, hi, y + m * plane + oy * s.ow);
  });
}

thread_local FloatBuf t_virt;

// Dense conv, rowwise: output channels along the vectors (KernelTable::conv_tile_t), each tile a
// run of up to gemm_t_cols pixels of one output row read in place from the phase planes, so no
// X is packed and no column wasted. Units are row blocks (whole weight panels) x ranges of
// output rows.
void conv_rowwise(const float* wp, int64_t mg, int64_t kg, const float* ph, const ConvPlan& p,
                  const ConvShape& s, const Epilogue& ep, float* y, float* pooled = nullptr) {
  const KernelTable& kt = kernels();
  const int64_t vp = kt.conv_t_panels;
  const int64_t panels = (mg + kGemmMR - 1) / kGemmMR, plane = s.oh * s.ow;
  // The widest tile (AVX-512: 64 rows x up to 6 columns) where rows split into runs of 5 or 6:
  // ResNet-50's 3x3 layers on 56x56 and 28x28 ran 1.03-1.08x faster than 48 x 8 tiles, those
  // on 14x14 (runs of 4 and 5) 4% and on 7x7 (3 and 4) 23% slower (1 thread).
  const int64_t wc = kt.conv_t_wide_cols;
  const bool wide = kt.conv_t_rows > kt.gemm_t_rows && s.ow >= 5 * ((s.ow + wc - 1) / wc);
  const int64_t tc = wide ? wc : kt.gemm_t_cols;
  const int64_t tpan = (wide ? kt.conv_t_rows : kt.gemm_t_rows) / kGemmMR;
  // blocks of tpan panels; a short last block is evened out with the one before it (a block of
  // one or two panels would use a third of the tile's row vectors)
  std::vector<int64_t> bp{0};
  while (bp.back() < panels) bp.push_back(std::min(panels, bp.back() + tpan));
  const int64_t nb = (int64_t)bp.size() - 1;
  if (nb >= 2 && bp[nb] - bp[nb - 1] < tpan / 2 + 1) {
    const int64_t two = bp[nb] - bp[nb - 2];
    bp[nb - 1] = bp[nb - 2] + (two / 2 + 1) / 2 * 2;
  }
  const int64_t segs = (s.ow + tc - 1) / tc;
  const int64_t nt = num_threads();
  const int64_t work = mg * kg * plane;
  const int64_t ychunks = nt == 1 || work < kSerialWork ? 1 : std::min<int64_t>(s.oh, (8 * nt + nb - 1) / nb);
  // Row block major keeps each thread on its weight rows; where a block's weights are small
  // (the 7x7 stem's: 37 KB) output-row major instead keeps each thread on its part of the input
  // (stem 6% faster at 2 threads, the 3x3 layers with 74-885 KB blocks 1-5% slower).
  const bool ymajor = tpan * kGemmMR * kg * (int64_t)sizeof(float) <= 64 * 1024;
  // Output rows [oy0, oy1) of row block b into dst (row oy0 of the block's first channel, a
  // channel every ldy floats); the residual, if any, is laid out as y.
  auto rows = [&](int64_t b, int64_t oy0, int64_t oy1, float* dst, int64_t ldy) {
    const int64_t r0 = bp[b] * kGemmMR, nr = std::min(mg, bp[b + 1] * kGemmMR) - r0;
    const float* w = wp + r0 * kg;  // r0 starts a row vector: blocks are whole vectors
    Epilogue e = ep;
    if (e.bias) e.bias += r0;
    for (int64_t oy = oy0; oy < oy1; ++oy)
      for (int64_t g = 0; g < segs; ++g) {
        const int64_t c0 = s.ow * g / segs, cols = s.ow * (g + 1) / segs - c0;
        if (ep.res) e.res = ep.res + r0 * plane + oy * s.ow + c0;
        kt.conv_tile_t(kg, kg * vp * kGemmMR, w, ph + oy * p.wq + c0, p.koff.data(), (int)nr,
                       (int)cols, dst + (oy - oy0) * s.ow + c0, ldy, kTileFirst | kTileLast, e);
      }
  };
  auto unit = [&](int64_t u) {
    const int64_t b = ymajor ? u % nb : u / ychunks, yc = ymajor ? u / nb : u % ychunks;
    const int64_t oy0 = s.oh * yc / ychunks, oy1 = s.oh * (yc + 1) / ychunks;
    rows(b, oy0, oy1, y + bp[b] * kGemmMR * plane + oy0 * s.ow, plane);
  };
  if (pooled) {
    // Fused 3x3 stride-2 max pool (pads 1): each unit computes the conv rows its pooled rows
    // read (one row again at each chunk's top) into scratch and pools them from there, so the
    // conv's output never goes to memory. Chunks of up to 8 pooled rows (17 conv rows for 16),
    // as many per thread (ResNet's 56 pooled rows: 8 chunks of 7 on 2 threads, not 4 + 3 of 8).
    const int64_t poh = (s.oh - 1) / 2 + 1, pow_ = (s.ow - 1) / 2 + 1, pplane = poh * pow_;
    const int64_t per = nt == 1 ? 1 : nt / std::gcd(nt, nb);  // chunks a multiple of this
    const int64_t pch = std::min(poh, (poh + 8 * per - 1) / (8 * per) * per);
    const int64_t rvec = (int64_t)kt.conv_t_panels * kGemmMR;
    auto punit = [&](int64_t u) {
      const int64_t b = u % nb, pc = u / nb;
      const int64_t r0 = bp[b] * kGemmMR, nr = std::min(mg, bp[b + 1] * kGemmMR) - r0;
      const int64_t py0 = poh * pc / pch, py1 = poh * (pc + 1) / pch;
      const int64_t cy0 = std::max<int64_t>(0, 2 * py0 - 1), cy1 = std::min(s.oh, 2 * py1);
      const int64_t crows = cy1 - cy0;
      // the conv rows as the tile holds them, channels along the vectors ([row][x][ldc]), so
      // the pool takes the max of whole vectors and only its output (a quarter of the conv's)
      // is transposed into planes; the transposing tile epilogue and the stride-2 pool along
      // the rows had taken 30% of ResNet-50's stem (1 thread)
      const int64_t ldc = (nr + rvec - 1) / rvec * rvec;
      thread_local FloatBuf t_conv, t_pool;
      float* cbuf = t_conv.get(crows * s.ow * ldc + 16);
      float* pbuf = t_pool.get(pow_ * ldc + 16);
      const float* w = wp + r0 * kg;
      Epilogue e = ep;
      if (e.bias) e.bias += r0;
      for (int64_t oy = cy0; oy < cy1; ++oy)
        for (int64_t g = 0; g < segs; ++g) {
          const int64_t c0 = s.ow * g / segs, cols = s.ow * (g + 1) / segs - c0;
          kt.conv_tile_t(kg, kg * vp * kGemmMR, w, ph + oy * p.wq + c0, p.koff.data(), (int)nr,
                         (int)cols, cbuf + ((oy - cy0) * s.ow + c0) * ldc, ldc,
                         kTileFirst | kTileLast | kTileChanVec, e);
        }
      for (int64_t py = py0; py < py1; ++py) {
        const float* in[3];
        int n = 0;
        for (int64_t iy = 2 * py - 1; iy <= 2 * py + 1; ++iy)
          if (iy >= 0 && iy < s.oh) in[n++] = cbuf + (iy - cy0) * s.ow * ldc;
        kt.max_pool3s2_cv(in, n, s.ow, ldc, pow_, pbuf);
        transpose_serial(pbuf, ldc, pow_, nr, pooled + r0 * pplane + py * pow_, pplane);
      }
    };
    if (nb * pch == 1) punit(0);
    else parallel_for(nb * pch, punit);
    return;
  }
  if (ychunks * nb == 1) unit(0);
  else parallel_for(nb * ychunks, unit);
}

}  // namespace

void run_conv2d(const WeightRef& w, const ConvPlan& p, const float* x, const ConvShape& s,
                const float* bias, const float* res, int act, float lo, float hi, float* y) {
  const int64_t cg = s.c / s.group, mg = s.m / s.group, kg = cg * s.kh * s.kw;
  const int64_t plane = s.oh * s.ow;
  if (plane == 0 || mg == 0) return;
  const bool pitched = p.mode == ConvPlan::kPhased && p.wq != s.ow;
  auto one_image = [&](int64_t img) {
    // scratch of the thread running this image (images may run on different threads)
    float* buf = p.buf ? t_cols.get(p.buf) : nullptr;
    float* virt = pitched ? t_virt.get(mg * p.n_virtual + 16) : nullptr;
    for (int64_t g = 0; g < s.group; ++g) {
      const float* xg = x + (img * s.c + g * cg) * s.h * s.w;
      if (p.mode == ConvPlan::kPhased || (p.mode == ConvPlan::kRowwise && buf))
        fill_conv_phases(xg, cg, s, p, buf);
      else if (p.mode == ConvPlan::kIm2col) {
        float* ph = t_phases.get(p.phase_buf);
        fill_conv_phases(xg, cg, s, p, ph);
        gather_cols(ph, p.poff.data(), cg * s.kh * s.kw, s, p.wq, buf);
      }
      WeightRef wg = w;
      if (w.dense_panels) wg.dense_panels += g * w.panels_per_group * w.panel_rows * kg;
      const float* rg = res ? res + (img * s.m + g * mg) * plane : nullptr;
      float* yg = y + (img * s.m + g * mg) * plane;
      Epilogue ep;
      ep.bias = bias ? bias + g * mg : nullptr;
      ep.lo = lo;
      ep.hi = hi;
      const float* src = p.mode == ConvPlan::kDirect ? xg : buf;
      if (p.mode == ConvPlan::kRowwise) {
        ep.act = act;
        ep.res = rg;
        ep.ld_res = plane;
        conv_rowwise(wg.dense_panels, mg, kg, buf ? buf : xg, p, s, ep, yg);
      } else if (pitched) {
        ep.act = rg ? kActNone : act;
        run_gemm(wg, g * mg, mg, kg, src, p.koff.data(), 1, p.n_virtual, virt, p.n_virtual, ep);
        compact(virt, mg, s, p.wq, rg, rg ? act : kActNone, lo, hi, yg);
      } else {
        ep.act = act;
        ep.res = rg;
        ep.ld_res = plane;
        run_gemm(wg, g * mg, mg, kg, src, p.koff.data(), 1, plane, yg, plane, ep);
      }
    }
  };
  // A batch that divides evenly over the threads (or is large) runs whole images per thread:
  // no split or join inside a layer and no small-layer imbalance. Kernels called from inside a
  // chunk run serially (parallel_for does not nest).
  const int nt = num_threads();
  if (nt > 1 && s.n > 1 && (s.n % nt == 0 || s.n >= 4 * nt)) parallel_for(s.n, one_image);
  else for (int64_t img = 0; img < s.n; ++img) one_image(img);
}

void run_conv2d_maxpool(const WeightRef& w, const ConvPlan& p, const float* x, const ConvShape& s,
                        const float* bias, int act, float lo, float hi, float* y) {
  const int64_t cg = s.c / s.group, mg = s.m / s.group, kg = cg * s.kh * s.kw;
  if (s.oh == 0 || s.ow == 0 || mg == 0) return;
  ConvShape ps{s.n, s.m, s.oh, s.ow, s.m, (s.oh - 1) / 2 + 1, (s.ow - 1) / 2 + 1, 3, 3, 2, 2,
               1, 1, 1, 1, 1, 1, 1};
  if (p.mode != ConvPlan::kRowwise || s.group != 1) {  // the conv, then the pool
    thread_local FloatBuf t_unpooled;  // reused across calls, not zeroed
    float* conv = t_unpooled.get(s.n * s.m * s.oh * s.ow);
    run_conv2d(w, p, x, s, bias, nullptr, act, lo, hi, conv);
    run_max_pool(conv, ps, y);
    return;
  }
  for (int64_t img = 0; img < s.n; ++img) {
    float* buf = p.buf ? t_cols.get(p.buf) : nullptr;
    const float* xi = x + img * s.c * s.h * s.w;
    if (buf) fill_conv_phases(xi, cg, s, p, buf);
    Epilogue ep;
    ep.bias = bias;
    ep.act = act;
    ep.lo = lo;
    ep.hi = hi;
    conv_rowwise(w.dense_panels, mg, kg, buf ? buf : xi, p, s, ep, nullptr,
                 y + img * s.m * ps.oh * ps.ow);
  }
}

void run_window_planes(int op, const float* w, const float* x, const ConvShape& s, float pad,
                       const float* bias, int act, float lo, float hi, float* y) {
  window_planes(op, w, x, s, pad, bias, act, lo, hi, y);
}

namespace {

// Depthwise conv for small planes: channels in groups of one vector, interleaved per pixel, so
// each tap is one vector FMA however narrow the plane (a 7x7 plane fills only half a vector).
void depthwise_channels(const float* w, const float* x, const ConvShape& s, const float* bias,
                        int act, float lo, float hi, float* y) {
  const KernelTable& kt = kernels();
  const int64_t W = kt.simd_width, taps = (int64_t)s.kh * s.kw;
  const int64_t hp = (s.oh - 1) * s.sh + (int64_t)(s.kh - 1) * s.dh + 1;
  const int64_t wp = (s.ow - 1) * s.sw + (int64_t)(s.kw - 1) * s.dw + 1;
  const int64_t groups = (s.c + W - 1) / W, plane = s.oh * s.ow;
  Epilogue ep;
  ep.act = act;
  ep.lo = lo;
  ep.hi = hi;
  parallel_range(s.n * groups, s.n * s.c * plane * taps < kSerialWork, [&](int64_t task) {
    thread_local FloatBuf t_in, t_wv, t_out, t_tr;
    const int64_t img = task / groups, c0 = task % groups * W, cn = std::min(W, s.c - c0);
    float* in = t_in.get(hp * wp * W);
    float* wv = t_wv.get((taps + 1) * W);
    float* out = t_out.get(plane * W);
    float* tr = t_tr.get(s.h * s.w * W);
    std::memset(in, 0, sizeof(float) * hp * wp * W);
    std::memset(wv, 0, sizeof(float) * (taps + 1) * W);
    const float* src = x + (img * s.c + c0) * s.h * s.w;
    const int64_t hw = s.h * s.w;
    // [cn][h * w] -> [h * w][W] by blocked transposes over the whole plane, then each input row
    // into its padded place (a scalar gather per element here took most of a small-plane layer's
    // time; transposing row by row would leave rows narrower than 16 to the scalar edge loop)
    transpose_serial(src, hw, cn, hw, tr, W);
    const int64_t rows = std::min(s.h, hp - s.pt), cols = std::min(s.w, wp - s.pl);
    for (int64_t iy = 0; iy < rows && cols > 0; ++iy)
      std::memcpy(in + ((iy + s.pt) * wp + s.pl) * W, tr + iy * s.w * W, sizeof(float) * cols * W);
    for (int64_t c = 0; c < cn; ++c) {
      for (int64_t t = 0; t < taps; ++t) wv[t * W + c] = w[(c0 + c) * taps + t];
      wv[taps * W + c] = bias ? bias[c0 + c] : 0.f;
    }
    kt.dw_channels(in, wp, wv, s.kh, s.kw, s.sh, s.sw, s.dh, s.dw, s.oh, s.ow, out, ep);
    transpose_serial(out, W, plane, cn, y + (img * s.c + c0) * plane, plane);
  });
}

}  // namespace

bool depthwise_per_plane(const ConvShape& s) {
  const int64_t plane = s.oh * s.ow;
  return !(plane <= 196 || ((s.sh > 1 || s.sw > 1) && plane <= 256));
}

void run_depthwise(const float* w, const float* x, const ConvShape& s, const float* bias, int act,
                   float lo, float hi, float* y) {
  if (s.n * s.c == 0 || s.oh == 0 || s.ow == 0) return;
  // Measured against the per-plane path on MobileNetV2 / EfficientNet shapes (AVX-512, 1 thread):
  // channel vectors win on outputs up to 14x14 (384 channels at 14x14: 53 us against 64) and
  // on strided ones up to 16x16; from 28x28 on the interleave costs more than the per-plane
  // path's partly empty vectors (192 channels at 28x28: 115 us against 87).
  if (depthwise_per_plane(s)) window_planes(0, w, x, s, 0.f, bias, act, lo, hi, y);
  else depthwise_channels(w, x, s, bias, act, lo, hi, y);
}

void run_conv1x1_depthwise(const WeightRef& w1, const float* x, int64_t c, const float* bias1,
                           int act1, float lo1, float hi1, const float* wd, const ConvShape& s,
                           const float* bias2, int act2, float lo2, float hi2, float* y) {
  const int64_t m = s.c, plane_in = s.h * s.w, plane_out = s.oh * s.ow;
  if (s.n == 0 || m == 0 || plane_out == 0) return;
  // input rows a band of `b` output rows reads, halo included
  auto rows_in = [&](int64_t b) { return (b - 1) * s.sh + (int64_t)(s.kh - 1) * s.dh + 1; };
  int64_t b = s.oh;
  while (b > 1 && m * std::min(s.h, rows_in(b)) * s.w * (int64_t)sizeof(float) > kBandBytes) --b;
  int64_t bands = (s.oh + b - 1) / b;
  const int64_t nt = num_threads();
  // at least one unit per thread; no more than the scratch size asks for, as a band's halo rows
  // run the 1x1 twice (MobileNetV2's 56x56 expansions at 2 threads in 4 bands of 14 or 7 rows
  // instead of 8: 0.19-0.20 -> 0.17 ms and 0.16 -> 0.14 ms)
  if (nt > 1 && s.n * bands < nt) bands = std::min<int64_t>(s.oh, (nt + s.n - 1) / s.n);
  const int64_t max_rows = std::min(s.h, rows_in((s.oh + bands - 1) / bands));
  auto unit = [&](int64_t u) {
    const int64_t img = u / bands, band = u % bands;
    const int64_t oy0 = s.oh * band / bands, oy1 = s.oh * (band + 1) / bands;
    if (oy1 <= oy0) return;
    const int64_t iy0 = std::max<int64_t>(0, oy0 * s.sh - s.pt);
    const int64_t iy1 = std::max(iy0, std::min(s.h, (oy1 - 1) * s.sh - s.pt + (int64_t)(s.kh - 1) * s.dh + 1));
    const int64_t cols = (iy1 - iy0) * s.w;
    thread_local FloatBuf t_band;
    thread_local std::vector<int64_t> t_koff;
    float* e = t_band.get(m * std::max<int64_t>(1, max_rows) * s.w + 16);
    if (cols > 0) {
      t_koff.resize(c);
      for (int64_t k = 0; k < c; ++k) t_koff[k] = k * plane_in + iy0 * s.w;
      Epilogue ep;
      ep.bias = bias1;
      ep.act = act1;
      ep.lo = lo1;
      ep.hi = hi1;
      run_gemm(w1, 0, m, c, x + img * c * plane_in, t_koff.data(), 1, cols, e, cols, ep);
    }
    ConvShape sb = s;
    sb.n = 1;
    sb.h = iy1 - iy0;
    sb.oh = oy1 - oy0;
    sb.pt = (int)(s.pt + iy0 - oy0 * s.sh);
    sb.pb = 0;
    window_planes(0, wd, e, sb, 0.f, bias2, act2, lo2, hi2, y + img * m * plane_out + oy0 * s.ow,
                  plane_out);
  };
  parallel_for(s.n * bands, unit);
}

}  // namespace sparsify
