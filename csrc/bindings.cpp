// The only file that sees Python: checks arrays, turns them into raw pointers, releases the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <vector>
#include <array>
#include <map>
#include <memory>

#include <cmath>
#include <optional>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <stdexcept>
#include <string>

#include "core.h"

namespace nb = nanobind;
using namespace sparsify;

namespace {

using In = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using Out = nb::ndarray<float, nb::c_contig, nb::device::cpu>;
using OptIn = std::optional<In>;

[[noreturn]] void fail(const std::string& msg) { throw nb::value_error(msg.c_str()); }

void expect(bool ok, const std::string& what) {
  if (!ok) fail(what);
}

std::string shape_of(const In& a) {
  std::string s = "(";
  for (size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + ")";
}

int64_t numel(const In& a) {
  int64_t n = 1;
  for (size_t i = 0; i < a.ndim(); ++i) n *= (int64_t)a.shape(i);
  return n;
}
int64_t numel(const Out& a) {
  int64_t n = 1;
  for (size_t i = 0; i < a.ndim(); ++i) n *= (int64_t)a.shape(i);
  return n;
}

struct ActArgs {
  int act;
  float lo, hi;
};

ActArgs act_args(int act, float lo, float hi) {
  expect(act >= kActNone && act <= kActLast,
         "act code must be 0 (none), 1 (relu), 2 (clip), 3 (gelu), 4 (sigmoid), 5 (silu), "
         "6 (hardsigmoid) or 7 (hardswish)");
  if (act == kActRelu) return {kActRelu, 0.f, INFINITY};
  return {act, lo, hi};
}

const float* vec_or_null(const OptIn& b, int64_t n, const char* what) {
  if (!b) return nullptr;
  expect(numel(*b) == n, std::string(what) + " has " + std::to_string(numel(*b)) +
                             " values, expected " + std::to_string(n));
  return b->data();
}

const float* same_or_null(const OptIn& r, int64_t n, const char* what) {
  if (!r) return nullptr;
  expect(numel(*r) == n, std::string(what) + " must have the output's shape");
  return r->data();
}

// An operand that shares memory with the output is copied first, except a residual that is the
// output itself: the GEMM kernels start each sum from the residual, reading every residual
// element before writing that output element (the engine writes a residual layer into its
// residual's buffer).
const float* unaliased(const float* a, int64_t n, const float* y, int64_t ny, bool same_ok,
                       std::vector<float>& copy) {
  if (!a || n <= 0 || ny <= 0 || a + n <= y || y + ny <= a || (same_ok && a == y)) return a;
  copy.assign(a, a + n);
  return copy.data();
}

void check_out(const Out& y, std::initializer_list<int64_t> shape, const char* what) {
  expect(y.ndim() == shape.size(), std::string(what) + ": out has the wrong rank");
  size_t i = 0;
  for (int64_t d : shape) expect((int64_t)y.shape(i++) == d, std::string(what) + ": out has the wrong shape");
}

DenseWeight* as_dense(nb::handle h) { return nb::isinstance<DenseWeight>(h) ? nb::cast<DenseWeight*>(h) : nullptr; }
SparseWeight* as_sparse(nb::handle h) { return nb::isinstance<SparseWeight>(h) ? nb::cast<SparseWeight*>(h) : nullptr; }

void weight_dims(nb::handle h, SparseWeight*& s, DenseWeight*& d, int64_t& m, int64_t& k) {
  s = as_sparse(h);
  d = as_dense(h);
  if (s) { m = s->M; k = s->K; return; }
  if (d) { m = d->M; k = d->K; return; }
  throw nb::type_error("weight must be a SparseWeight or DenseWeight");
}

ConvShape conv_shape(const In& x, int64_t m, const Out& y, int kh, int kw, int sh, int sw, int pt,
                     int pl, int pb, int pr, int dh, int dw, int group) {
  expect(x.ndim() == 4 && y.ndim() == 4, "conv/pool input and output must be NCHW");
  expect(kh > 0 && kw > 0 && sh > 0 && sw > 0 && dh > 0 && dw > 0,
         "kernel sizes, strides and dilations must be positive");
  expect(pt >= 0 && pl >= 0 && pb >= 0 && pr >= 0, "pads must be non-negative");
  ConvShape s{(int64_t)x.shape(0), (int64_t)x.shape(1), (int64_t)x.shape(2), (int64_t)x.shape(3),
              m, (int64_t)y.shape(2), (int64_t)y.shape(3), kh, kw, sh, sw, pt, pl, pb, pr, dh, dw,
              group};
  expect((int64_t)y.shape(0) == s.n && (int64_t)y.shape(1) == m, "out has the wrong N or C");
  // every window the output asks for must start inside the padded input
  expect(s.oh == 0 || (s.oh - 1) * sh <= s.h + pt + pb - 1 + sh, "out height too large");
  expect(s.ow == 0 || (s.ow - 1) * sw <= s.w + pl + pr - 1 + sw, "out width too large");
  return s;
}

// An optional layer normalization of a layer's input rows (scale null: none).
const RowNorm* row_norm(const OptIn& scale, const OptIn& bias, float eps, int64_t n, RowNorm& ln) {
  if (!scale) return nullptr;
  ln.scale = vec_or_null(scale, n, "layer norm scale");
  ln.bias = vec_or_null(bias, n, "layer norm bias");
  ln.eps = eps;
  return &ln;
}

// plan_conv's result for a shape, kernel kind and ISA, made once: an engine calls each layer with
// the same shape on every run, and planning a 3x3 conv over 512 channels (offsets for 4608 K
// rows) took a few microseconds per call on the calling thread (ResNet-50 90% at 2 threads
// 2% faster with plans kept, 10.02 against 10.23 ms). Filled under the GIL; map nodes
// never move, so a plan stays valid while the GIL is released. Past kMaxPlans shapes, plans are
// made per call again.
const ConvPlan& conv_plan(const ConvShape& s, bool sparse) {
  constexpr size_t kMaxPlans = 1024;
  using Key = std::array<int64_t, 20>;
  static std::map<Key, std::unique_ptr<ConvPlan>> plans;
  const Key key{s.n, s.c, s.h, s.w, s.m, s.oh, s.ow, s.kh, s.kw, s.sh, s.sw, s.pt, s.pl, s.pb,
                s.pr, s.dh, s.dw, s.group, sparse, (int64_t)(intptr_t)&kernels()};
  auto it = plans.find(key);
  if (it != plans.end()) return *it->second;
  if (plans.size() >= kMaxPlans) {
    thread_local ConvPlan one;
    one = plan_conv(s, sparse);
    return one;
  }
  return *plans.emplace(key, std::make_unique<ConvPlan>(plan_conv(s, sparse))).first->second;
}

// A conv's weight for its plan: a rowwise dense conv reads row vectors
// (DenseWeight::vector_panels). Caches layouts: call with the GIL held.
WeightRef bind_conv(SparseWeight* sw, DenseWeight* dw, const ConvPlan& plan, int64_t group) {
  WeightRef w = bind_weight(sw, dw, plan.koff, group, plan.n_virtual);
  if (plan.mode == ConvPlan::kRowwise) {
    const int64_t vp = kernels().conv_t_panels;
    w.dense_panels = dw->vector_panels(group, vp, &w.panels_per_group);
    w.panel_rows = vp * kGemmMR;
  }
  return w;
}

}  // namespace

NB_MODULE(_core, mod) {
  mod.doc() = "sparsify's C++ kernels (see sparsify/engine/kernels.py for the Python API)";

  nb::class_<SparseWeight>(mod, "SparseWeight")
      .def("__init__", [](SparseWeight* self, nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu> w) {
        new (self) SparseWeight(w.data(), (int64_t)w.shape(0), (int64_t)w.shape(1));
      })
      .def_prop_ro("M", [](const SparseWeight& w) { return w.M; })
      .def_prop_ro("K", [](const SparseWeight& w) { return w.K; })
      .def_prop_ro("nnz", [](const SparseWeight& w) { return w.nnz(); })
      .def_prop_ro("four_row_blocks", [](SparseWeight& w) { return w.four_row_blocks(); })
      .def("to_dense", [](const SparseWeight& w, Out out) {
        expect(numel(out) == w.M * w.K, "to_dense: out must hold M*K floats");
        w.to_dense(out.data());
      });

  nb::class_<DenseWeight>(mod, "DenseWeight")
      .def("__init__", [](DenseWeight* self, nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu> w) {
        new (self) DenseWeight(w.data(), (int64_t)w.shape(0), (int64_t)w.shape(1));
      })
      .def_prop_ro("M", [](const DenseWeight& w) { return w.M; })
      .def_prop_ro("K", [](const DenseWeight& w) { return w.K; })
      .def("to_dense", [](const DenseWeight& w, Out out) {
        expect(numel(out) == w.M * w.K, "to_dense: out must hold M*K floats");
        w.to_dense(out.data());
      });

  mod.def("gemm", [](nb::handle wh, In x, OptIn bias, int act, float lo, float hi, OptIn res, Out y) {
    SparseWeight* sw; DenseWeight* dw; int64_t m, k;
    weight_dims(wh, sw, dw, m, k);
    expect(x.ndim() == 2 && (int64_t)x.shape(0) == k, "gemm: x must be [K, N] with K = " + std::to_string(k) + ", got " + shape_of(x));
    const int64_t n = (int64_t)x.shape(1);
    check_out(y, {m, n}, "gemm");
    const ActArgs a = act_args(act, lo, hi);
    Epilogue ep;
    ep.bias = vec_or_null(bias, m, "gemm bias");
    ep.res = same_or_null(res, m * n, "gemm residual");
    ep.ld_res = n;
    ep.act = a.act; ep.lo = a.lo; ep.hi = a.hi;
    std::vector<int64_t> koff(k);
    for (int64_t i = 0; i < k; ++i) koff[i] = i * n;
    std::vector<float> x_copy, res_copy;
    const float* xp = unaliased(x.data(), k * n, y.data(), m * n, false, x_copy);
    ep.res = unaliased(ep.res, m * n, y.data(), m * n, true, res_copy);
    const WeightRef w = bind_weight(sw, dw, koff);
    nb::gil_scoped_release nogil;
    run_gemm(w, 0, m, k, xp, koff.data(), 1, n, y.data(), n, ep);
  }, nb::arg("w"), nb::arg("x"), nb::arg("bias").none(), nb::arg("act"), nb::arg("lo"), nb::arg("hi"),
     nb::arg("residual").none(), nb::arg("out"));

  mod.def("linear", [](nb::handle wh, In x, OptIn bias, int act, float lo, float hi, OptIn res, Out y) {
    SparseWeight* sw; DenseWeight* dw; int64_t m, k;
    weight_dims(wh, sw, dw, m, k);
    expect(x.ndim() == 2 && (int64_t)x.shape(1) == k, "linear: x must be [T, K] with K = " + std::to_string(k) + ", got " + shape_of(x));
    const int64_t t = (int64_t)x.shape(0);
    check_out(y, {t, m}, "linear");
    const ActArgs a = act_args(act, lo, hi);
    const float* b = vec_or_null(bias, m, "linear bias");
    const float* r = same_or_null(res, t * m, "linear residual");
    std::vector<int64_t> koff(k);
    for (int64_t i = 0; i < k; ++i) koff[i] = i;  // X read transposed: column stride K
    const WeightRef w = bind_weight(sw, dw, koff);
    nb::gil_scoped_release nogil;
    run_linear(w, m, k, x.data(), koff.data(), t, b, r, a.act, a.lo, a.hi, y.data());
  }, nb::arg("w"), nb::arg("x"), nb::arg("bias").none(), nb::arg("act"), nb::arg("lo"), nb::arg("hi"),
     nb::arg("residual").none(), nb::arg("out"));

  mod.def("linear_chain", [](nb::handle w1h, OptIn bias1, int act1, float lo1, float hi1,
                             nb::handle w2h, OptIn bias2, int act2, float lo2, float hi2, In x,
                             OptIn ln_scale, OptIn ln_bias, float eps, OptIn res, int layout,
                             Out y) {
    SparseWeight* s1; DenseWeight* d1; int64_t m1, k1;
    SparseWeight* s2; DenseWeight* d2; int64_t m2, k2;
    weight_dims(w1h, s1, d1, m1, k1);
    weight_dims(w2h, s2, d2, m2, k2);
    expect(k2 == m1, "linear_chain: the second weight must take the first one's " + std::to_string(m1) + " outputs");
    // feature-major operands are [K, T], token-major ones [T, K]
    expect(layout >= 0 && layout <= (kInFM | kResFM | kOutFM), "linear_chain: bad layout");
    const bool in_fm = layout & kInFM;
    expect(x.ndim() == 2 && (int64_t)x.shape(in_fm ? 0 : 1) == k1, "linear_chain: x must be [T, K] (or [K, T] feature-major) with K = " + std::to_string(k1) + ", got " + shape_of(x));
    const int64_t t = (int64_t)x.shape(in_fm ? 1 : 0);
    if (layout & kOutFM) check_out(y, {m2, t}, "linear_chain");
    else check_out(y, {t, m2}, "linear_chain");
    const ActArgs a1 = act_args(act1, lo1, hi1), a2 = act_args(act2, lo2, hi2);
    const float* b1 = vec_or_null(bias1, m1, "linear_chain first bias");
    const float* b2 = vec_or_null(bias2, m2, "linear_chain second bias");
    const float* r = same_or_null(res, t * m2, "linear_chain residual");
    RowNorm norm;
    const RowNorm* ln = row_norm(ln_scale, ln_bias, eps, k1, norm);
    const WeightRef w1 = bind_weight(s1, d1, {}), w2 = bind_weight(s2, d2, {});
    nb::gil_scoped_release nogil;
    run_linear_chain(w1, m1, k1, b1, a1.act, a1.lo, a1.hi, w2, m2, b2, a2.act, a2.lo, a2.hi,
                     x.data(), ln, t, r, layout, y.data());
  }, nb::arg("w1"), nb::arg("bias1").none(), nb::arg("act1"), nb::arg("lo1"), nb::arg("hi1"),
     nb::arg("w2"), nb::arg("bias2").none(), nb::arg("act2"), nb::arg("lo2"), nb::arg("hi2"),
     nb::arg("x"), nb::arg("ln_scale").none(), nb::arg("ln_bias").none(), nb::arg("eps"),
     nb::arg("residual").none(), nb::arg("layout"), nb::arg("out"));

  mod.def("conv2d", [](nb::handle wh, In x, int kh, int kw, int sh, int sw_, int pt, int pl, int pb,
                       int pr, int dh, int dw_, int group, OptIn bias, int act, float lo, float hi,
                       OptIn res, Out y) {
    SparseWeight* sw; DenseWeight* dw; int64_t m, k;
    weight_dims(wh, sw, dw, m, k);
    ConvShape s = conv_shape(x, m, y, kh, kw, sh, sw_, pt, pl, pb, pr, dh, dw_, group);
    expect(group >= 1 && s.c % group == 0 && m % group == 0 && k == (s.c / group) * kh * kw,
           "conv2d: weight [" + std::to_string(m) + ", " + std::to_string(k) + "] does not fit " +
           std::to_string(s.c) + " input channels, group " + std::to_string(group));
    const ActArgs a = act_args(act, lo, hi);
    const float* b = vec_or_null(bias, m, "conv bias");
    std::vector<float> x_copy, res_copy;
    const float* xp = unaliased(x.data(), numel(x), y.data(), numel(y), false, x_copy);
    const float* r = unaliased(same_or_null(res, numel(y), "conv residual"), numel(y), y.data(),
                               numel(y), true, res_copy);
    const ConvPlan& plan = conv_plan(s, sw != nullptr);
    const WeightRef w = bind_conv(sw, dw, plan, group);  // caches: needs the GIL
    nb::gil_scoped_release nogil;
    run_conv2d(w, plan, xp, s, b, r, a.act, a.lo, a.hi, y.data());
  });

  mod.def("conv2d_maxpool", [](nb::handle wh, In x, int kh, int kw, int sh, int sw_, int pt,
                               int pl, int pb, int pr, int dh, int dw_, int group, OptIn bias,
                               int act, float lo, float hi, Out y) {
    SparseWeight* sw; DenseWeight* dw; int64_t m, k;
    weight_dims(wh, sw, dw, m, k);
    expect(x.ndim() == 4 && y.ndim() == 4, "conv2d_maxpool: input and output must be NCHW");
    expect(kh > 0 && kw > 0 && sh > 0 && sw_ > 0 && dh > 0 && dw_ > 0 && pt >= 0 && pl >= 0 &&
               pb >= 0 && pr >= 0, "conv2d_maxpool: bad kernel, stride, dilation or pads");
    const int64_t h = (int64_t)x.shape(2), w = (int64_t)x.shape(3);
    const int64_t oh = (h + pt + pb - (int64_t)dh * (kh - 1) - 1) / sh + 1;
    const int64_t ow = (w + pl + pr - (int64_t)dw_ * (kw - 1) - 1) / sw_ + 1;
    expect(oh >= 1 && ow >= 1, "conv2d_maxpool: the conv's output is empty");
    expect((int64_t)y.shape(0) == (int64_t)x.shape(0) && (int64_t)y.shape(1) == m &&
               (int64_t)y.shape(2) == (oh - 1) / 2 + 1 && (int64_t)y.shape(3) == (ow - 1) / 2 + 1,
           "conv2d_maxpool: out must have the pooled shape");
    ConvShape s{(int64_t)x.shape(0), (int64_t)x.shape(1), h, w, m, oh, ow, kh, kw, sh, sw_, pt,
                pl, pb, pr, dh, dw_, group};
    expect(group >= 1 && s.c % group == 0 && m % group == 0 && k == (s.c / group) * kh * kw,
           "conv2d_maxpool: weight [" + std::to_string(m) + ", " + std::to_string(k) +
               "] does not fit " + std::to_string(s.c) + " input channels, group " +
               std::to_string(group));
    const ActArgs a = act_args(act, lo, hi);
    const float* b = vec_or_null(bias, m, "conv bias");
    std::vector<float> x_copy;
    const float* xp = unaliased(x.data(), numel(x), y.data(), numel(y), false, x_copy);
    const ConvPlan& plan = conv_plan(s, sw != nullptr);
    const WeightRef wr = bind_conv(sw, dw, plan, group);  // caches: needs the GIL
    nb::gil_scoped_release nogil;
    run_conv2d_maxpool(wr, plan, xp, s, b, a.act, a.lo, a.hi, y.data());
  });

  mod.def("depthwise_conv2d", [](In w, In x, int sh, int sw, int pt, int pl, int pb, int pr, int dh,
                                 int dw, OptIn bias, int act, float lo, float hi, Out y) {
    expect(w.ndim() == 4 && x.ndim() == 4 && w.shape(0) == x.shape(1) && w.shape(1) == 1,
           "depthwise_conv2d: weight must be [C, 1, kh, kw] for C input channels");
    ConvShape s = conv_shape(x, (int64_t)x.shape(1), y, (int)w.shape(2), (int)w.shape(3), sh, sw,
                             pt, pl, pb, pr, dh, dw, (int)x.shape(1));
    const ActArgs a = act_args(act, lo, hi);
    const float* b = vec_or_null(bias, s.c, "depthwise bias");
    nb::gil_scoped_release nogil;
    run_depthwise(w.data(), x.data(), s, b, a.act, a.lo, a.hi, y.data());
  });

  mod.def("conv1x1_depthwise", [](nb::handle wh, In x, OptIn bias1, int act1, float lo1, float hi1,
                                  In wd, int sh, int sw, int pt, int pl, int pb, int pr, int dh,
                                  int dw, OptIn bias2, int act2, float lo2, float hi2, Out y) {
    SparseWeight* sp; DenseWeight* de; int64_t m, k;
    weight_dims(wh, sp, de, m, k);
    expect(wd.ndim() == 4 && (int64_t)wd.shape(0) == m && wd.shape(1) == 1,
           "conv1x1_depthwise: the depthwise weight must be [M, 1, kh, kw] for the 1x1's M outputs");
    const int kh = (int)wd.shape(2), kw = (int)wd.shape(3);
    // the depthwise conv's shape: its input is the 1x1's output, m channels of x's size
    ConvShape s = conv_shape(x, m, y, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, (int)m);
    expect(k == s.c, "conv1x1_depthwise: the 1x1 weight [" + std::to_string(m) + ", " +
           std::to_string(k) + "] does not fit " + std::to_string(s.c) + " input channels");
    s.c = m;
    const int64_t oh = (s.h + pt + pb - (int64_t)dh * (kh - 1) - 1) / sh + 1;
    const int64_t ow = (s.w + pl + pr - (int64_t)dw * (kw - 1) - 1) / sw + 1;
    expect(s.oh == oh && s.ow == ow && oh >= 1 && ow >= 1, "conv1x1_depthwise: out has the wrong shape");
    const ActArgs a1 = act_args(act1, lo1, hi1), a2 = act_args(act2, lo2, hi2);
    const float* b1 = vec_or_null(bias1, m, "conv1x1_depthwise bias1");
    const float* b2 = vec_or_null(bias2, m, "conv1x1_depthwise bias2");
    std::vector<float> x_copy;
    const float* xp = unaliased(x.data(), numel(x), y.data(), numel(y), false, x_copy);
    const WeightRef w1 = bind_weight(sp, de, {}, 1);  // caches: needs the GIL
    nb::gil_scoped_release nogil;
    run_conv1x1_depthwise(w1, xp, k, b1, a1.act, a1.lo, a1.hi, wd.data(), s, b2, a2.act, a2.lo,
                          a2.hi, y.data());
  });

  mod.def("depthwise_per_plane", [](int c, int oh, int ow, int sh, int sw) {
    ConvShape s{1, c, 0, 0, c, oh, ow, 1, 1, sh, sw, 0, 0, 0, 0, 1, 1, c};
    return depthwise_per_plane(s);
  });

  mod.def("max_pool2d", [](In x, int kh, int kw, int sh, int sw, int pt, int pl, int pb, int pr,
                           int dh, int dw, Out y) {
    ConvShape s = conv_shape(x, x.ndim() == 4 ? (int64_t)x.shape(1) : 0, y, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, 1);
    nb::gil_scoped_release nogil;
    run_max_pool(x.data(), s, y.data());
  });

  mod.def("avg_pool2d", [](In x, int kh, int kw, int sh, int sw, int pt, int pl, int pb, int pr,
                           int count_include_pad, Out y) {
    ConvShape s = conv_shape(x, x.ndim() == 4 ? (int64_t)x.shape(1) : 0, y, kh, kw, sh, sw, pt, pl, pb, pr, 1, 1, 1);
    expect(pt < kh && pb < kh && pl < kw && pr < kw, "avg_pool2d: pads must be smaller than the kernel");
    nb::gil_scoped_release nogil;
    run_avg_pool(x.data(), s, count_include_pad != 0, y.data());
  });

  mod.def("global_avg_pool", [](In x, Out y) {
    expect(x.ndim() == 4, "global_avg_pool: input must be NCHW");
    const int64_t planes = (int64_t)(x.shape(0) * x.shape(1)), size = (int64_t)(x.shape(2) * x.shape(3));
    expect(numel(y) == planes, "global_avg_pool: out must be [N, C, 1, 1]");
    nb::gil_scoped_release nogil;
    run_global_avg_pool(x.data(), planes, size, y.data());
  });

  mod.def("activation", [](In x, int act, float lo, float hi, Out y) {
    expect(numel(x) == numel(y), "activation: x and out must have one shape");
    const ActArgs aa = act_args(act, lo, hi);
    nb::gil_scoped_release nogil;
    run_add_act(x.data(), nullptr, numel(x), aa.act, aa.lo, aa.hi, y.data());
  });

  mod.def("channel_affine", [](In x, In scale, OptIn shift, int act, float lo, float hi, Out y) {
    expect(x.ndim() >= 2, "channel_affine: x must be [N, C, ...]");
    const int64_t n = (int64_t)x.shape(0), c = (int64_t)x.shape(1);
    const int64_t per = numel(scale);
    expect(per == c || per == n * c,
           "channel_affine: scale needs one value per channel (" + std::to_string(c) +
               ") or per plane (" + std::to_string(n * c) + "), got " + std::to_string(per));
    expect(!shift || numel(*shift) == per, "channel_affine: shift must have scale's size");
    expect(numel(x) == numel(y), "channel_affine: x and out must have one shape");
    const ActArgs aa = act_args(act, lo, hi);
    const int64_t hw = (n > 0 && c > 0) ? numel(x) / (n * c) : 0;
    const float* sh = shift ? shift->data() : nullptr;
    nb::gil_scoped_release nogil;
    run_channel_affine(x.data(), n, c, hw, scale.data(), sh, per, aa.act, aa.lo, aa.hi, y.data());
  });

  mod.def("add_act", [](In a, In b, int act, float lo, float hi, Out y) {
    expect(numel(a) == numel(b) && numel(a) == numel(y), "add_act: operands and out must have one shape");
    const ActArgs aa = act_args(act, lo, hi);
    nb::gil_scoped_release nogil;
    run_add_act(a.data(), b.data(), numel(a), aa.act, aa.lo, aa.hi, y.data());
  });

  mod.def("softmax", [](In x, Out y) {
    expect(x.ndim() >= 1 && numel(x) == numel(y), "softmax: out must have the input's shape");
    const int64_t n = (int64_t)x.shape(x.ndim() - 1), rows = n ? numel(x) / n : 0;
    nb::gil_scoped_release nogil;
    run_softmax(x.data(), rows, n, y.data());
  }, nb::arg("x"), nb::arg("out"));

  mod.def("layer_norm", [](In x, In scale, OptIn bias, float eps, Out y) {
    expect(x.ndim() >= 1 && numel(x) == numel(y), "layer_norm: out must have the input's shape");
    const int64_t n = (int64_t)x.shape(x.ndim() - 1), rows = n ? numel(x) / n : 0;
    expect(numel(scale) == n, "layer_norm: scale must have one value per element of the last axis");
    const float* b = vec_or_null(bias, n, "layer_norm bias");
    nb::gil_scoped_release nogil;
    run_layer_norm(x.data(), rows, n, scale.data(), b, eps, y.data());
  }, nb::arg("x"), nb::arg("scale"), nb::arg("bias").none(), nb::arg("eps"), nb::arg("out"));

  mod.def("batched_matmul", [](In a, In x, Out y) {
    expect(a.ndim() == 3 && x.ndim() == 3 && y.ndim() == 3 && a.shape(0) == x.shape(0) &&
           a.shape(2) == x.shape(1), "batched_matmul: a must be [B, M, K] and x [B, K, N], got " +
           shape_of(a) + " and " + shape_of(x));
    const int64_t b = (int64_t)a.shape(0), m = (int64_t)a.shape(1), k = (int64_t)a.shape(2),
                  n = (int64_t)x.shape(2);
    check_out(y, {b, m, n}, "batched_matmul");
    nb::gil_scoped_release nogil;
    run_batched_matmul(a.data(), x.data(), b, m, k, n, y.data());
  }, nb::arg("a"), nb::arg("x"), nb::arg("out"));

  mod.def("attention", [](In q, In k, In v, int64_t heads, float scale, OptIn mask, int64_t msb,
                          int64_t msh, int64_t msr, Out y) {
    expect(q.ndim() == 3 && k.ndim() == 3 && v.ndim() == 3 && q.shape(0) == k.shape(0) &&
           k.shape(0) == v.shape(0) && k.shape(1) == v.shape(1) && q.shape(2) == k.shape(2) &&
           k.shape(2) == v.shape(2), "attention: q must be [B, Sq, H*D], k and v [B, Sk, H*D], got " +
           shape_of(q) + ", " + shape_of(k) + ", " + shape_of(v));
    const int64_t hd = (int64_t)q.shape(2);
    expect(heads > 0 && hd % heads == 0, "attention: heads must divide the last axis");
    AttentionShape s;
    s.B = (int64_t)q.shape(0);
    s.H = heads;
    s.Sq = (int64_t)q.shape(1);
    s.Sk = (int64_t)k.shape(1);
    s.D = hd / heads;
    s.ldq = s.ldk = s.ldv = s.ldo = hd;
    check_out(y, {s.B, s.Sq, hd}, "attention");
    const float* m = nullptr;
    if (mask) {
      expect(msb >= 0 && msh >= 0 && msr >= 0, "attention: mask strides must be non-negative");
      const int64_t last = (s.B - 1) * msb + (s.H - 1) * msh + (s.Sq - 1) * msr + s.Sk;
      expect(numel(*mask) >= last, "attention: mask strides reach past the mask");
      m = mask->data();
      s.msb = msb; s.msh = msh; s.msr = msr;
    }
    nb::gil_scoped_release nogil;
    run_attention(q.data(), k.data(), v.data(), s, scale, m, y.data());
  }, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("heads"), nb::arg("scale"),
     nb::arg("mask").none(), nb::arg("msb"), nb::arg("msh"), nb::arg("msr"), nb::arg("out"));

  mod.def("attention_block", [](In x, OptIn ln_scale, OptIn ln_bias, float eps, nb::handle wqkvh,
                                OptIn bqkv, int64_t heads, float scale, OptIn mask, int64_t msb,
                                int64_t msh, int64_t msr, nb::handle woh, OptIn bo, int act,
                                float lo, float hi, OptIn res, int layout, Out y) {
    // feature-major operands are [K, B, S], token-major ones [B, S, K]
    expect(layout >= 0 && layout <= (kInFM | kResFM | kOutFM), "attention_block: bad layout");
    const bool in_fm = layout & kInFM;
    expect(x.ndim() == 3, "attention_block: x must be [B, S, K], got " + shape_of(x));
    const int64_t B = (int64_t)x.shape(in_fm ? 1 : 0), S = (int64_t)x.shape(in_fm ? 2 : 1),
                  K = (int64_t)x.shape(in_fm ? 0 : 2);
    SparseWeight* sq; DenseWeight* dq; int64_t m3, k;
    weight_dims(wqkvh, sq, dq, m3, k);
    expect(k == K && m3 % 3 == 0, "attention_block: the stacked Q, K, V weight must be [3*H*D, " + std::to_string(K) + "]");
    const int64_t hd = m3 / 3;
    expect(heads > 0 && hd % heads == 0, "attention_block: heads must divide the projections' outputs");
    SparseWeight* so; DenseWeight* dout; int64_t M, ko;
    weight_dims(woh, so, dout, M, ko);
    expect(ko == hd, "attention_block: the output weight must take the " + std::to_string(hd) + " attention outputs");
    if (layout & kOutFM) check_out(y, {M, B, S}, "attention_block");
    else check_out(y, {B, S, M}, "attention_block");
    const ActArgs a = act_args(act, lo, hi);
    const float* bqkv_p = vec_or_null(bqkv, m3, "attention_block projection bias");
    const float* bo_p = vec_or_null(bo, M, "attention_block output bias");
    const float* r = same_or_null(res, B * S * M, "attention_block residual");
    const float* m = nullptr;
    if (mask) {
      expect(msb >= 0 && msh >= 0 && msr >= 0, "attention_block: mask strides must be non-negative");
      expect(numel(*mask) >= (B - 1) * msb + (heads - 1) * msh + (S - 1) * msr + S,
             "attention_block: mask strides reach past the mask");
      m = mask->data();
    }
    const WeightRef wqkv = bind_weight(sq, dq, {}), wo = bind_weight(so, dout, {});
    RowNorm norm;
    const RowNorm* ln = row_norm(ln_scale, ln_bias, eps, K, norm);
    nb::gil_scoped_release nogil;
    run_attention_block(x.data(), ln, B, S, K, wqkv, bqkv_p, heads, hd / heads, scale, m, msb, msh,
                        msr, wo, M, bo_p, r, a.act, a.lo, a.hi, layout, y.data());
  }, nb::arg("x"), nb::arg("ln_scale").none(), nb::arg("ln_bias").none(), nb::arg("eps"),
     nb::arg("wqkv"), nb::arg("bqkv").none(), nb::arg("heads"), nb::arg("scale"),
     nb::arg("mask").none(), nb::arg("msb"), nb::arg("msh"), nb::arg("msr"), nb::arg("wo"),
     nb::arg("bo").none(), nb::arg("act"), nb::arg("lo"), nb::arg("hi"), nb::arg("residual").none(),
     nb::arg("layout"), nb::arg("out"));

  // glibc returns every freed block above its (adaptive) mmap threshold, and the top of the
  // heap above the trim threshold, to the OS, so each run's fresh activation arrays page-fault
  // again: measured 30% of BERT-base's run time on a busy 2-core machine. Keeping blocks up to
  // 32 MiB (glibc's ceiling) on the heap and trimming only past 1 GiB lets them be reused.
  mod.def("retain_freed_memory", []() {
#if defined(__GLIBC__)
    return mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1;
#else
    return false;
#endif
  });

  mod.def("set_num_threads", [](int n) {
    expect(n > 0, "threads must be positive");
    set_num_threads(n);
  });
  mod.def("get_num_threads", []() { return num_threads(); });
  mod.def("isa", []() { return std::string(active_isa()); });
  mod.def("set_isa", [](const std::string& name) {
    expect(name == "avx512" || name == "avx2" || name == "portable", "isa must be avx512, avx2 or portable");
    expect(set_isa(name.c_str()), "this CPU cannot run the " + name + " kernels");
  }, "Test hook: switch the kernel table (packed weights stay valid across ISAs).");
  mod.def("isa_supported", [](const std::string& name) { return isa_supported(name.c_str()); });
}
