// Packing of constant weights and the GEMM drivers (blocking, threading) over the kernel table.
#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "core.h"
#include "parallel.h"

namespace sparsify {
namespace {

constexpr int64_t kSpmmTileBytes = 64 * 1024;  // packed sparse X tile (measured: 16-32 KB and 256 KB slower)
// A weight takes the 4x1 block layout where its nonzeros fill at least this share of the blocks
// that hold them (the rest are stored zeros the kernel multiplies).
constexpr double kBlockFill = 0.75;
// The block kernel's tile: it loads one X vector per four FMAs, so a tile in L2 serves it well,
// and longer K blocks reload its 16 accumulators less often. ResNet-50's convs at 90% in 4x1
// blocks, in-process A/B: 1 thread 8.15 ms against 8.43 with 64 KB (32 KB 8.90, 240 KB 8.14);
// 2 threads 5.11 / 5.76 against 5.22 / 5.88.
constexpr int64_t kSpmmBlockTileBytes = 128 * 1024;
// Packed X of one narrow K block, floats: 768 KB, most of L2. Whole K (no blocks) and 384 KB
// blocks measured the same within noise on ResNet-50's 7x7 and 14x14 layers; the cap keeps
// long-K inputs from spilling to L3.
constexpr int64_t kNarrowBlock = 192 * 1024;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }


// Work below this many multiply-adds runs on the calling thread: waking a worker costs more.
constexpr int64_t kSerialWork = 32 * 1024;

// choose_grid's price of a 64-byte line read from another core or L3, in vector loads from L1.
// 16-core Xeon, two runs each, batch 1 at 16 threads: ResNet-50 90% 7.7-8.1 ms with 4, 8.9 with
// 8, 7.9-8.2 with 16; MobileNetV2 90% 2.6-2.9, 2.8, 2.4-2.7 (64: 8.2 and 2.6).
constexpr double kGridBeta = 16;

thread_local FloatBuf t_pack, t_packt, t_tile, t_shared, t_partial;

// Rows in panels of `height` (kGemmMR, or a row vector's vp * kGemmMR) interleaved along K,
// each group starting a panel: [panel][k][height], zero padded.
void pack_panels(const float* w, int64_t m, int64_t k, int64_t groups, float* dst,
                 int64_t height = kGemmMR) {
  const int64_t mg = m / groups, per_group = ceil_div(mg, height);
  std::memset(dst, 0, sizeof(float) * groups * per_group * height * k);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t r = 0; r < mg; ++r) {
      float* p = dst + ((g * per_group + r / height) * k) * height + r % height;
      const float* src = w + (g * mg + r) * k;
      for (int64_t j = 0; j < k; ++j) p[j * height] = src[j];
    }
}

// One column: a dot product per row over the plain CSR (tiles of one used lane would waste 15).
void sparse_gemv(const SparseWeight& w, int64_t m0, int64_t rows, const float* x,
                 const int64_t* koff, float* y, int64_t ldy, const Epilogue& ep) {
  const int64_t nnz = w.row_ptr[m0 + rows] - w.row_ptr[m0];
  const int64_t parts = nnz < 4 * kSerialWork ? 1 : 4 * num_threads();
  parallel_for(parts, [&](int64_t part) {
    for (int64_t i = rows * part / parts; i < rows * (part + 1) / parts; ++i) {
      const int64_t r = m0 + i;
      float acc = 0.f;
      for (int32_t j = w.row_ptr[r]; j < w.row_ptr[r + 1]; ++j) acc += w.val[j] * x[koff[w.col[j]]];
      float v = acc + (ep.bias ? ep.bias[i] : 0.f) + (ep.res ? ep.res[i * ep.ld_res] : 0.f);
      v = act_scalar(v, ep.act, ep.lo, ep.hi);
      y[i * ldy] = v;
    }
  });
}

// Packs every column tile of X once for all threads: [n / nt][K][nt], zero padded past n.
void pack_shared_tiles(const float* x, const int64_t* koff, int64_t cs, int64_t K, int64_t n,
                       int64_t nt, float* dst) {
  const int64_t tiles = ceil_div(n, nt);
  parallel_range(K, K * n < kSerialWork, [&](int64_t k) {
    for (int64_t t = 0; t < tiles; ++t) {
      float* d = dst + (t * K + k) * nt;
      const int64_t c0 = t * nt, w = std::min(nt, n - c0);
      if (cs == 1) std::memcpy(d, x + koff[k] + c0, sizeof(float) * w);
      else for (int64_t j = 0; j < w; ++j) d[j] = x[koff[k] + (c0 + j) * cs];
      for (int64_t j = w; j < nt; ++j) d[j] = 0.f;
    }
  });
}

// Few columns and a long K (ResNet-50's 7x7 layers: 49 columns, K up to 4608), or column tiles
// that would share out unevenly (14x14 planes, see sparse_gemm): each thread runs every row over
// its own range of K blocks, so it reads only its part of X (which then fits in its L2) and
// reuses each X vector for all rows; row ranges over the whole of X measured 1.0-1.2x of one
// thread on 7x7 planes. X comes packed once for all (a.packed) or each part packs its own.
// Thread 0 sums into y starting from the residual (as the tile kernel does, so y may be the
// residual's buffer), the others into scratch; one pass adds them up and applies the bias and
// activation.
void split_k(const KernelTable& kt, const SpmmArgs& a, const SparseLayout& l, int64_t m0,
             int64_t rows, int64_t n, int64_t parts, float* y, int64_t ldy, const Epilogue& ep,
             int64_t tile_floats) {
  float* partial = t_partial.get((parts - 1) * rows * n + 16);
  const Epilogue none;
  Epilogue first;
  first.res = ep.res;
  first.ld_res = ep.ld_res;
  parallel_for(parts, [&](int64_t p) {
    const int64_t b0 = l.nblocks * p / parts, b1 = l.nblocks * (p + 1) / parts;
    SpmmArgs s = a;
    s.row_ptr = a.row_ptr + b0 * a.rp_stride;
    s.nblocks = b1 - b0;
    s.koff = a.koff + b0 * l.kb;
    s.K = std::min(a.K, b1 * l.kb) - b0 * l.kb;
    s.packed = a.packed ? a.packed + b0 * l.kb * l.tile_cols : nullptr;  // else packed per part
    float* dst = p == 0 ? y : partial + (p - 1) * rows * n;
    kt.spmm(s, m0, m0 + rows, 0, n, dst, p == 0 ? ldy : n, p == 0 ? first : none,
            t_tile.get(tile_floats));
  });
  // one vector pass per partial sum, the last adding the bias and applying the activation (a
  // scalar loop with the activation's switch per element took as long as the products: ResNet-50's
  // 2048 -> 512 1x1 layer on 7x7 ran 1.03x of one thread at 2 threads)
  parallel_range(rows, rows * n * parts < kSerialWork, [&](int64_t r) {
    float* yr = y + r * ldy;
    for (int64_t p = 1; p < parts; ++p) {
      const bool last = p + 1 == parts;
      kt.act_row(yr, partial + ((p - 1) * rows + r) * n, n, 1.f,
                 last && ep.bias ? ep.bias[r] : 0.f, last ? ep.act : kActNone, ep.lo, ep.hi, yr);
    }
  });
}

// The grid of row ranges r x column ranges c (columns cut at whole vectors; r * c = nt, one unit
// per thread, each packing the X columns it reads) that costs the busiest thread least, in
// vector loads: its nonzeros (plus a per-row epilogue) times the loads per nonzero of its tiles
// (one per vector, and about 1.5 for the weight and the offset: so 2.5 on a 1-vector tile
// against 5.5 on a 4-vector one), plus kGridBeta per 64-byte line it reads from another core's
// cache or L3: its X columns (K x v vectors) and its rows' share of the weight stream (6 bytes a
// nonzero). More row ranges read X more times over; more column ranges read the weights more
// times over and make narrower tiles.
int64_t choose_grid(int64_t nt, int64_t work, int64_t nnz, int64_t K, int64_t nvec,
                    int64_t per_tile) {
  int64_t best = nt;
  double best_cost = 0;
  for (int64_t r = 1; r <= nt; ++r) {
    if (nt % r) continue;
    const int64_t v = ceil_div(nvec, nt / r);
    const double compute = (double)ceil_div(work, r) * (v + 1.5 * ceil_div(v, per_tile));
    const double lines = (double)K * v + 6.0 * nnz / (64.0 * r);
    const double cost = compute + kGridBeta * lines;
    if (r == 1 || cost < best_cost) {
      best = r;
      best_cost = cost;
    }
  }
  return best;
}

void sparse_gemm(const SparseWeight& w, const SparseLayout& l, int64_t m0, int64_t rows,
                 const float* x, const int64_t* koff, int64_t cs, int64_t n, float* y,
                 int64_t ldy, const Epilogue& ep) {
  if (n == 1) return sparse_gemv(w, m0, rows, x, koff, y, ldy, ep);
  const KernelTable& kt = kernels();
  SpmmArgs a{l.row_ptr.data(), w.M / l.rb + 1, l.off.data(), l.val.data(), m0, l.nblocks, l.kb,
             w.K, koff, x, cs};
  a.rb = l.rb;
  a.tile_nv = (int)(l.tile_cols / kt.simd_width);
  const int32_t* pre = w.row_ptr.data();  // nonzeros before each row, to balance threads
  const int64_t nnz = pre[m0 + rows] - pre[m0];
  int nt = num_threads();
  if ((nnz + rows) * n < kSerialWork) nt = 1;
  const int64_t tile_floats = std::min(l.kb, w.K) * l.tile_cols + 64;
  if (nt == 1) {
    kt.spmm(a, m0, m0 + rows, 0, n, y, ldy, ep, t_tile.get(tile_floats));
    return;
  }
  // Row range `part` of `parts`, balanced by nonzeros (+ a per-row epilogue cost), cut at whole
  // row groups for the block kernel.
  const int64_t total = nnz + 4 * rows;
  auto split = [&](int64_t part, int64_t parts) {
    if (part >= parts) return rows;
    const int64_t target = total * part / parts;
    int64_t lo = 0, hi = rows;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (pre[m0 + mid] - pre[m0] + 4 * mid < target) lo = mid + 1; else hi = mid;
    }
    return std::min(rows, (lo + l.rb / 2) / l.rb * l.rb);
  };
  const int64_t vw = kt.simd_width, per_tile = l.tile_cols / vw, nvec = ceil_div(n, vw);
  const int64_t ntiles = ceil_div(nvec, per_tile);
  // one unit per thread: row range u / c x column range u % c, cut at whole vectors
  auto grid = [&](int64_t r) {
    const int64_t c = nt / r;
    parallel_for(nt, [&](int64_t u) {
      const int64_t rr = u / c, cc = u % c;
      const int64_t c0 = std::min(n, nvec * cc / c * vw), c1 = std::min(n, nvec * (cc + 1) / c * vw);
      const int64_t r0 = split(rr, r), r1 = split(rr + 1, r);
      if (c1 > c0 && r1 > r0)
        kt.spmm(a, m0 + r0, m0 + r1, c0, c1, y, ldy, ep, t_tile.get(tile_floats));
    });
  };
  // From 3 threads on, every split but the long-K one below is the grid of choose_grid, where X
  // is read in place (cs == 1; BERT's transposed X is packed once for all threads instead, as
  // its gather costs more than a copy: the grid ran 14% slower at 4 threads, the same at 8-16).
  // On a 16-core Xeon, ResNet-50 90% at batch 1 ran 7.9-8.2 ms with it against 17.3-17.5 ms
  // with the splits below (onnxruntime 10.4-10.8), 9.8-13.0 against 14.3-22.1 at 8 threads
  // (ort 17.4-17.9), and MobileNetV2 90% 2.4-2.7 ms against 3.4-4.1 at 16 threads: whole-tile
  // column chunks that share out unevenly at 8-16 threads had sent each thread to pack all of
  // X, and the shared packing of 28x28 and 14x14 layers had each thread read all of it from
  // other cores. At 2 threads the splits below stay, tuned there (the grid would split
  // ResNet-50's 14x14 layers by columns, measured 5% slower in the model).
  if (nt > 2 && cs == 1 && !(ntiles < nt && l.nblocks >= 2 * nt))
    return grid(choose_grid(nt, total, nnz, w.K, nvec, per_tile));
  if (ntiles >= nt) {
    // Column chunks of whole tiles, up to 4 per thread, each packing its own X; with fewer than
    // 2 per thread, row ranges too. Each range packs its X again: with 4 units per thread the
    // copies cost ResNet-50's 7x7 layers (2 tiles, K up to 4608) 5-20% at 2 threads against 2
    // units per thread, and the 14x14 3x3 layers 5-8% (layers 2.5-3% faster in all, Zen 3).
    // Chunks that cut tiles into 3-vector pieces (as 28 vectors in 8 chunks did) run the
    // narrower kernel: 1.4x of one thread on ResNet-50's 14x14 3x3 layer against 1.85x with
    // whole tiles.
    int64_t cchunks = std::min<int64_t>(ntiles, 4 * nt);
    int64_t rparts = std::min<int64_t>(4, ceil_div(2 * nt, cchunks));
    // The pool gives each thread a contiguous run of units; where the column chunks would share
    // out unevenly (ResNet-50's 14x14 planes: 3 whole tiles and a quarter one, 2 + 1.25 on 2
    // threads), each thread takes a range of the K blocks over all rows and columns (split_k)
    // where there is a block per thread, else a row range over all columns, balanced by
    // nonzeros, at the price of packing every X tile once per thread (those layers ran
    // 1.16-1.43x faster that way than with uneven chunks). split_k reads each X row on one
    // thread only, the one that (splitting the layer before by its rows) wrote it, and leaves
    // each core the residual rows its next 1x1 layer reads: in-process A/B at 2 threads,
    // ResNet-50 90% 11.08 -> 10.84 ms (its 14x14 1024 -> 256 layers 0.127 -> 0.096), in 4x1
    // blocks 9.39 -> 8.96 (the 256 -> 1024 + residual after them 0.114 -> 0.063), MobileNetV2
    // 90% 2.97 -> 2.86; the 14x14 3x3 layers the same. Where the chunks share out within 10%
    // (28x28 and 56x56 planes) the extra packing of row ranges lost 10-35% (AVX-512).
    if (rparts == 1) {
      auto vecs = [&](int64_t c0, int64_t c1) {  // vectors of column chunks [c0, c1)
        const int64_t a = std::min(n, ntiles * c0 / cchunks * l.tile_cols);
        const int64_t b = std::min(n, ntiles * c1 / cchunks * l.tile_cols);
        return ceil_div(b, vw) - ceil_div(a, vw);
      };
      int64_t most = 0;
      for (int64_t t = 0; t < nt; ++t)
        most = std::max(most, vecs(split_point(cchunks, nt, t), split_point(cchunks, nt, t + 1)));
      if (10 * most * nt > 11 * nvec) {
        if (l.nblocks >= nt) return split_k(kt, a, l, m0, rows, n, nt, y, ldy, ep, tile_floats);
        cchunks = 1;
        rparts = nt;
      }
    }
    // Row range major: the pool hands each thread a contiguous run of units, so a thread keeps
    // one row range (its weights stay in its L2 across the column chunks). Column chunk major
    // gave both threads every row of BERT's FFN weights (1.4 MB each at 90%): 12% slower.
    parallel_for(cchunks * rparts, [&](int64_t i) {
      const int64_t r = i / cchunks, c = i % cchunks;
      const int64_t c0 = std::min(n, ntiles * c / cchunks * l.tile_cols);
      const int64_t c1 = std::min(n, ntiles * (c + 1) / cchunks * l.tile_cols);
      const int64_t r0 = split(r, rparts), r1 = split(r + 1, rparts);
      if (c1 > c0 && r1 > r0)
        kt.spmm(a, m0 + r0, m0 + r1, c0, c1, y, ldy, ep, t_tile.get(tile_floats));
    });
    return;
  }
  // few columns: X tiles packed once here, shared by all threads (each range packing its own
  // copy cost 8 copies of X at 2 threads)
  const int64_t NT = l.tile_cols;
  float* sh = t_shared.get(ceil_div(n, NT) * w.K * NT);
  pack_shared_tiles(x, koff, cs, w.K, n, NT, sh);
  a.packed = sh;
  a.packed_ld = w.K * NT;
  if (l.nblocks >= 2 * nt) return split_k(kt, a, l, m0, rows, n, nt, y, ldy, ep, tile_floats);
  const int64_t parts = 4 * nt;  // no packing per range: small ranges cost little, balance well
  parallel_for(parts, [&](int64_t i) {
    const int64_t r0 = split(i, parts), r1 = split(i + 1, parts);
    if (r1 > r0) kt.spmm(a, m0 + r0, m0 + r1, 0, n, y, ldy, ep, t_tile.get(tile_floats));
  });
}

// dense_block's K block: ~256 keeps a weight-panel slice in L1; up to 640 (3x3 convs with 64
// channels) one block saves the output tile's reloads.
int64_t dense_kc(int64_t K) {
  const int64_t kblocks = K <= 640 ? 1 : ceil_div(K, 256);
  return std::max<int64_t>(1, ceil_div(K, kblocks));
}

// dense_block's column block, in panels of nr columns: the packed X block held to 384 KB of L2
// (2 to 10 panels): 64 x 576 x 3264 ran at 48.8 GMAC/s against 46.7 with blocks of 192 K and 10
// panels, the other ResNet-50 shapes within 2%.
int64_t dense_block_panels(int64_t K, int64_t nr) {
  return std::max<int64_t>(2, std::min<int64_t>(10, 96 * 1024 / (dense_kc(K) * nr)));
}

// One thread's share: weight panels [p0, p1) x columns [c0, c1), packing its own X blocks so
// threads never wait on each other.
void dense_block(const float* wp, int64_t rows, int64_t K, int64_t p0, int64_t p1, const float* x,
                 const int64_t* koff, int64_t cs, int64_t c0, int64_t c1, float* y, int64_t ldy,
                 const Epilogue& ep) {
  const KernelTable& kt = kernels();
  const int64_t nr = kt.gemm_nr, vw = kt.simd_width;
  const int64_t kc_max = dense_kc(K);
  const int64_t nc_max = std::min(ceil_div(c1 - c0, nr), dense_block_panels(K, nr)) * nr;
  float* xp = t_pack.get(kc_max * nc_max + 64);
  for (int64_t n0 = c0; n0 < c1; n0 += nc_max) {
    const int64_t nc = std::min(nc_max, c1 - n0), npan = ceil_div(nc, nr);
    int64_t k0 = 0;
    do {
      const int64_t kc = std::min(kc_max, K - k0);
      kt.gemm_pack_x(x + n0 * cs, koff + k0, cs, kc, nc, xp);
      const int mode = (k0 == 0 ? kTileFirst : 0) | (k0 + kc >= K ? kTileLast : 0);
      // The next block's source rows, a slice per weight panel, on their way to L2 while this
      // block computes: packing otherwise waits on X from L3 or memory, and did not overlap
      // with the FMAs (256 x 256 x 3072 ran at 45 GMAC/s against 51 when X fit in L2).
      const bool more_k = k0 + kc < K;
      const int64_t nk0 = more_k ? k0 + kc : 0, nn0 = more_k ? n0 : n0 + nc_max;
      const int64_t nkc = nn0 < c1 && cs == 1 ? std::min(kc_max, K - nk0) : 0;
      const int64_t nnc = nkc ? std::min(nc_max, c1 - nn0) : 0;
      const int64_t per_panel = ceil_div(nkc, p1 - p0);
      for (int64_t pm = p0; pm < p1; ++pm) {
        const int64_t r = std::min<int64_t>(kGemmMR, rows - pm * kGemmMR);
        for (int64_t k = (pm - p0) * per_panel; k < std::min(nkc, (pm - p0 + 1) * per_panel); ++k) {
          const float* src = x + koff[nk0 + k] + nn0;
          for (int64_t j = 0; j < nnc; j += 16) __builtin_prefetch(src + j, 0, 2);
        }
        for (int64_t pn = 0; pn < npan; ++pn) {
          const int64_t cols = std::min(nr, nc - pn * nr);
          const int64_t col0 = n0 + pn * nr;
          Epilogue e = ep;
          if (e.bias) e.bias += pm * kGemmMR;
          if (e.res) e.res += pm * kGemmMR * e.ld_res + col0;
          kt.gemm_tile(kc, wp + pm * kGemmMR * K + k0 * kGemmMR, xp + pn * nr * kc,
                       (int)(ceil_div(cols, vw) * vw), (int)r, (int)cols,
                       y + pm * kGemmMR * ldy + col0, ldy, mode, e);
        }
      }
      k0 += kc;
    } while (k0 < K);
  }
}

// Narrow outputs, vectors along the rows (KernelTable::gemm_tile_t): per K block, X is packed
// once into column tiles of near-equal width, shared by the threads, which split the row blocks.
void dense_narrow(const float* wp, int64_t rows, int64_t K, const float* x, const int64_t* koff,
                  int64_t cs, int64_t n, float* y, int64_t ldy, const Epilogue& ep, bool serial) {
  const KernelTable& kt = kernels();
  const int64_t tc = kt.gemm_t_cols, tr = kt.gemm_t_rows;
  const int64_t ntiles = ceil_div(n, tc), rblocks = ceil_div(rows, tr);
  const int64_t kb_max = std::max<int64_t>(256, kNarrowBlock / (ntiles * tc));
  const int64_t nkb = ceil_div(K, kb_max), kb = ceil_div(K, nkb);
  float* xp = t_packt.get(ntiles * kb * tc + 64);
  // chunks: row blocks, each cut into column groups when there are too few of them to share
  // out evenly (chunks are claimed one at a time: 11 row blocks on 2 threads ran as 6 + 5)
  const int64_t groups = serial ? 1 : std::min(ntiles, ceil_div(8 * num_threads(), rblocks));
  auto col = [&](int64_t j) { return n * j / ntiles; };
  for (int64_t k0 = 0; k0 < K; k0 += kb) {
    const int64_t kc = std::min(kb, K - k0);
    const int mode = (k0 == 0 ? kTileFirst : 0) | (k0 + kc >= K ? kTileLast : 0);
    parallel_range(ntiles, serial, [&](int64_t j) {
      kt.gemm_pack_xt(x + col(j) * cs, koff + k0, cs, kc, (int)(col(j + 1) - col(j)),
                      xp + j * kc * tc);
    });
    auto unit = [&](int64_t u) {
      const int64_t b = u / groups, g = u % groups;
      const int64_t r0 = b * tr, nrows = std::min(tr, rows - r0);
      for (int64_t j = ntiles * g / groups; j < ntiles * (g + 1) / groups; ++j) {
        const int64_t c0 = col(j);
        Epilogue e = ep;
        if (e.bias) e.bias += r0;
        if (e.res) e.res += r0 * e.ld_res + c0;
        kt.gemm_tile_t(kc, K * kGemmMR, wp + r0 * K + k0 * kGemmMR, xp + j * kc * tc, (int)nrows,
                       (int)(col(j + 1) - c0), y + r0 * ldy + c0, ldy, mode, e);
      }
    };
    if (serial) for (int64_t u = 0; u < rblocks; ++u) unit(u);
    else parallel_for(rblocks * groups, unit);
  }
}

// The narrow path where the wide one would pad a short row of columns: 7x7 planes (49 columns,
// padded to 64) and 7x8 phased ones ran 1.15-1.3x faster. Where little or nothing is padded the
// wide kernel is the faster one (14x14 planes, 196 columns padded to 208: 0.85-0.97x; 28x28:
// 0.92x), and BERT's 128 tokens are not padded at all (1 thread, AVX-512, ResNet-50 shapes).
bool narrow_wins(int64_t n) {
  const KernelTable& kt = kernels();
  const int64_t nr = kt.gemm_nr, vw = kt.simd_width;
  const int64_t padded = n / nr * nr + ceil_div(n % nr, vw) * vw;
  return n <= 128 && padded > n;
}

// y[:, 0] for a single column: streams each weight panel once at memory speed.
void dense_gemv(const float* wp, int64_t rows, int64_t K, const float* x, const int64_t* koff,
                float* y, int64_t ldy, const Epilogue& ep) {
  const KernelTable& kt = kernels();
  const int64_t mpanels = ceil_div(rows, kGemmMR);
  float* xexp = t_pack.get(K * kGemmMR + 32);
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < kGemmMR; ++r) xexp[k * kGemmMR + r] = x[koff[k]];
  for (int64_t i = K * kGemmMR; i < K * kGemmMR + 32; ++i) xexp[i] = 0.f;
  const int64_t parts = rows * K < 16 * kSerialWork ? 1 : std::min<int64_t>(mpanels, 8 * num_threads());
  parallel_for(parts, [&](int64_t part) {
    const int64_t p0 = mpanels * part / parts, p1 = mpanels * (part + 1) / parts;
    float out[8 * kGemmMR];
    for (int64_t q0 = p0; q0 < p1; q0 += 8) {
      const int64_t q1 = std::min(p1, q0 + 8);
      kt.gemv(wp, q0, q1, K, xexp, out);
      for (int64_t m = q0 * kGemmMR; m < std::min(rows, q1 * kGemmMR); ++m) {
        float v = out[m - q0 * kGemmMR] + (ep.bias ? ep.bias[m] : 0.f) +
                  (ep.res ? ep.res[m * ep.ld_res] : 0.f);
        v = act_scalar(v, ep.act, ep.lo, ep.hi);
        y[m * ldy] = v;
      }
    }
  });
}

void dense_gemm(const float* wp, int64_t rows, int64_t K, const float* x, const int64_t* koff,
                int64_t cs, int64_t n, float* y, int64_t ldy, const Epilogue& ep) {
  if (n == 1) return dense_gemv(wp, rows, K, x, koff, y, ldy, ep);
  const int64_t mpanels = ceil_div(rows, kGemmMR);
  int nt = num_threads();
  if (rows * K * n < kSerialWork) nt = 1;
  if (narrow_wins(n)) return dense_narrow(wp, rows, K, x, koff, cs, n, y, ldy, ep, nt == 1);
  if (nt == 1) {
    dense_block(wp, rows, K, 0, mpanels, x, koff, cs, 0, n, y, ldy, ep);
    return;
  }
  // Column ranges of near-equal whole panels, each packing only its X, and with few of them
  // weight-panel ranges too (each packs its X again), so that chunks claimed one at a time come
  // out even (blocks of 192 columns left 784 as 4 x 192 + 16 and ran as 3 blocks + 2 on 2
  // threads).
  const int64_t nr = kernels().gemm_nr, npan = ceil_div(n, nr);
  // All columns in one of dense_block's column blocks and at least 4 weight panels a thread:
  // one panel range per thread over all columns, so each panel is read once, not once per
  // column range (ResNet-50's 256 -> 1024 1x1 layers on 14x14, 1 MB of weights: 0.39-0.42 ms
  // -> 0.31-0.34 at 2 threads; whole dense ResNet-50 3% faster, RegNetY-400MF 5%, DenseNet-121,
  // GoogLeNet and ResNet-18 the same within noise).
  const bool one_range = npan <= dense_block_panels(K, nr) && mpanels >= 4 * nt;
  const int64_t cparts = one_range ? 1 : std::min<int64_t>(npan, 8 * nt);
  const int64_t rparts = one_range ? nt : std::min<int64_t>(mpanels, ceil_div(4 * nt, cparts));
  // Panel range major, as in sparse_gemm: each thread's contiguous run of units keeps one range
  // of weight panels, which stays in its L2 across the column ranges. Column major had both
  // threads stream every panel once per column range: ResNet-50's 14x14 layers (2.4 MB of
  // weights for the 3x3 one) ran 1.08-1.24x slower at 2 threads (AVX-512).
  parallel_for(cparts * rparts, [&](int64_t i) {
    const int64_t ci = i % cparts, ri = i / cparts;
    const int64_t c0 = npan * ci / cparts * nr, c1 = std::min(n, npan * (ci + 1) / cparts * nr);
    const int64_t p0 = mpanels * ri / rparts, p1 = mpanels * (ri + 1) / rparts;
    if (c1 > c0 && p1 > p0) dense_block(wp, rows, K, p0, p1, x, koff, cs, c0, c1, y, ldy, ep);
  });
}

}  // namespace

SparseWeight::SparseWeight(const float* w, int64_t m, int64_t k) : M(m), K(k) {
  row_ptr.resize(m + 1);
  row_ptr[0] = 0;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t j = 0; j < k; ++j)
      if (w[r * k + j] != 0.f) {
        col.push_back((int32_t)j);
        val.push_back(w[r * k + j]);
      }
    if (col.size() > (size_t)INT32_MAX) throw std::invalid_argument("too many nonzeros for CSR");
    row_ptr[r + 1] = (int32_t)col.size();
  }
}

void SparseWeight::to_dense(float* out) const {
  std::memset(out, 0, sizeof(float) * M * K);
  for (int64_t r = 0; r < M; ++r)
    for (int32_t j = row_ptr[r]; j < row_ptr[r + 1]; ++j) out[r * K + col[j]] = val[j];
}

DenseWeight::DenseWeight(const float* w, int64_t m, int64_t k) : M(m), K(k) {
  pack_panels(w, m, k, 1, panels.get(std::max<int64_t>(1, ceil_div(m, kGemmMR) * kGemmMR * k)));
}

void DenseWeight::to_dense(float* out) const {
  // from the panels, or the row vectors that replaced them
  const int64_t h = stored_vp ? stored_vp * kGemmMR : kGemmMR;
  const float* p = stored_vp ? vectors.at({1, stored_vp})->data() : panels.data();
  for (int64_t r = 0; r < M; ++r)
    for (int64_t j = 0; j < K; ++j) out[r * K + j] = p[((r / h) * K + j) * h + r % h];
}

const float* DenseWeight::panels_for(int64_t groups, int64_t* per_group) {
  const int64_t mg = M / groups;
  *per_group = ceil_div(mg, kGemmMR);
  if (groups == 1 || mg % kGemmMR == 0) {
    if (stored_vp) {  // back from row vectors: both layouts stay from now on
      std::vector<float> dense(M * K);
      to_dense(dense.data());
      pack_panels(dense.data(), M, K, 1, panels.get(std::max<int64_t>(1, ceil_div(M, kGemmMR) * kGemmMR * K)));
      stored_vp = 0;
    }
    return panels.data();
  }
  auto& buf = grouped[groups];
  if (!buf) {
    std::vector<float> dense(M * K);
    to_dense(dense.data());
    buf = std::make_unique<FloatBuf>();
    pack_panels(dense.data(), M, K, groups, buf->get(groups * *per_group * kGemmMR * K));
  }
  return buf->data();
}

const float* DenseWeight::vector_panels(int64_t groups, int64_t vp, int64_t* per_group) {
  const int64_t mg = M / groups, width = vp * kGemmMR;
  *per_group = ceil_div(mg, width);
  if (vp == 1) return panels_for(groups, per_group);
  auto& buf = vectors[{groups, vp}];
  if (!buf) {
    std::vector<float> dense(M * K);
    to_dense(dense.data());
    auto b = std::make_unique<FloatBuf>();
    pack_panels(dense.data(), M, K, groups, b->get(std::max<int64_t>(1, groups * *per_group * width * K)),
                width);
    buf = std::move(b);
    if (groups == 1 && !stored_vp) {
      panels.release();
      stored_vp = vp;
    }
  }
  return buf->data();
}

WeightRef bind_weight(SparseWeight* sw, DenseWeight* dw, const std::vector<int64_t>& koff,
                      int64_t groups, int64_t cols) {
  WeightRef w;
  if (sw) {
    w.sparse = sw;
    // the block kernel runs whole row groups: every conv group must start one
    const bool blocks = groups >= 1 && sw->M % groups == 0 && (sw->M / groups) % 4 == 0;
    // outputs of at most one vector of columns (4x4 planes and smaller) take the narrow layout
    const KernelTable& kt = kernels();
    const bool narrow = cols > 0 && cols <= kt.simd_width;
    w.layout = &sw->layout_for(narrow ? kt.simd_width : kt.spmm_nt, blocks);
  } else {
    w.dense_panels = dw->panels_for(groups, &w.panels_per_group);
  }
  return w;
}

// The columns of rows [r, r + 4) within [k0, k1), merged and deduplicated into `cols`.
static void group_columns(const SparseWeight& w, int64_t r, int64_t k0, int64_t k1,
                          std::vector<int32_t>& cols) {
  cols.clear();
  for (int64_t i = r; i < r + 4; ++i) {
    const int32_t* c = w.col.data();
    const int32_t* lo = std::lower_bound(c + w.row_ptr[i], c + w.row_ptr[i + 1], k0);
    const int32_t* hi = std::lower_bound(lo, c + w.row_ptr[i + 1], k1);
    cols.insert(cols.end(), lo, hi);
  }
  std::sort(cols.begin(), cols.end());
  cols.erase(std::unique(cols.begin(), cols.end()), cols.end());
}

bool SparseWeight::four_row_blocks() {
  if (blocks_ >= 0) return blocks_;
  blocks_ = 0;
  if (M % 4 || nnz() == 0) return false;
  int64_t stored = 0;
  std::vector<int32_t> cols;
  for (int64_t r = 0; r < M; r += 4) {
    group_columns(*this, r, 0, K, cols);
    stored += 4 * (int64_t)cols.size();
  }
  // the block kernel does a multiply-add for every stored weight, zero or not, at about 1.8x
  // the rate of the unstructured one (Xeon, 90%, 64 KB tiles: 5.2 against 2.9 vector FMAs a ns)
  blocks_ = (double)nnz() >= kBlockFill * (double)stored;
  return blocks_;
}

const SparseLayout& SparseWeight::layout_for(int tile_cols, bool blocks) {
  blocks = blocks && four_row_blocks();
  auto& slot = layouts[blocks ? -tile_cols : tile_cols];
  if (slot) return *slot;
  auto l = std::make_unique<SparseLayout>();
  l->tile_cols = tile_cols;
  // K blocks small enough that one packed tile (kb x tile_cols floats) stays in L2
  const int64_t kb_max =
      std::max<int64_t>(1, (blocks ? kSpmmBlockTileBytes : kSpmmTileBytes) / (4 * tile_cols));
  static_assert(kSpmmTileBytes / 4 <= 65536 && kSpmmBlockTileBytes / 4 <= 65536,
                "tile offsets are 16 bits");
  l->nblocks = std::max<int64_t>(1, ceil_div(K, kb_max));
  l->kb = std::max<int64_t>(1, ceil_div(K, l->nblocks));
  if (blocks) {
    l->rb = 4;
    const int64_t groups = M / 4;
    l->row_ptr.assign(l->nblocks * (groups + 1), 0);
    std::vector<int32_t> cols;
    for (int64_t b = 0; b < l->nblocks; ++b) {
      const int64_t k0 = b * l->kb, k1 = std::min(K, k0 + l->kb);
      int32_t* rp = l->row_ptr.data() + b * (groups + 1);
      rp[0] = (int32_t)l->off.size();
      for (int64_t g = 0; g < groups; ++g) {
        group_columns(*this, 4 * g, k0, k1, cols);
        const size_t first = l->val.size();
        l->val.resize(first + 4 * cols.size(), 0.f);
        for (int64_t i = 0; i < 4; ++i) {  // each row's nonzeros into their blocks' slots
          const int64_t r = 4 * g + i;
          size_t at = 0;
          const int32_t* c = col.data();
          const int32_t j0 = (int32_t)(std::lower_bound(c + row_ptr[r], c + row_ptr[r + 1], k0) - c);
          for (int32_t j = j0; j < row_ptr[r + 1] && col[j] < k1; ++j) {
            while (cols[at] != col[j]) ++at;
            l->val[first + 4 * at + i] = val[j];
          }
        }
        for (const int32_t c : cols) l->off.push_back((uint16_t)((c - k0) * tile_cols));
        rp[g + 1] = (int32_t)l->off.size();
      }
    }
    slot = std::move(l);
    return *slot;
  }
  l->row_ptr.assign(l->nblocks * (M + 1), 0);
  l->off.reserve(col.size());
  l->val.reserve(col.size());
  for (int64_t b = 0; b < l->nblocks; ++b) {
    const int64_t k0 = b * l->kb, k1 = std::min(K, k0 + l->kb);
    int32_t* rp = l->row_ptr.data() + b * (M + 1);
    rp[0] = (int32_t)l->off.size();
    for (int64_t r = 0; r < M; ++r) {
      // columns are sorted within a row, so each block is one contiguous run
      const int32_t* c = col.data();
      const int32_t lo = (int32_t)(std::lower_bound(c + row_ptr[r], c + row_ptr[r + 1], k0) - c);
      const int32_t hi = (int32_t)(std::lower_bound(c + row_ptr[r], c + row_ptr[r + 1], k1) - c);
      for (int32_t j = lo; j < hi; ++j) {
        l->off.push_back((uint16_t)((col[j] - k0) * tile_cols));
        l->val.push_back(val[j]);
      }
      rp[r + 1] = (int32_t)l->off.size();
    }
  }
  slot = std::move(l);
  return *slot;
}

void run_gemm(const WeightRef& w, int64_t m0, int64_t rows, int64_t K, const float* x,
              const int64_t* koff, int64_t cs, int64_t n, float* y, int64_t ldy,
              const Epilogue& ep) {
  if (rows <= 0 || n <= 0) return;
  if (w.sparse) {
    sparse_gemm(*w.sparse, *w.layout, m0, rows, x, koff, cs, n, y, ldy, ep);
  } else {
    dense_gemm(w.dense_panels, rows, K, x, koff, cs, n, y, ldy, ep);
  }
}

// Entry points for linear.cpp's drivers (the functions above stay internal to this file).
void pack_weight_panels(const float* w, int64_t m, int64_t k, float* dst) {
  pack_panels(w, m, k, 1, dst);
}

void sparse_gemm_rows(const WeightRef& w, int64_t m0, int64_t rows, const float* x,
                      const int64_t* koff, int64_t cs, int64_t n, float* y, int64_t ldy,
                      const Epilogue& ep) {
  sparse_gemm(*w.sparse, *w.layout, m0, rows, x, koff, cs, n, y, ldy, ep);
}

void dense_gemm_threaded(const float* wp, int64_t rows, int64_t K, const float* x,
                         const int64_t* koff, int64_t cs, int64_t n, float* y, int64_t ldy,
                         const Epilogue& ep) {
  dense_gemm(wp, rows, K, x, koff, cs, n, y, ldy, ep);
}

void dense_gemm_serial(const float* wp, int64_t rows, int64_t K, const float* x,
                       const int64_t* koff, int64_t cs, int64_t c0, int64_t c1, float* y,
                       int64_t ldy, const Epilogue& ep) {
  dense_block(wp, rows, K, 0, ceil_div(rows, kGemmMR), x, koff, cs, c0, c1, y, ldy, ep);
}

}  // namespace sparsify
