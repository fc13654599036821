// Pooling, global average pooling, the fused elementwise add + activation, and the row-wise
// softmax / layer normalization over the last axis.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core.h"
#include "parallel.h"

namespace sparsify {
namespace {

constexpr int64_t kSerialWork = 32 * 1024;

}  // namespace

// 3x3 stride 2 (dilation 1) row by row straight from x: the vertical max of the window's rows,
// then the horizontal one (KernelTable::max_pool3s2_row): 1.2-1.4x faster than the phase-plane
// path, which copies each padded plane into 4 phases and reads them 9 times, and 1.1-1.6x
// onnxruntime on ResNet-50's and GoogLeNet's pools (Zen 3, 1 and 2 threads). Other windows keep
// that path: row by row measured slower on stride 1 (28x28 and 7x7 planes) and on 2x2.
void run_max_pool(const float* x, const ConvShape& s, float* y) {
  if (s.kh != 3 || s.kw != 3 || s.sh != 2 || s.sw != 2 || s.dh != 1 || s.dw != 1) {
    run_window_planes(1, nullptr, x, s, -INFINITY, nullptr, kActNone, 0.f, 0.f, y);
    return;
  }
  const int64_t planes = s.n * s.c;
  if (planes == 0 || s.oh == 0 || s.ow == 0) return;
  const KernelTable& kt = kernels();
  parallel_range(planes, planes * s.oh * s.ow * 9 < kSerialWork, [&](int64_t p) {
    thread_local FloatBuf t_vm;
    float* vm = t_vm.get(2 * s.ow + 1 + 16);
    const float* plane = x + p * s.h * s.w;
    const float* rows[3];
    for (int64_t oy = 0; oy < s.oh; ++oy) {
      int nrows = 0;
      for (int i = 0; i < 3; ++i) {
        const int64_t iy = oy * 2 + i - s.pt;
        if (iy >= 0 && iy < s.h) rows[nrows++] = plane + iy * s.w;
      }
      kt.max_pool3s2_row(rows, nrows, s.w, s.pl, s.ow, vm, y + (p * s.oh + oy) * s.ow);
    }
  });
}

void run_avg_pool(const float* x, const ConvShape& s, bool count_include_pad, float* y) {
  run_window_planes(2, nullptr, x, s, 0.f, nullptr, kActNone, 0.f, 0.f, y);
  // divisor per output cell is separable: rows x columns inside the counted region
  std::vector<float> rh(s.oh), rw(s.ow);
  auto count = [&](int64_t o, int64_t stride, int64_t pad0, int64_t pad1, int64_t k,
                   int64_t size) {
    const int64_t start = o * stride - pad0;
    if (count_include_pad) return std::min(start + k, size + pad1) - start;
    return std::min(start + k, size) - std::max<int64_t>(start, 0);
  };
  for (int64_t o = 0; o < s.oh; ++o) rh[o] = (float)count(o, s.sh, s.pt, s.pb, s.kh, s.h);
  for (int64_t o = 0; o < s.ow; ++o) rw[o] = (float)count(o, s.sw, s.pl, s.pr, s.kw, s.w);
  const int64_t planes = s.n * s.c;
  parallel_range(planes, planes * s.oh * s.ow < kSerialWork, [&](int64_t pl) {
    for (int64_t oy = 0; oy < s.oh; ++oy) {
      float* d = y + (pl * s.oh + oy) * s.ow;
      for (int64_t ox = 0; ox < s.ow; ++ox) d[ox] /= rh[oy] * rw[ox];
    }
  });
}

void run_global_avg_pool(const float* x, int64_t planes, int64_t size, float* y) {
  parallel_range(planes, planes * size < kSerialWork, [&](int64_t p) {
    const float* src = x + p * size;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= size; i += 8)
      for (int j = 0; j < 8; ++j) acc[j] += src[i + j];
    double total = 0.0;
    for (int j = 0; j < 8; ++j) total += acc[j];
    for (; i < size; ++i) total += src[i];
    y[p] = size ? (float)(total / (double)size) : NAN;
  });
}

void run_add_act(const float* a, const float* b, int64_t n, int act, float lo, float hi,
                 float* y) {
  const KernelTable& kt = kernels();
  constexpr int64_t kChunk = 16 * 1024;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  parallel_range(chunks, n < 8 * kSerialWork, [&](int64_t c) {
    const int64_t i = c * kChunk, len = std::min(n, i + kChunk) - i;
    kt.act_row(a + i, b ? b + i : nullptr, len, 1.f, 0.f, act, lo, hi, y + i);
  });
}

void run_channel_affine(const float* x, int64_t n, int64_t c, int64_t hw, const float* scale,
                        const float* shift, int64_t per, int act, float lo, float hi, float* y) {
  const KernelTable& kt = kernels();
  // planes of at least 4K floats each, or runs of whole small planes
  const int64_t run = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, hw));
  const int64_t planes = n * c, chunks = (planes + run - 1) / run;
  parallel_range(chunks, planes * hw < 8 * kSerialWork, [&](int64_t k) {
    for (int64_t p = k * run; p < std::min(planes, (k + 1) * run); ++p)
      kt.act_row(x + p * hw, nullptr, hw, scale[p % per], shift ? shift[p % per] : 0.f, act, lo,
                 hi, y + p * hw);
  });
}

void run_softmax(const float* x, int64_t rows, int64_t n, float* y) {
  const KernelTable& kt = kernels();
  parallel_range(rows, rows * n < kSerialWork, [&](int64_t r) { kt.softmax_row(x + r * n, n, y + r * n); });
}

void run_layer_norm(const float* x, int64_t rows, int64_t n, const float* scale,
                    const float* bias, float eps, float* y) {
  const KernelTable& kt = kernels();
  parallel_range(rows, rows * n < kSerialWork, [&](int64_t r) {
    kt.layer_norm_row(x + r * n, n, scale, bias, eps, y + r * n);
  });
}

}  // namespace sparsify
