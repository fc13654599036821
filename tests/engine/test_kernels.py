"""The C++ kernels against their NumPy twins, on every ISA build this CPU can run.

Each test runs once per ISA (switched with the core's ``set_isa`` test hook; packed weights
stay valid across ISAs) on random shapes chosen to hit the edges: empty output rows, all-zero
weights, single elements, sizes that are not multiples of the vector width, N = 1, batches,
groups, dilations, asymmetric pads and ceil_mode.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from sparsify.engine import _core, kernels, reference
from sparsify.errors import InputError

ISAS = [name for name in ("avx512", "avx2", "portable") if _core.isa_supported(name)]
ACTS = ["none", "relu", ("clip", -0.5, 0.75), "gelu", "sigmoid", "silu", ("hardsigmoid", 0.2, 0.5),
        "hardswish"]


@pytest.fixture(params=ISAS)
def isa(request):
    before = _core.isa()
    _core.set_isa(request.param)
    yield request.param
    _core.set_isa(before)


def close(got, want, tol=1e-5, scale=None):
    """Within tol relative to `scale`: the size of the terms summed (float32 rounding grows with
    them, not with the result, which clip or cancellation can make small)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    if scale is None:
        scale = float(np.abs(want).max()) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, scale))


def term_scale(w, x):
    return float((np.abs(w).astype(np.float64) @ np.abs(x).astype(np.float64)).max())


def sparse_matrix(rng, m, k, sparsity, empty_rows=0):
    w = rng.standard_normal((m, k)).astype(np.float32)
    w *= rng.random((m, k)) >= sparsity
    w[:empty_rows] = 0.0  # whole output rows with no nonzero
    return w


GEMM_SHAPES = [  # (M, K, N)
    (1, 1, 1), (3, 5, 1), (7, 13, 5), (17, 33, 49), (8, 16, 16), (9, 64, 65), (64, 64, 200),
    (33, 100, 129), (5, 300, 17), (130, 7, 3),
    (9, 4500, 70), (3, 2100, 129),  # K split into blocks by the sparse kernel on every ISA
]


@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
def test_gemm(isa, kind, m, k, n):
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    w = sparse_matrix(rng, m, k, 0.7, empty_rows=min(2, m - 1))
    x = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    res = rng.standard_normal((m, n)).astype(np.float32)
    pw = kernels.PackedWeight.pack(w, kind)
    scale = term_scale(w, x)
    for act in ACTS:
        close(kernels.gemm(pw, x, bias, act, res), reference.gemm(w, x, bias, act, res),
              scale=scale)
    close(kernels.gemm(pw, x), reference.gemm(w, x), scale=scale)


ROW_LENGTHS = {
    # every remainder after the kernel's steps of 4 and of 2, rows shorter than a step, and an
    # average long enough for the 4-at-a-time loop
    "long": [0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 33, 34, 35, 60, 61, 62, 63, 64],
    "medium": [0, 1, 9, 10, 11, 12, 13, 14, 15, 21],  # two accumulator sets, no 4-steps
    "short": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 1],  # the one-set loop for short rows
}


@pytest.mark.parametrize("n", [8, 37, 96])
@pytest.mark.parametrize("rows", sorted(ROW_LENGTHS))
def test_sparse_rows_of_every_length(isa, n, rows):
    # row i holds exactly lengths[i] nonzeros; the kernel picks its loop per block by the average
    rng = np.random.default_rng(n)
    lengths = ROW_LENGTHS[rows]
    k = 80
    w = np.zeros((len(lengths), k), np.float32)
    for i, nnz in enumerate(lengths):
        cols = rng.choice(k, nnz, replace=False)
        w[i, cols] = rng.standard_normal(nnz)
    x = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(len(lengths)).astype(np.float32)
    pw = kernels.PackedWeight.pack(w, "sparse")
    close(kernels.gemm(pw, x, bias, "relu"), reference.gemm(w, x, bias, "relu"),
          scale=term_scale(w, x))


# The dense GEMM has two paths: for up to 128 columns that the column tiles would pad, vectors
# run along the rows (tiles of up to 48 rows x 8 columns on AVX-512, two 8-row panels per zmm
# and an odd last panel alone; 24 rows on AVX2), otherwise along the columns. Rows and columns
# around the tile sizes, K blocks, both paths, 1 and 2 threads.
DENSE_PATH_SHAPES = [  # (M, K, N)
    (1, 3, 2), (8, 1, 7), (23, 17, 8), (24, 40, 9), (25, 5, 49), (50, 70, 196), (16, 9, 256),
    (17, 33, 257), (41, 300, 300), (7, 11, 1000), (30, 2000, 100), (30, 1000, 200),
    (40, 20, 49), (47, 65, 33), (48, 9, 49), (49, 30, 20), (100, 50, 7),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,k,n", DENSE_PATH_SHAPES)
def test_dense_gemm_both_paths(isa, m, k, n, threads):
    rng = np.random.default_rng(m * 7 + k * 3 + n)
    w = rng.standard_normal((m, k)).astype(np.float32)
    x = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    res = rng.standard_normal((m, n)).astype(np.float32)
    pw = kernels.PackedWeight.pack(w, "dense")
    scale = term_scale(w, x)
    before = kernels.get_num_threads()
    kernels.set_num_threads(threads)
    try:
        for act in ACTS:
            close(kernels.gemm(pw, x, bias, act, res), reference.gemm(w, x, bias, act, res),
                  scale=scale)
            close(kernels.gemm(pw, x, None, act), reference.gemm(w, x, None, act), scale=scale)
    finally:
        kernels.set_num_threads(before)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_gemm_all_zero_weight_gives_epilogue_only(isa, kind):
    rng = np.random.default_rng(1)
    w = np.zeros((19, 23), np.float32)
    x = rng.standard_normal((23, 37)).astype(np.float32)
    bias = rng.standard_normal(19).astype(np.float32)
    pw = kernels.PackedWeight.pack(w, kind)
    assert pw.nnz == 0 and pw.sparsity == 1.0
    close(kernels.gemm(pw, x, bias, "relu"), np.maximum(np.repeat(bias[:, None], 37, 1), 0))


def test_conv_lowerings_agree():
    """Direct (1x1), phased (shifted planes, no im2col) and im2col lowerings against the twin."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 6, 12, 12)).astype(np.float32)
    for ks, st, pads in [((1, 1), (1, 1), (0,) * 4), ((1, 1), (2, 2), (0,) * 4),
                         ((3, 3), (1, 1), (1,) * 4), ((3, 3), (2, 2), (1,) * 4),
                         ((5, 5), (1, 1), (2, 1, 0, 2)), ((7, 7), (3, 3), (3,) * 4)]:
        w = sparse_matrix(rng, 10, 6 * ks[0] * ks[1], 0.5)
        for kind in ("sparse", "dense"):
            pw = kernels.PackedWeight.pack(w, kind)
            close(kernels.conv2d(pw, x, ks, st, pads), reference.conv2d(w, x, ks, st, pads))


@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("t,k,m", [(1, 1, 1), (128, 96, 80), (7, 50, 33), (3, 17, 200),
                                   (1, 77, 40), (1, 300, 9)])
def test_linear(isa, kind, t, k, m):
    rng = np.random.default_rng(t + k + m)
    w = sparse_matrix(rng, m, k, 0.8, empty_rows=1 if m > 1 else 0)
    x = rng.standard_normal((t, k)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    res = rng.standard_normal((t, m)).astype(np.float32)
    pw = kernels.PackedWeight.pack(w, kind)
    for act in ACTS:
        close(kernels.linear(pw, x, bias, act), reference.linear(w, x, bias, act))
        close(kernels.linear(pw, x, bias, act, residual=res),
              reference.linear(w, x, bias, act, residual=res))


def test_linear_batched_leading_dims(isa):
    rng = np.random.default_rng(3)
    w = sparse_matrix(rng, 24, 40, 0.5)
    x = rng.standard_normal((2, 5, 40)).astype(np.float32)
    pw = kernels.PackedWeight.pack(w, "sparse")
    close(kernels.linear(pw, x), reference.linear(w, x))


@pytest.mark.parametrize("kinds", [("sparse", "sparse"), ("dense", "sparse"), ("sparse", "dense")])
@pytest.mark.parametrize("t,k,h,m", [(1, 1, 1, 1), (128, 96, 300, 80), (7, 50, 33, 17),
                                     (1, 77, 40, 9), (3, 20, 1, 5)])
def test_linear_chain(isa, kinds, t, k, h, m):
    rng = np.random.default_rng(t + k + h + m)
    w1 = sparse_matrix(rng, h, k, 0.8, empty_rows=1 if h > 1 else 0)
    w2 = sparse_matrix(rng, m, h, 0.8)
    x = rng.standard_normal((2, t, k)).astype(np.float32)
    b1, b2 = rng.standard_normal(h).astype(np.float32), rng.standard_normal(m).astype(np.float32)
    res = rng.standard_normal((2, t, m)).astype(np.float32)
    p1, p2 = kernels.PackedWeight.pack(w1, kinds[0]), kernels.PackedWeight.pack(w2, kinds[1])
    for act1, act2 in (("gelu", "none"), ("relu", ("clip", -0.5, 0.75)), ("none", "gelu")):
        want = reference.linear_chain(w1, w2, x, b1, act1, b2, act2)
        close(kernels.linear_chain(p1, p2, x, b1, act1, b2, act2), want,
              scale=float(np.abs(want).max()) + 1)
        want = reference.linear_chain(w1, w2, x, b1, act1, b2, act2, residual=res)
        close(kernels.linear_chain(p1, p2, x, b1, act1, b2, act2, residual=res), want,
              scale=float(np.abs(want).max()) + 1)
    ln = (rng.standard_normal(k).astype(np.float32), rng.standard_normal(k).astype(np.float32), 1e-5)
    for norm in (ln, ln[:1] + (None, 0.1)):
        want = reference.linear_chain(w1, w2, x, b1, "gelu", b2, residual=res, ln=norm)
        close(kernels.linear_chain(p1, p2, x, b1, "gelu", b2, residual=res, ln=norm), want,
              scale=float(np.abs(want).max()) + 1)
    fm_of = lambda a: np.ascontiguousarray(np.moveaxis(a, -1, 0))  # noqa: E731
    for fm in [(True, False, False), (False, True, True), (True, True, False), (False, False, True)]:
        xx, rr = fm_of(x) if fm[0] else x, fm_of(res) if fm[1] else res
        want = reference.linear_chain(w1, w2, xx, b1, "gelu", b2, residual=rr, ln=ln, fm=fm)
        close(kernels.linear_chain(p1, p2, xx, b1, "gelu", b2, residual=rr, ln=ln, fm=fm), want,
              scale=float(np.abs(want).max()) + 1)
    with pytest.raises(InputError, match="cannot take"):
        kernels.linear_chain(p1, kernels.PackedWeight.pack(np.ones((2, h + 1), np.float32)), x)


CONV_CASES = [  # (N, C, H, W, M, kernel, strides, pads, dilations, group)
    (1, 8, 9, 11, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (2, 6, 10, 7, 4, (3, 2), (2, 1), (0, 1, 2, 0), (2, 1), 2),
    (1, 16, 14, 14, 24, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    (3, 16, 7, 9, 20, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),
    (1, 3, 15, 15, 5, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1),
    (1, 12, 8, 8, 12, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4),
    (2, 10, 6, 5, 15, (3, 3), (1, 2), (2, 0, 1, 3), (1, 2), 5),
    (1, 1, 1, 1, 1, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    (1, 4, 5, 5, 3, (5, 5), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    # ResNet's 3x3 on 7x7: im2col for the dense kernel, phased (63 columns, same 4 vectors as
    # 49) for the sparse one
    (2, 40, 7, 7, 24, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    # long K on a 7x7 plane: the sparse kernel splits K over threads and adds the parts up
    (1, 160, 7, 7, 24, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    # dense rowwise (no X packed): 7 panels as row blocks of 4 + 3 (the last one's vector half
    # empty), a 13-panel 5x5 strided layer, groups of 32 rows, runs of 8 along 40-wide rows,
    # one-pixel rows
    (2, 9, 13, 19, 56, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (1, 5, 11, 23, 100, (5, 5), (2, 2), (2, 1, 2, 1), (1, 1), 1),
    (1, 32, 10, 10, 64, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 2),
    (1, 16, 6, 40, 48, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (1, 8, 5, 1, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    # AVX-512's widest rowwise tile: 64-row blocks (4 row vectors) over runs of 6 pixels, and a
    # 72-row weight (blocks of 8 and 1 panels, evened to 4 and 5)
    (2, 6, 8, 12, 64, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (1, 6, 7, 17, 72, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
]


@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d(isa, kind, case):
    n, c, h, w, m, ks, st, pads, dil, g = case
    rng = np.random.default_rng(sum(case[:5]))
    wt = sparse_matrix(rng, m, c // g * ks[0] * ks[1], 0.6, empty_rows=1 if m > 1 else 0)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    pw = kernels.PackedWeight.pack(wt, kind)
    # rounding grows with the terms summed, not with the (clipped) result
    scale = float(reference.conv2d(np.abs(wt), np.abs(x), ks, st, pads, dil, g).max())
    want = reference.conv2d(wt, x, ks, st, pads, dil, g, bias, "relu")
    close(kernels.conv2d(pw, x, ks, st, pads, dil, g, bias, "relu"), want, scale=scale)
    res = rng.standard_normal(want.shape).astype(np.float32)
    close(kernels.conv2d(pw, x, ks, st, pads, dil, g, bias, ("clip", 0, 1), res),
          reference.conv2d(wt, x, ks, st, pads, dil, g, bias, ("clip", 0, 1), res), scale=scale)
    # GELU, sigmoid, SiLU and HardSwish in the direct / phased / rowwise / im2col epilogues and
    # after a residual
    for act in ("gelu", "sigmoid", "silu", ("hardswish", 1 / 6, 0.5)):
        for r in (None, res):
            close(kernels.conv2d(pw, x, ks, st, pads, dil, g, bias, act, r),
                  reference.conv2d(wt, x, ks, st, pads, dil, g, bias, act, r), scale=scale)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 64, 100, 4099, 70000])
def test_activation_and_channel_affine(isa, n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 8).astype(np.float32)
    x[: min(n, 6)] = [np.nan, np.inf, -np.inf, 0.0, -100.0, 100.0][: min(n, 6)]
    with np.errstate(invalid="ignore", over="ignore"):
        for act in ACTS:
            want = reference.apply_act(x, act)
            got = kernels.activation(x, act)
            if act == "gelu":  # the kernels keep gelu(-inf) = 0 (the limit); the twin has NaN
                want = np.where(x == -np.inf, 0.0, want)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=str(act))
            fin = lambda a: np.nan_to_num(np.asarray(a, np.float64), posinf=1e30, neginf=-1e30)  # noqa: E731
            close(fin(got), fin(want), tol=2e-6, scale=1.0)
            y = x.copy()
            assert kernels.activation(y, act, out=y) is y  # in place
            np.testing.assert_array_equal(np.isnan(y), np.isnan(got))
        # an inference BatchNormalization's per-channel affine, with each activation
        for shape in [(1, 1), (2, 3), (2, 5, n), (1, 4, 3, max(1, n // 12))]:
            xs = rng.standard_normal(shape).astype(np.float32)
            s, t = rng.standard_normal(shape[1]).astype(np.float32), rng.standard_normal(shape[1]).astype(np.float32)
            cs = (1, -1) + (1,) * (len(shape) - 2)
            for act in ACTS:
                want = reference.apply_act(xs * s.reshape(cs) + t.reshape(cs), act)
                close(kernels.channel_affine(xs, s, t, act), want, tol=2e-6)
        # one scale per plane: a squeeze-and-excitation gate [N, C, 1, 1]
        xs = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
        g = rng.standard_normal((2, 3, 1, 1)).astype(np.float32)
        close(kernels.channel_affine(xs, g), xs * g, tol=2e-6)
    with pytest.raises(InputError, match="per channel"):
        kernels.channel_affine(np.ones((2, 3, 4), np.float32), np.ones(2, np.float32), np.ones(2, np.float32))
    with pytest.raises(InputError, match="shift has"):
        kernels.channel_affine(np.ones((2, 3, 4), np.float32), np.ones(3, np.float32), np.ones(6, np.float32))
    with pytest.raises(InputError, match="act must be"):
        kernels.activation(x, "swish")


@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("case", [  # (N, C, H, W, M, kernel, strides, pads)
    (1, 3, 224, 224, 64, (7, 7), (2, 2), (3, 3, 3, 3)),  # ResNet's stem: 112 -> 56
    (2, 3, 27, 35, 40, (7, 7), (2, 2), (3, 3, 3, 3)),  # odd conv outputs, a short row block
    (1, 8, 9, 1, 16, (3, 3), (1, 1), (1, 1, 1, 1)),  # one column
    (1, 4, 6, 6, 16, (3, 3), (1, 1), (1, 1, 1, 1)),
    (1, 3, 20, 18, 136, (7, 7), (2, 2), (3, 3, 3, 3)),  # row blocks of 64, 32 and 40
    (1, 5, 13, 11, 24, (5, 5), (2, 2), (2, 2, 2, 2)),  # a row vector half full
])
def test_conv2d_maxpool(isa, kind, case):
    n, c, h, w, m, ks, st, pads = case
    rng = np.random.default_rng(h * w + m)
    wt = sparse_matrix(rng, m, c * ks[0] * ks[1], 0.5)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    pw = kernels.PackedWeight.pack(wt, kind)
    for act in ("relu", "none", "silu"):
        conv = reference.conv2d(wt, x, ks, st, pads, bias=bias, act=act)
        want = reference.max_pool2d(conv, (3, 3), (2, 2), (1, 1, 1, 1))
        close(kernels.conv2d_maxpool(pw, x, ks, st, pads, bias=bias, act=act), want,
              scale=float(np.abs(conv).max()) + 1)
    with pytest.raises(InputError, match="out must be"):
        kernels.conv2d_maxpool(pw, x, ks, st, pads, out=np.empty((n, m, 1, 1), np.float32))


@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("case", [  # (N, C, H, W, M, kernel, strides, pads, dilations)
    (1, 16, 112, 112, 96, 3, 2, (1, 1, 1, 1), 1),  # MobileNetV2's first expansion, bands of it
    (2, 5, 31, 29, 24, 3, 1, (1, 1, 1, 1), 1),  # a batch, odd sizes
    (1, 7, 30, 33, 40, 5, 2, (2, 2, 2, 2), 1),  # EfficientNet's 5x5
    (1, 6, 33, 31, 20, 3, 1, (2, 0, 1, 2), 2),  # dilated, uneven pads
    (1, 3, 5, 40, 16, 3, 1, (1, 1, 1, 1), 1),  # fewer rows than bands
    (1, 4, 17, 17, 8, 3, 3, (0, 0, 0, 0), 1),  # stride 3, no pads: bands skip input rows
])
def test_conv1x1_depthwise(isa, kind, case):
    """The banded 1x1 + depthwise pair equals the two convs one after the other, whatever the
    thread count (each band is one unit of work)."""
    n, c, h, w, m, k, st, pads, d = case
    rng = np.random.default_rng(h * w + m)
    w1 = sparse_matrix(rng, m, c, 0.7)
    wd = rng.standard_normal((m, 1, k, k)).astype(np.float32)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    b1, b2 = rng.standard_normal(m).astype(np.float32), rng.standard_normal(m).astype(np.float32)
    pw = kernels.PackedWeight.pack(w1, kind)
    before = kernels.get_num_threads()
    try:
        for act1, act2, threads in ((("clip", 0.0, 6.0), ("clip", 0.0, 6.0), 1), ("silu", "none", 2),
                                    ("none", "relu", 3)):
            kernels.set_num_threads(threads)
            want = reference.conv1x1_depthwise(w1, x, b1, act1, wd, (st, st), pads, (d, d), b2, act2)
            got = kernels.conv1x1_depthwise(pw, x, b1, act1, wd, (st, st), pads, (d, d), b2, act2)
            scale = float(np.abs(reference.conv2d(w1, x, (1, 1), bias=b1)).max()) * k * k + 1
            close(got, want, scale=scale)
    finally:
        kernels.set_num_threads(before)
    with pytest.raises(InputError, match="input channels|needs"):
        kernels.conv1x1_depthwise(pw, x[:, :1], b1, "none", wd)
    with pytest.raises(InputError, match="depthwise weight"):
        kernels.conv1x1_depthwise(pw, x, b1, "none", wd[:1])


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_bound_conv_matches_conv2d_and_checks_each_new_shape(kind):
    rng = np.random.default_rng(17)
    w = sparse_matrix(rng, 12, 6 * 9, 0.8)
    pw = kernels.PackedWeight.pack(w, kind)
    bias = rng.standard_normal(12).astype(np.float32)
    conv = kernels.bind_conv2d(pw, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, bias, ("clip", 0.0, 6.0))
    for shape in ((1, 6, 9, 11), (2, 6, 9, 11), (1, 6, 9, 11), (3, 6, 4, 5)):
        x = rng.standard_normal(shape).astype(np.float32)
        want = kernels.conv2d(pw, x, (3, 3), (2, 2), (1, 1, 1, 1), bias=bias, act=("clip", 0.0, 6.0))
        np.testing.assert_array_equal(conv(x), want)
        res = rng.standard_normal(want.shape).astype(np.float32)
        np.testing.assert_array_equal(conv(x, res), kernels.conv2d(
            pw, x, (3, 3), (2, 2), (1, 1, 1, 1), bias=bias, act=("clip", 0.0, 6.0), residual=res))
        into = res.copy()
        assert conv(x, into, out=into) is into
        np.testing.assert_array_equal(into, conv(x, res))
        # a non-contiguous or float64 input takes the checked path and gives the same result
        np.testing.assert_array_equal(conv(np.asfortranarray(x.astype(np.float64))), want)
    with pytest.raises(InputError, match="does not fit"):
        conv(np.ones((1, 5, 9, 11), np.float32))
    with pytest.raises(InputError, match="NCHW"):
        conv(np.ones((6, 9, 11), np.float32))
    with pytest.raises(InputError, match="residual"):
        conv(np.ones((1, 6, 9, 11), np.float32), np.ones((1, 12, 2, 2), np.float32))


def test_dense_conv_weight_keeps_its_values_across_layouts():
    # A dense weight run rowwise by a conv is stored as row vectors from then on (AVX-512 frees
    # its panels); reading it back, running it as a GEMM, or on another ISA rebuilds what each
    # needs from it
    rng = np.random.default_rng(5)
    w = rng.standard_normal((40, 6 * 9)).astype(np.float32)
    x = rng.standard_normal((1, 6, 9, 9)).astype(np.float32)
    pw = kernels.PackedWeight.pack(w, "dense")
    want = reference.conv2d(w, x, (3, 3), (1, 1), (1,) * 4)
    before = _core.isa()
    try:
        for name in ISAS + ISAS[::-1]:
            _core.set_isa(name)
            close(kernels.conv2d(pw, x, (3, 3), (1, 1), (1,) * 4), want)
            np.testing.assert_array_equal(pw.to_dense(), w)
            xm = rng.standard_normal((6 * 9, 13)).astype(np.float32)
            close(kernels.gemm(pw, xm), w @ xm)
            close(kernels.conv2d(pw, x, (3, 3), (1, 1), (1,) * 4, group=1), want)
    finally:
        _core.set_isa(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("case", [
    (1, 64, 12, 12, 64, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),  # direct
    (1, 700, 9, 9, 24, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),  # K in blocks, few columns
    (1, 160, 7, 7, 24, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),  # K split over threads
    (2, 40, 14, 14, 24, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),  # phased, pitched
    (1, 600, 1, 1, 24, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),  # one column
])
def test_conv2d_into_its_residual_or_input(isa, kind, case, threads):
    # the engine writes a residual layer into its residual's buffer (sparse kernel); any other
    # overlap of the output with an operand is copied first, so the result never changes
    n, c, h, w, m, ks, st, pads, dil, g = case
    rng = np.random.default_rng(sum(case[:5]))
    wt = sparse_matrix(rng, m, c // g * ks[0] * ks[1], 0.9)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    pw = kernels.PackedWeight.pack(wt, kind)
    scale = float(reference.conv2d(np.abs(wt), np.abs(x), ks, st, pads, dil, g).max())
    res = rng.standard_normal(reference.conv2d(wt, x, ks, st, pads, dil, g).shape).astype(np.float32)
    want = reference.conv2d(wt, x, ks, st, pads, dil, g, bias, "relu", res)
    before = kernels.get_num_threads()
    kernels.set_num_threads(threads)
    try:
        buf = res.copy()
        out = kernels.conv2d(pw, x, ks, st, pads, dil, g, bias, "relu", buf, out=buf)
        assert out is buf
        close(buf, want, scale=scale)
        if c == m and ks == (1, 1):  # output over the input
            xb = x.copy()
            kernels.conv2d(pw, xb, ks, st, pads, dil, g, bias, "relu", res, out=xb)
            close(xb, want, scale=scale)
        r2 = res.reshape(m, -1) if n == 1 else None
        if r2 is not None:  # gemm's residual as its output, and the input as its output
            x2 = reference.conv2d(np.eye(c, dtype=np.float32), x, (1, 1)).reshape(c, -1) \
                if ks == (1, 1) else None
            if x2 is not None:
                y2 = r2.copy()
                kernels.gemm(pw, x2, bias, "relu", y2, out=y2)
                close(y2, want.reshape(m, -1), scale=scale)
    finally:
        kernels.set_num_threads(before)


DW_CASES = [  # (N, C, H, W, k, strides, pads, dilations)
    (1, 32, 112, 112, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (2, 5, 13, 17, 3, (2, 2), (1, 1, 1, 1), (1, 1)),
    (1, 7, 15, 9, 5, (2, 2), (2, 2, 2, 2), (1, 1)),
    (1, 3, 12, 12, 3, (1, 2), (0, 1, 2, 1), (2, 2)),
    (1, 4, 1, 1, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (1, 6, 20, 33, 5, (1, 1), (2, 2, 2, 2), (1, 1)),
    # small planes go through the channel-vector path (more channels than one vector)
    (2, 37, 7, 7, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (1, 40, 14, 14, 5, (2, 2), (2, 1, 2, 2), (1, 1)),
    (1, 19, 9, 6, 3, (2, 1), (0, 1, 2, 0), (2, 1)),
    # up to 14x14 outputs at stride 1 too; windows that skip the last input rows and columns;
    # padding wider than the window
    (1, 40, 14, 14, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (1, 20, 10, 10, 3, (2, 2), (0, 0, 0, 0), (1, 1)),
    (1, 17, 6, 6, 3, (1, 1), (3, 3, 3, 3), (1, 1)),
]


@pytest.mark.parametrize("case", DW_CASES)
def test_depthwise_conv2d(isa, case):
    n, c, h, w, k, st, pads, dil = case
    rng = np.random.default_rng(c * h + w)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((c, 1, k, k)).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    for act in ACTS:
        close(kernels.depthwise_conv2d(wt, x, st, pads, dil, bias, act),
              reference.depthwise_conv2d(wt, x, st, pads, dil, bias, act))


POOL_CASES = [  # (N, C, H, W, kernel, strides, pads, ceil_mode, count_include_pad)
    (1, 4, 112, 112, (3, 3), (2, 2), (1, 1, 1, 1), 0, 0),
    (1, 2, 9, 60, (3, 3), (1, 1), (1, 1, 1, 1), 0, 1),  # stride 1, wide rows: written row by row
    (2, 3, 10, 11, (3, 2), (2, 2), (1, 0, 1, 1), 1, 1),
    (1, 3, 7, 7, (2, 2), (2, 2), (0, 0, 0, 0), 1, 0),
    (1, 2, 9, 9, (3, 3), (3, 3), (1, 1, 1, 1), 1, 1),
    (1, 2, 6, 8, (3, 3), (2, 2), (0, 0, 0, 0), 1, 0),
    (1, 1, 1, 1, (1, 1), (1, 1), (0, 0, 0, 0), 0, 0),
    # 3x3 stride 2 (max pool's row-by-row path): odd sizes, asymmetric and wide pads, ceil_mode,
    # a single pixel, rows not a multiple of the vector width
    (2, 3, 9, 13, (3, 3), (2, 2), (0, 1, 1, 0), 1, 0),
    (1, 2, 5, 4, (3, 3), (2, 2), (2, 2, 2, 2), 0, 1),
    (1, 1, 1, 1, (3, 3), (2, 2), (1, 1, 1, 1), 0, 0),
    (1, 2, 37, 21, (3, 3), (2, 2), (1, 1, 0, 0), 1, 0),
]


@pytest.mark.parametrize("case", POOL_CASES)
def test_pools(isa, case):
    n, c, h, w, ks, st, pads, ceil_mode, cip = case
    x = np.random.default_rng(h * w).standard_normal((n, c, h, w)).astype(np.float32)
    close(kernels.max_pool2d(x, ks, st, pads, (1, 1), ceil_mode),
          reference.max_pool2d(x, ks, st, pads, (1, 1), ceil_mode))
    close(kernels.avg_pool2d(x, ks, st, pads, ceil_mode, cip),
          reference.avg_pool2d(x, ks, st, pads, ceil_mode, cip))


@pytest.mark.parametrize("case", [c for c in POOL_CASES if c[2] * c[3] > 1])
def test_max_pool_propagates_nan(isa, case):
    """A window holding a NaN gives NaN wherever the NaN sits in it (as the NumPy twin and
    torch do; onnxruntime's result depends on the NaN's place in the window), and a window of
    NaNs is NaN, not -inf."""
    n, c, h, w, ks, st, pads, ceil_mode, _ = case
    x = np.random.default_rng(h * w).standard_normal((n, c, h, w)).astype(np.float32)
    x[0, 0, h // 2, w // 2] = np.nan
    x[-1, -1, :2, :2] = np.nan
    x[0, -1, -1, -1] = np.inf
    got = kernels.max_pool2d(x, ks, st, pads, (1, 1), ceil_mode)
    want = reference.max_pool2d(x, ks, st, pads, (1, 1), ceil_mode)
    assert np.isnan(want).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    keep = ~np.isnan(want)
    np.testing.assert_array_equal(got[keep], want[keep])
    got = kernels.max_pool2d(x, (3, 2), (1, 2), (1, 0, 2, 1), (2, 3), 1)  # dilated
    np.testing.assert_array_equal(
        np.isnan(got), np.isnan(reference.max_pool2d(x, (3, 2), (1, 2), (1, 0, 2, 1), (2, 3), 1)))


def test_conv2d_maxpool_propagates_nan(isa):
    """The fused stem (conv, ReLU, 3x3/2 max pool) passes a NaN input on to every pooled pixel
    whose window it reaches, on both of its paths (dense rowwise, sparse)."""
    rng = np.random.default_rng(3)
    wt = rng.standard_normal((24, 3 * 49)).astype(np.float32)
    x = rng.standard_normal((1, 3, 40, 36)).astype(np.float32)
    x[0, 1, 20, 17] = np.nan
    conv = reference.conv2d(wt, x, (7, 7), (2, 2), (3, 3, 3, 3), act="relu")
    want = reference.max_pool2d(conv, (3, 3), (2, 2), (1, 1, 1, 1))
    for kind in ("dense", "sparse"):
        got = kernels.conv2d_maxpool(kernels.PackedWeight.pack(wt, kind), x, (7, 7), (2, 2),
                                     (3, 3, 3, 3), act="relu")
        assert np.isnan(want).sum() >= 24 * 4
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=kind)


def test_max_pool_dilated(isa):
    x = np.random.default_rng(5).standard_normal((1, 3, 11, 10)).astype(np.float32)
    close(kernels.max_pool2d(x, (3, 2), (1, 2), (1, 0, 2, 1), (2, 3), 1),
          reference.max_pool2d(x, (3, 2), (1, 2), (1, 0, 2, 1), (2, 3), 1))


@pytest.mark.parametrize("ceil_mode,cip", [(0, 0), (1, 0), (1, 1)])
def test_pool_semantics_match_onnxruntime(ceil_mode, cip):
    """The twins' ceil_mode / count_include_pad rules are onnxruntime's."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    x = np.random.default_rng(6).standard_normal((1, 2, 9, 8)).astype(np.float32)
    attrs = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1], ceil_mode=ceil_mode)
    for op, extra, ours in [
        ("MaxPool", {}, lambda: kernels.max_pool2d(x, (3, 3), (2, 2), (1, 0, 1, 1), (1, 1),
                                                   ceil_mode)),
        ("AveragePool", {"count_include_pad": cip},
         lambda: kernels.avg_pool2d(x, (3, 3), (2, 2), (1, 0, 1, 1), ceil_mode, cip)),
    ]:
        node = helper.make_node(op, ["x"], ["y"], **attrs, **extra)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
            "x", TensorProto.FLOAT, x.shape)], [helper.make_tensor_value_info(
                "y", TensorProto.FLOAT, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                  ir_version=8)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        close(ours(), sess.run(None, {"x": x})[0])


def test_global_avg_pool_and_add_act(isa):
    rng = np.random.default_rng(7)
    for shape in [(1, 1, 1, 1), (2, 7, 5, 3), (1, 2048, 7, 7)]:
        x = rng.standard_normal(shape).astype(np.float32)
        close(kernels.global_avg_pool(x), reference.global_avg_pool(x))
    a, b = rng.standard_normal((2, 3, 33)).astype(np.float32), rng.standard_normal(33)
    for act in ACTS:
        close(kernels.add_act(a, b, act), reference.add_act(a, b, act))


def test_gelu_epilogue_matches_exact_erf_form(isa):
    """Every vector lane and the scalar (N = 1) path against math.erf, tails and specials too."""
    x = np.concatenate([np.linspace(-12, 12, 4001), [0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0]])
    x = x.astype(np.float32)[None, :]
    one = np.ones((1, 1), np.float32)
    for kind in ("sparse", "dense"):
        pw = kernels.PackedWeight.pack(one, kind)
        want = reference.gelu(x)
        got = kernels.gemm(pw, x, act="gelu")
        # absolute error of the erfc approximation (1.5e-7) times |x| / 2, within float rounding
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        col = kernels.gemm(pw, np.ascontiguousarray(x[:, :37].T.reshape(1, -1)), act="gelu")
        np.testing.assert_allclose(col, want[:, :37], rtol=1e-5, atol=1e-6)
        special = np.array([[np.inf, -np.inf, np.nan]], np.float32)
        y = kernels.gemm(pw, special, act="gelu")
        assert y[0, 0] == np.inf and abs(y[0, 1]) < 1e-30 and np.isnan(y[0, 2])
        y1 = kernels.gemm(pw, special[:, :1].copy(), act="gelu")  # the one-column path
        assert y1[0, 0] == np.inf


SOFTMAX_SHAPES = [(1,), (1, 1), (3, 5), (2, 16), (4, 17), (2, 3, 33), (1, 12, 7, 128), (5, 0)]


@pytest.mark.parametrize("shape", SOFTMAX_SHAPES)
def test_softmax(isa, shape):
    rng = np.random.default_rng(sum(shape) + len(shape))
    x = (rng.standard_normal(shape) * 6).astype(np.float32)
    close(kernels.softmax(x), reference.softmax(x))
    y = x.copy()
    assert kernels.softmax(y, out=y) is y  # in place
    close(y, reference.softmax(x))


def test_softmax_extremes(isa):
    x = np.array([[1000.0, 0.0, -1000.0], [-1e4, -1e4, -1e4], [np.nan, 0.0, 1.0],
                  [np.inf, 0.0, 1.0]], np.float32)
    y = kernels.softmax(x)
    np.testing.assert_allclose(y[0], [1.0, 0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(y[1], [1 / 3] * 3, rtol=1e-6)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(np.isnan(y[2:]), np.isnan(reference.softmax(x[2:])))


@pytest.mark.parametrize("shape", [(1,), (1, 1), (3, 5), (2, 16), (4, 17), (2, 3, 33),
                                   (2, 128, 768), (1, 45)])
def test_layer_norm(isa, shape):
    rng = np.random.default_rng(sum(shape) * 3 + len(shape))
    x = (rng.standard_normal(shape) * 3 + 5).astype(np.float32)  # an offset the mean must remove
    n = shape[-1]
    scale = rng.standard_normal(n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    for eps in (1e-5, 1e-12):
        close(kernels.layer_norm(x, scale, bias, eps), reference.layer_norm(x, scale, bias, eps),
              tol=1e-4 if n == 1 else 1e-5)
    close(kernels.layer_norm(x, scale), reference.layer_norm(x, scale))
    y = x.copy()
    kernels.layer_norm(y, scale, bias, out=y)
    close(y, reference.layer_norm(x, scale, bias))


@pytest.mark.parametrize("shape", [((1, 1, 1), (1, 1, 1)), ((2, 5, 3), (2, 3, 7)),
                                   ((12, 128, 64), (12, 64, 128)), ((3, 17, 33), (3, 33, 1)),
                                   ((1, 2, 9, 4), (1, 2, 4, 50)), ((4, 3, 0), (4, 0, 5)),
                                   ((1, 12, 128, 128), (1, 12, 128, 64))])
def test_batched_matmul(isa, shape):
    rng = np.random.default_rng(sum(shape[0]) + sum(shape[1]))
    a = rng.standard_normal(shape[0]).astype(np.float32)
    b = rng.standard_normal(shape[1]).astype(np.float32)
    scale = float((np.abs(a).astype(np.float64) @ np.abs(b)).max()) if a.size and b.size else 1.0
    close(kernels.batched_matmul(a, b), reference.batched_matmul(a, b), scale=scale)


@pytest.mark.parametrize("b,sq,sk,heads,d,mask", [
    (1, 128, 128, 12, 64, (1, 1, 1, 128)),   # BERT-base
    (2, 5, 7, 3, 5, (2, 1, 1, 7)),           # head width below the vector width
    (1, 1, 1, 1, 1, None),                   # one element
    (2, 17, 33, 2, 20, (2, 2, 17, 33)),      # a mask per head and query
    (3, 9, 9, 4, 16, (9, 1)),                # a mask column broadcast along keys
    (1, 40, 3, 2, 17, (3,)),
])
def test_attention(isa, b, sq, sk, heads, d, mask):
    rng = np.random.default_rng(sq * sk + d)
    q = rng.standard_normal((b, sq, heads * d)).astype(np.float32)
    k = rng.standard_normal((b, sk, heads * d)).astype(np.float32)
    v = rng.standard_normal((b, sk, heads * d)).astype(np.float32)
    m = None if mask is None else (3 * rng.standard_normal(mask)).astype(np.float32)
    scale = 1 / np.sqrt(d)
    close(kernels.attention(q, k, v, heads, scale, m), reference.attention(q, k, v, heads, scale, m),
          scale=float(np.abs(v).max()))


@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("b,s,k,heads,d,m,mask", [
    (1, 128, 96, 4, 24, 80, (1, 1, 1, 128)),
    (2, 5, 7, 3, 5, 9, (2, 1, 1, 5)),
    (1, 1, 3, 1, 1, 2, None),
    (2, 17, 20, 2, 20, 20, (2, 2, 17, 17)),
    (3, 9, 16, 4, 16, 8, (9, 1)),
])
def test_attention_block(isa, kind, b, s, k, heads, d, m, mask):
    rng = np.random.default_rng(s * k + d)
    x = rng.standard_normal((b, s, k)).astype(np.float32)
    ws = [sparse_matrix(rng, heads * d, k, 0.8) / np.float32(np.sqrt(k)) for _ in range(3)]
    ws.append(sparse_matrix(rng, m, heads * d, 0.8))
    bs = [rng.standard_normal(w.shape[0]).astype(np.float32) for w in ws]
    res = rng.standard_normal((b, s, m)).astype(np.float32)
    msk = None if mask is None else (3 * rng.standard_normal(mask)).astype(np.float32)
    wqkv, bqkv = np.concatenate(ws[:3]), np.concatenate(bs[:3])
    qkv, o = (kernels.PackedWeight.pack(wqkv, kind), bqkv), (kernels.PackedWeight.pack(ws[3], kind), bs[3])
    for act, r in (("none", None), ("relu", res)):
        want = reference.attention_block(x, (wqkv, bqkv), (ws[3], bs[3]), heads, 0.3, msk, act,
                                         residual=r)
        close(kernels.attention_block(x, qkv, o, heads, 0.3, msk, act, residual=r), want,
              scale=float(np.abs(want).max()) + 1)
    ln = (rng.standard_normal(k).astype(np.float32), rng.standard_normal(k).astype(np.float32), 1e-5)
    want = reference.attention_block(x, (wqkv, None), (ws[3], bs[3]), heads, 0.3, msk,
                                     residual=res, ln=ln)
    close(kernels.attention_block(x, (qkv[0], None), o, heads, 0.3, msk, residual=res, ln=ln),
          want, scale=float(np.abs(want).max()) + 1)
    fm_of = lambda a: np.ascontiguousarray(np.moveaxis(a, -1, 0))  # noqa: E731
    for fm in [(True, False, False), (False, True, True), (True, True, False), (False, False, True)]:
        xx, rr = fm_of(x) if fm[0] else x, fm_of(res) if fm[1] else res
        want = reference.attention_block(x if not fm[0] else xx, (wqkv, bqkv), (ws[3], bs[3]), heads,
                                         0.3, msk, "gelu", residual=rr, ln=ln, fm=fm)
        close(kernels.attention_block(xx, qkv, o, heads, 0.3, msk, "gelu", residual=rr, ln=ln,
                                      fm=fm), want, scale=float(np.abs(want).max()) + 1)
    with pytest.raises(InputError, match="attention_block needs"):
        kernels.attention_block(x[0], qkv, o, heads)
    with pytest.raises(InputError, match="attention_block needs"):
        kernels.attention_block(x, o, o, heads)


def test_attention_edges_and_misuse():
    q = np.ones((1, 3, 8), np.float32)
    # no keys: an empty sum
    got = kernels.attention(q, np.ones((1, 0, 8), np.float32), np.ones((1, 0, 8), np.float32), 2)
    np.testing.assert_array_equal(got, np.zeros((1, 3, 8), np.float32))
    # a fully masked key gets no weight
    k = np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32)
    v = np.arange(32, dtype=np.float32).reshape(1, 4, 8)
    mask = np.array([0, 0, 0, -np.inf], np.float32)
    close(kernels.attention(q, k, v, 2, 0.5, mask), reference.attention(q[:, :, :], k[:, :3], v[:, :3], 2, 0.5))
    with pytest.raises(InputError, match="H = 3"):
        kernels.attention(q, k, v, 3)
    with pytest.raises(InputError, match="does not broadcast"):
        kernels.attention(q, k, v, 2, mask=np.zeros((1, 2, 3, 5), np.float32))
    with pytest.raises(InputError):
        kernels.attention(q, k, v[:, :3], 2)


def test_row_kernels_and_batched_matmul_misuse():
    with pytest.raises(InputError, match="same leading"):
        kernels.batched_matmul(np.ones((2, 3, 4), np.float32), np.ones((3, 4, 5), np.float32))
    with pytest.raises(InputError, match="same leading"):
        kernels.batched_matmul(np.ones((2, 3, 4), np.float32), np.ones((2, 5, 5), np.float32))
    with pytest.raises(InputError, match="scale"):
        kernels.layer_norm(np.ones((2, 8), np.float32), np.ones(7, np.float32))
    with pytest.raises(InputError, match="out"):
        kernels.softmax(np.ones((2, 8), np.float32), out=np.empty((2, 7), np.float32))
    with pytest.raises(InputError):
        kernels.gemm(kernels.PackedWeight.pack(np.ones((2, 2), np.float32)), np.ones((2, 2)),
                     act="swish")


def test_nan_and_inf_propagate_without_crash(isa):
    w = np.eye(4, dtype=np.float32)
    x = np.array([[np.nan], [np.inf], [-np.inf], [1.0]], np.float32)
    # the sparse kernel never multiplies by a pruned zero, so 0 * NaN does not spread
    y = kernels.gemm(kernels.PackedWeight.pack(w, "sparse"), x, act="relu")
    assert np.isnan(y[0, 0]) and y[1, 0] == np.inf and y[2, 0] == 0 and y[3, 0] == 1
    # the dense kernel does, like numpy
    y = kernels.gemm(kernels.PackedWeight.pack(w, "dense"), x, act="relu")
    with np.errstate(invalid="ignore"):
        want = reference.gemm(w, x, act="relu")
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want))


@pytest.mark.parametrize("n", [49, 70, 196, 700])
def test_thread_counts_agree(n):
    """Every way the drivers split work over threads gives the 1-thread result: exactly when the
    threads split columns or rows (wide outputs; column chunks of whole vectors, cut into row
    ranges when few), to float rounding when they split K (few columns and a long K, or column
    tiles that two threads would share unevenly, as 196 columns' 3 + 1/4 tiles: partial sums
    added at the end). A given thread count repeats its result bit for bit."""
    rng = np.random.default_rng(8 + n)
    w = sparse_matrix(rng, 96, 1500, 0.9, empty_rows=3)
    x = rng.standard_normal((1500, n)).astype(np.float32)
    bias = rng.standard_normal(96).astype(np.float32)
    res = rng.standard_normal((96, n)).astype(np.float32)
    before = kernels.get_num_threads()

    def outputs():
        return [kernels.gemm(kernels.PackedWeight.pack(w, kind), x, bias, "relu", res)
                for kind in ("sparse", "dense")] + [
                kernels.linear(kernels.PackedWeight.pack(w, "sparse"), x.T.copy(), bias)]
    try:
        outs = []
        for t in (1, 2, 3):
            kernels.set_num_threads(t)
            outs.append(outputs())
            for a, b in zip(outs[-1], outputs()):
                np.testing.assert_array_equal(a, b)
    finally:
        kernels.set_num_threads(before)
    scale = term_scale(w, x)
    close(outs[0][0], reference.gemm(w, x, bias, "relu", res), scale=scale)
    # K = 1500 spans several blocks: the sparse kernel splits K for few columns, and at 2 threads
    # for 196 (4 tiles that share out 8 + 5 vectors); 3 threads take a grid of rows x columns
    split_k = {2: n < 128 or n == 196, 3: n < 128}
    for t, o in zip((2, 3), outs[1:]):
        for i, (a, b) in enumerate(zip(outs[0], o)):
            if split_k[t] and i != 1:
                close(b, a, scale=scale)
            else:
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("act", ACTS)
def test_split_k_sums_with_every_activation(act):
    """Few columns and a long K at 2 threads: the threads take ranges of K blocks and one vector
    pass adds the partial sums, the bias, the residual and the activation."""
    rng = np.random.default_rng(21)
    w = sparse_matrix(rng, 70, 2600, 0.9, empty_rows=2)
    x = rng.standard_normal((2600, 37)).astype(np.float32)
    bias = rng.standard_normal(70).astype(np.float32)
    res = rng.standard_normal((70, 37)).astype(np.float32)
    x[5, 3] = np.nan
    before = kernels.get_num_threads()
    try:
        kernels.set_num_threads(2)
        got = kernels.gemm(kernels.PackedWeight.pack(w, "sparse"), x, bias, act, res)
    finally:
        kernels.set_num_threads(before)
    with np.errstate(invalid="ignore"):
        want = reference.gemm(w, np.nan_to_num(x, nan=0.0), bias, act, res)
    # the sparse kernel never multiplies a pruned zero by the NaN, so only rows that use it see it
    uses = w[:, 5] != 0
    assert np.isnan(got[uses, 3]).all()
    keep = np.ones_like(got, bool)
    keep[uses, 3] = False
    close(np.where(keep, got, 0), np.where(keep, want, 0), scale=term_scale(w, np.nan_to_num(x)))


@pytest.mark.parametrize("m,k,n", [(256, 64, 3136), (64, 576, 3248), (128, 1152, 784)])
def test_many_threads_split_wide_outputs_exactly(m, k, n):
    """Many threads on a wide output (ResNet-50's 56x56 and 28x28 shapes): whole column tiles
    would share out unevenly, so the threads take row ranges crossed with column ranges cut at
    whole vectors; every split gives the 1-thread result bit for bit."""
    rng = np.random.default_rng(m + k + n)
    w = sparse_matrix(rng, m, k, 0.9, empty_rows=2)
    x = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    res = rng.standard_normal((m, n)).astype(np.float32)
    packed = kernels.PackedWeight.pack(w, "sparse")
    before = kernels.get_num_threads()
    try:
        outs = {}
        for t in (1, 2, 5, 6, 8, 12, 16):
            kernels.set_num_threads(t)
            outs[t] = kernels.gemm(packed, x, bias, "relu", res)
    finally:
        kernels.set_num_threads(before)
    close(outs[1], reference.gemm(w, x, bias, "relu", res), scale=term_scale(w, x))
    for t, y in outs.items():
        np.testing.assert_array_equal(y, outs[1], err_msg=f"{t} threads")


def test_concurrent_calls_from_python_threads():
    """Kernels release the GIL and share one worker pool; overlapping calls stay correct."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(12)
    cases = []
    for i in range(6):
        w = sparse_matrix(rng, 40 + i, 90, 0.8)
        x = rng.standard_normal((90, 300 + 7 * i)).astype(np.float32)
        cases.append((kernels.PackedWeight.pack(w, "sparse" if i % 2 else "dense"), w, x))
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda c: [kernels.gemm(c[0], c[2]) for _ in range(5)], cases))
    for (_, w, x), got in zip(cases, outs):
        for y in got:
            close(y, reference.gemm(w, x), scale=term_scale(w, x))


def test_pack_auto_and_attributes():
    rng = np.random.default_rng(9)
    sparse = kernels.PackedWeight.pack(sparse_matrix(rng, 64, 256, 0.95))
    dense = kernels.PackedWeight.pack(rng.standard_normal((64, 256)).astype(np.float32))
    assert sparse.kind == "sparse" and dense.kind == "dense"
    assert sparse.shape == (64, 256) and 0.9 < sparse.sparsity < 1.0
    assert dense.nnz == 64 * 256 and dense.sparsity == 0.0
    w = sparse_matrix(rng, 10, 12, 0.5)
    for kind in ("sparse", "dense"):
        np.testing.assert_array_equal(kernels.PackedWeight.pack(w, kind).to_dense(), w)


def test_kernel_choice_follows_the_isa_crossover():
    # AVX2's sparse kernel needs more zeros to win on long reductions than AVX-512's does
    assert kernels.sparse_wins((256, 1024), 0.55, isa="avx512")
    assert not kernels.sparse_wins((256, 1024), 0.55, isa="avx2")
    assert kernels.sparse_wins((256, 1024), 0.7, isa="avx2")
    assert kernels.sparse_wins((64, 256), 0.45, isa="avx2")  # short K: the dense kernel is weak
    assert not kernels.sparse_wins((512, 4608), 0.6, isa="portable")
    assert not kernels.sparse_wins((512, 4608), 0.52, isa="avx512")
    assert kernels.sparse_wins((512, 4608), 0.9)  # whatever this machine runs
    # 4x1 blocks: the block kernel wins from 40% zeros on every ISA
    for isa in ("avx512", "avx2", "portable"):
        assert kernels.sparse_wins((512, 4608), 0.4, isa=isa, row_blocks=4)
        assert not kernels.sparse_wins((512, 4608), 0.35, isa=isa, row_blocks=4)


def test_auto_kind_packs_four_row_blocks_sparse_from_forty_percent():
    rng = np.random.default_rng(9)
    blocked = block_matrix(rng, 64, 256, 0.55)  # 45% zeros, in 4x1 blocks
    assert kernels.four_row_blocks(blocked)
    packed = kernels.PackedWeight.pack(blocked)
    assert packed.kind == "sparse" and packed.row_blocks == 4
    loose = sparse_matrix(rng, 64, 256, 0.45)  # the same share of zeros, unstructured
    assert not kernels.four_row_blocks(loose)
    assert kernels.PackedWeight.pack(loose).kind == "dense"
    with pytest.raises(InputError, match="2-D weight"):
        kernels.four_row_blocks(np.zeros(8, np.float32))
    with pytest.raises(InputError, match="row_blocks must be 1 or 4"):
        kernels.sparse_wins((8, 8), 0.9, row_blocks=2)
    # the Python rule is the core's
    for w in (blocked, loose, block_matrix(rng, 64, 90, 0.1, fill=0.8),
              block_matrix(rng, 64, 90, 0.1, fill=0.7), np.zeros((8, 4), np.float32)):
        assert kernels.four_row_blocks(w) == (kernels.PackedWeight.pack(w, "sparse").row_blocks == 4)


def test_misuse_raises_input_error():
    pw = kernels.PackedWeight.pack(np.ones((4, 6), np.float32))
    with pytest.raises(InputError, match=r"expected \[6, N\]"):
        kernels.gemm(pw, np.ones((5, 3), np.float32))
    with pytest.raises(InputError, match="bias has 3 values"):
        kernels.gemm(pw, np.ones((6, 3), np.float32), bias=np.ones(3))
    with pytest.raises(InputError, match="act must be"):
        kernels.gemm(pw, np.ones((6, 3), np.float32), act="swish")
    # tuple activations are parsed once and kept; a bad one is an InputError however malformed
    x = np.ones((6, 3), np.float32)
    for _ in range(2):
        np.testing.assert_array_equal(kernels.gemm(pw, x, act=("clip", 0.0, 5.0)), np.full((4, 3), 5.0))
    for bad in (("clip", [0.0], 1.0), ("clip", "low", 1.0), ("clip", 0.0)):
        with pytest.raises(InputError):
            kernels.gemm(pw, x, act=bad)
    with pytest.raises(InputError, match="NCHW"):
        kernels.max_pool2d(np.ones((3, 4, 4), np.float32), (2, 2))
    with pytest.raises(InputError, match="does not fit"):
        kernels.conv2d(pw, np.ones((1, 5, 4, 4), np.float32), (1, 1))
    with pytest.raises(InputError, match="2-D weight"):
        kernels.PackedWeight.pack(np.ones(3, np.float32))
    with pytest.raises(InputError, match="positive"):
        kernels.set_num_threads(0)
    with pytest.raises(InputError, match="dtype"):
        kernels.gemm(pw, np.array([["a"] * 3] * 6))


def test_isa_env_override_picks_the_table():
    """SPARSIFY_ISA chooses the build at import, as a user on an older CPU would get it."""
    code = "from sparsify.engine import kernels; print(kernels.isa())"
    for name in ISAS:
        env = dict(os.environ, SPARSIFY_ISA=name)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
        assert out.stdout.strip() == name


def test_every_kernel_has_a_numpy_twin_with_the_same_signature():
    import inspect

    for name in kernels.__all__:
        # packing and the kernel-choice rules
        if name in ("PackedWeight", "sparse_wins", "four_row_blocks"):
            continue
        twin = getattr(reference, name, None)
        assert twin is not None, f"reference.{name} is missing"
        assert list(inspect.signature(getattr(kernels, name)).parameters) == \
            list(inspect.signature(twin).parameters), name


def block_matrix(rng, m, k, density, fill=1.0):
    """4x1 blocks: rows in groups of four sharing their columns; `fill` of each block's four
    weights nonzero."""
    keep = np.repeat(rng.random((m // 4, k)) < density, 4, axis=0)
    w = rng.standard_normal((m, k)).astype(np.float32) * keep
    w *= rng.random((m, k)) < fill
    return w.astype(np.float32)


BLOCK_SHAPES = [  # (M, K, N): tails of the column tile, K blocks, one block row, empty groups
    (4, 1, 1), (4, 7, 5), (8, 64, 17), (12, 33, 64), (64, 64, 200), (128, 300, 49),
    (256, 2304, 196), (16, 4500, 70), (1024, 40, 3),
]


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("m,k,n", BLOCK_SHAPES)
def test_sparse_four_row_blocks(isa, m, k, n, threads):
    # 4x1 block pruning's weights run the block kernel; results as the unstructured ones
    rng = np.random.default_rng(m + 3 * k + 7 * n)
    w = block_matrix(rng, m, k, 0.15)
    w[4:8] = 0.0 if m > 8 else w[4:8]  # a group with no block
    x = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    res = rng.standard_normal((m, n)).astype(np.float32)
    pw = kernels.PackedWeight.pack(w, "sparse")
    assert pw.row_blocks == (4 if np.count_nonzero(w) else 1)
    before = kernels.get_num_threads()
    kernels.set_num_threads(threads)
    try:
        scale = term_scale(w, x)
        for act in ("none", "relu", "silu"):
            close(kernels.gemm(pw, x, bias, act, res), reference.gemm(w, x, bias, act, res),
                  scale=scale)
        close(kernels.gemm(pw, x), reference.gemm(w, x), scale=scale)
        y = res.copy()  # the residual's own buffer as the output
        kernels.gemm(pw, x, bias, "relu", y, out=y)
        close(y, reference.gemm(w, x, bias, "relu", res), scale=scale)
    finally:
        kernels.set_num_threads(before)


def test_four_row_block_detection():
    rng = np.random.default_rng(5)
    assert kernels.PackedWeight.pack(block_matrix(rng, 64, 90, 0.1), "sparse").row_blocks == 4
    # a few zeros inside kept blocks still count as blocks; many do not
    assert kernels.PackedWeight.pack(block_matrix(rng, 64, 90, 0.1, fill=0.9),
                                     "sparse").row_blocks == 4
    assert kernels.PackedWeight.pack(block_matrix(rng, 64, 90, 0.1, fill=0.5),
                                     "sparse").row_blocks == 1
    assert kernels.PackedWeight.pack(sparse_matrix(rng, 64, 90, 0.9), "sparse").row_blocks == 1
    assert kernels.PackedWeight.pack(block_matrix(rng, 64, 90, 0.1)[:62], "sparse").row_blocks == 1
    assert kernels.PackedWeight.pack(np.zeros((8, 8), np.float32), "sparse").row_blocks == 1
    assert kernels.PackedWeight.pack(block_matrix(rng, 8, 8, 0.5), "dense").row_blocks == 1
    assert "4x1" in repr(kernels.PackedWeight.pack(block_matrix(rng, 8, 30, 0.3), "sparse"))


@pytest.mark.parametrize("group", [1, 2, 3, 12])
def test_four_row_blocks_in_grouped_conv(isa, group):
    # 24 output channels: conv groups of 24, 12 and 8 hold whole row groups and run the block
    # kernel; groups of 2 split them, and the conv runs the plain layout of the same weight
    rng = np.random.default_rng(group)
    m, c, hw = 24, 2 * group, 9
    w4 = block_matrix(rng, m, (c // group) * 9, 0.3).reshape(m, c // group, 3, 3)
    x = rng.standard_normal((2, c, hw, hw)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    pw = kernels.PackedWeight.pack(w4.reshape(m, -1), "sparse")
    assert pw.row_blocks == 4
    got = kernels.conv2d(pw, x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), group, bias, "relu")
    want = reference.conv2d(w4.reshape(m, -1), x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), group,
                            bias, "relu")
    close(got, want, scale=float(np.abs(want).max()) + 1.0)


def test_engine_reports_and_runs_four_row_blocks():
    # a Conv + Relu whose weight was pruned in 4x1 blocks: the plan says so, results match
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sparsify.engine import Engine

    rng = np.random.default_rng(11)
    w = block_matrix(rng, 32, 16 * 9, 0.1).reshape(32, 16, 3, 3)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], "conv", kernel_shape=[3, 3], pads=[1] * 4),
         helper.make_node("Relu", ["c"], ["y"], "relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 12, 12])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    engine = Engine(model, threads=2)
    (layer,) = engine.report()["layers"]
    assert layer["kind"] == "sparse" and layer["blocks"] == "4x1"
    x = rng.standard_normal((1, 16, 12, 12)).astype(np.float32)
    want = np.maximum(reference.conv2d(w.reshape(32, -1), x, (3, 3), (1, 1), (1,) * 4), 0)
    close(engine.run({"x": x})[0], want, scale=float(np.abs(want).max()) + 1.0)
    (row,) = engine.profile({"x": x}, repeats=2)
    assert row["kind"] == "sparse" and row["blocks"] == "4x1"
    from sparsify.engine.bench import format_profile

    assert "[sparse, 4x1 blocks]" in format_profile([row])


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("blocks", [False, True], ids=["loose", "4x1"])
def test_sparse_conv_on_small_planes_takes_the_narrow_layout(isa, blocks, threads):
    # outputs of at most one vector of columns (4x4, 2x2, 1x1 planes; stride 2 and 1x1 kernels
    # too) run the sparse kernel on one-vector tiles with long K blocks; results as the reference
    rng = np.random.default_rng(3 + threads)
    before = kernels.get_num_threads()
    kernels.set_num_threads(threads)
    try:
        for (c, m, hw, k, s) in [(64, 32, 4, 3, 1), (96, 48, 2, 3, 1), (40, 16, 1, 1, 1),
                                 (24, 12, 4, 3, 2), (300, 20, 3, 1, 1), (600, 8, 2, 3, 1)]:
            kk = c * k * k
            w = block_matrix(rng, m, kk, 0.15) if blocks else sparse_matrix(rng, m, kk, 0.85)
            x = rng.standard_normal((2, c, hw, hw)).astype(np.float32)
            p = (k // 2,) * 4
            oh = (hw + 2 * p[0] - k) // s + 1
            bias = rng.standard_normal(m).astype(np.float32)
            res = rng.standard_normal((2, m, oh, oh)).astype(np.float32)
            pw = kernels.PackedWeight.pack(w, "sparse")
            assert pw.row_blocks == (4 if blocks else 1)
            want = reference.conv2d(w, x, (k, k), (s, s), p, (1, 1), 1, bias, "relu", res)
            scale = float(reference.conv2d(np.abs(w), np.abs(x), (k, k), (s, s), p).max()) + 1.0
            close(kernels.conv2d(pw, x, (k, k), (s, s), p, (1, 1), 1, bias, "relu", res), want,
                  scale=scale)
    finally:
        kernels.set_num_threads(before)
