"""Python face of the C++ core (``sparsify.engine._core``): packed weights and fused kernels.

Each function here has a NumPy twin with the same signature in ``reference.py``. This layer
only checks shapes and dtypes (raising ``InputError``), makes arrays C-contiguous float32,
allocates outputs and forwards raw buffers; every loop runs in C++ with the GIL released.

Layouts follow ONNX: activations NCHW, ``pads = (top, left, bottom, right)``, and a Conv
weight [M, C/group, kh, kw] is packed as the matrix [M, C/group * kh * kw].
"""

from __future__ import annotations

import math

import numpy as np

from sparsify.engine.reference import conv_out_size, parse_act
from sparsify.errors import EngineError, InputError

try:
    from sparsify.engine import _core
except ImportError as err:  # pragma: no cover - only without a build
    raise ImportError(
        "sparsify's C++ core (sparsify.engine._core) is not built; install the package with "
        "`pip install -e .` (needs a C++17 compiler and CMake) and retry"
    ) from err

__all__ = [
    "PackedWeight", "gemm", "linear", "linear_chain", "conv2d", "depthwise_conv2d", "max_pool2d", "avg_pool2d",
    "global_avg_pool", "add_act", "softmax", "layer_norm", "batched_matmul", "attention", "attention_block",
    "retain_freed_memory",
    "set_num_threads",
    "four_row_blocks", "get_num_threads", "isa", "sparse_wins",
]


def sparse_wins(shape: tuple[int, int], sparsity: float, isa: str | None = None,
                row_blocks: int = 1) -> bool:
    """Whether the sparse kernel beats the dense one for a weight [M, K] with this sparsity, on
    the instruction set the core runs (``isa``: the active one by default); ``row_blocks=4`` for
    a weight in 4x1 blocks (``four_row_blocks``), which the block kernel runs.

    4x1 blocks (ResNet-50's conv shapes, 1 thread, on the AVX-512 Xeon with its AVX-512 and AVX2
    builds): break-even at 0.2-0.3 on AVX-512 (0.3: every layer but the 7x7 3x3 faster, 1.13x
    weighted); at 0.4 every layer wins, by 1.10-2.03x (AVX2 build: 1.06-1.51x), so 0.4 on every
    ISA.

    Measured with ``scripts/bench_kernels.py --only crossover`` (1 thread, CPU time, min of
    repeats) on the GEMM form of every ResNet-50 conv and BERT-base linear shape; the
    thresholds sit just above each band of break-even sparsities, where sparse already wins by
    5-25%, so a layer near the line keeps the kernel whose speed varies less.

    - AVX-512 (Zen 5): break-even 0.30-0.49 for K < 2048 and 0.49-0.52 for K >= 2048, where the
      dense kernel's long register-blocked reductions are at their best.
    - AVX2 (Zen 3), also used for the portable build: 0.30-0.38 for K <= 256, where the dense
      kernel reloads its output tile every few steps, but 0.52-0.60 for K from 512 and up to
      0.63 for K >= 2048: the sparse kernel does one load per multiply-add, and AVX2's
      half-width vectors halve what each load carries. At 50% zeros and K = 1024 the sparse
      kernel ran 1.3x slower than dense there.

    Small weights follow the same rule: the column count is unknown at packing time and
    MobileNetV2's [96, 16] .. [192, 32] 1x1 convs on 28x28-112x112 planes ran 1.6-2.3x faster
    sparse at 70% zeros (they stayed dense below 90% before, which missed every one pruned to
    89.97%).
    """
    m, k = shape
    if row_blocks not in (1, 4):
        raise InputError(f"sparse_wins: row_blocks must be 1 or 4 (4x1 blocks), got {row_blocks!r}")
    if row_blocks == 4:
        return sparsity >= 0.4
    if (isa or _core.isa()) == "avx512":
        return sparsity >= (0.55 if k >= 2048 else 0.5)
    return sparsity >= (0.4 if k <= 256 else 0.62 if k < 2048 else 0.65)


def four_row_blocks(w) -> bool:
    """Whether a weight [M, K]'s rows, in groups of four, share their columns closely enough for
    the block kernel (the core's rule: its nonzeros fill at least 75% of the 4x1 blocks that hold
    any; ``SparseWeight::four_row_blocks``)."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise InputError(f"four_row_blocks needs a 2-D weight [M, K], got shape {w.shape}")
    return bool(_core.SparseWeight(np.ascontiguousarray(w, dtype=np.float32)).four_row_blocks)


class PackedWeight:
    """A constant weight matrix packed once for the sparse (CSR) or dense (panel) kernel."""

    def __init__(self, handle, kind: str, shape: tuple[int, int], nnz: int):
        self._h = handle
        self._conv_cache = {}  # conv call geometry by input shape and attributes
        self.kind = kind
        self.shape = shape
        self.nnz = nnz
        size = shape[0] * shape[1]
        self.sparsity = 1.0 - nnz / size if size else 0.0
        # 4 where the rows, in groups of four, share their columns (4x1 block pruning): the
        # sparse kernel then loads each X vector once for four rows (docs/engine.md)
        self.row_blocks = 4 if kind == "sparse" and handle.four_row_blocks else 1

    @classmethod
    def pack(cls, w2d, kind: str = "auto") -> "PackedWeight":
        w = np.asarray(w2d)
        if w.ndim != 2:
            raise InputError(f"PackedWeight.pack needs a 2-D weight [M, K], got shape {w.shape}")
        if not np.issubdtype(w.dtype, np.floating):
            raise InputError(f"PackedWeight.pack needs a float weight, got dtype {w.dtype}")
        w = np.ascontiguousarray(w, dtype=np.float32)
        nnz = int(np.count_nonzero(w))
        handle = None
        if kind == "auto":
            sparsity = 1.0 - nnz / w.size if w.size else 0.0
            kind = "dense"
            if sparse_wins(w.shape, sparsity, row_blocks=4):  # the lowest threshold: worth a look
                handle = _core.SparseWeight(w)  # the core decides on blocks; kept if sparse wins
                blocks = 4 if handle.four_row_blocks else 1
                kind = "sparse" if sparse_wins(w.shape, sparsity, row_blocks=blocks) else "dense"
        if kind == "sparse":
            handle = handle if handle is not None else _core.SparseWeight(w)
        elif kind == "dense":
            handle = _core.DenseWeight(w)
        else:
            raise InputError(f"PackedWeight.pack kind must be 'auto', 'sparse' or 'dense', "
                             f"got {kind!r}")
        return cls(handle, kind, (int(w.shape[0]), int(w.shape[1])), nnz)

    def to_dense(self) -> np.ndarray:
        out = np.empty(self.shape, np.float32)
        self._h.to_dense(out)
        return out

    def __repr__(self) -> str:
        blocks = ", blocks='4x1'" if self.row_blocks == 4 else ""
        return (f"PackedWeight(kind={self.kind!r}, shape={self.shape}, "
                f"sparsity={self.sparsity:.3f}{blocks})")


def _f32(a, what: str) -> np.ndarray:
    if type(a) is np.ndarray and a.dtype == np.float32 and a.flags.c_contiguous:
        return a  # the common case, kept cheap: this runs once per op per inference
    a = np.asarray(a)
    if a.dtype != np.float32:
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise InputError(f"{what} must be a float32 array, got dtype {a.dtype}")
        a = a.astype(np.float32)
    return np.ascontiguousarray(a)


def _vec(b, n: int, what: str):
    if b is None:
        return None
    b = _f32(b, what)
    if b.size != n:
        raise InputError(f"{what} has {b.size} values, expected {n}")
    return b


def _same(r, shape, what: str):
    if r is None:
        return None
    r = _f32(r, what)
    if r.shape != tuple(shape):
        if not _broadcastable(r.shape, shape):
            raise InputError(f"{what} has shape {r.shape}, expected {tuple(shape)}")
        r = np.ascontiguousarray(np.broadcast_to(r, shape))
    return r


def _broadcastable(src, dst) -> bool:
    try:
        return np.broadcast_shapes(src, dst) == tuple(dst)
    except ValueError:
        return False


def _out(out, shape, what: str) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if out.dtype != np.float32 or not out.flags.c_contiguous or out.shape != tuple(shape):
        raise InputError(f"{what}: out must be a C-contiguous float32 array of shape "
                         f"{tuple(shape)}, got {out.dtype} {out.shape}")
    return out


_ACT_CODES = {"none": (0, 0.0, 0.0), None: (0, 0.0, 0.0), "relu": (1, 0.0, float("inf")),
              "gelu": (3, 0.0, 0.0), "sigmoid": (4, 0.0, 0.0), "silu": (5, 0.0, 0.0)}


_PARSED_ACTS: dict = {}  # ("clip", lo, hi) and the like -> code triple: parsing took ~0.5 us a call


def _act(act):
    try:
        code = _ACT_CODES.get(act) or _PARSED_ACTS.get(act)
    except TypeError:  # unhashable: parsed below, and not kept
        code = None
    if code is not None:
        return code
    try:
        code = parse_act(act)
    except (ValueError, TypeError) as err:
        raise InputError(str(err)) from None
    if isinstance(act, tuple) and len(_PARSED_ACTS) < 256:
        try:
            _PARSED_ACTS[act] = code
        except TypeError:  # an unhashable element: parsed again next time
            pass
    return code


def _check_pw(pw):
    if not isinstance(pw, PackedWeight):
        raise EngineError(f"expected a PackedWeight (PackedWeight.pack(w)), got {type(pw).__name__}")


def gemm(pw, x, bias=None, act="none", residual=None, out=None):
    """``act(W @ x + bias[:, None] + residual)`` for x [K, N] -> [M, N]."""
    _check_pw(pw)
    m, k = pw.shape
    x = _f32(x, "gemm input")
    if x.ndim != 2 or x.shape[0] != k:
        raise InputError(f"gemm input has shape {x.shape}, expected [{k}, N] for weight {pw.shape}")
    shape = (m, x.shape[1])
    code, lo, hi = _act(act)
    y = _out(out, shape, "gemm")
    _core.gemm(pw._h, x, _vec(bias, m, "gemm bias"), code, lo, hi,
               _same(residual, shape, "gemm residual"), y)
    return y


def linear(pw, x, bias=None, act="none", out=None, *, residual=None):
    """``act(x @ W.T + bias + residual)`` for x [..., K] -> [..., M]; W packed as [out, in]."""
    _check_pw(pw)
    m, k = pw.shape
    x = _f32(x, "linear input")
    if x.ndim < 1 or x.shape[-1] != k:
        raise InputError(f"linear input has shape {x.shape}, expected [..., {k}] "
                         f"for weight {pw.shape}")
    shape = x.shape[:-1] + (m,)
    code, lo, hi = _act(act)
    y = _out(out, shape, "linear")
    res = _same(residual, shape, "linear residual")
    _core.linear(pw._h, x.reshape(-1, k), _vec(bias, m, "linear bias"), code, lo, hi,
                 None if res is None else res.reshape(-1, m), y.reshape(-1, m))
    return y


def _norm_args(ln, n: int):
    """(scale, bias, eps) for the core from an optional (scale, bias or None, epsilon)."""
    if ln is None:
        return None, None, 0.0
    scale, bias, eps = ln
    return _vec(scale, n, "layer norm scale"), _vec(bias, n, "layer norm bias"), float(eps)


def _layout(fm):
    """The core's layout bits from (input, residual, output) feature-major flags."""
    return int(bool(fm[0])) | 2 * int(bool(fm[1])) | 4 * int(bool(fm[2]))


def _features(lead, n, fm):
    """The shape of an activation with n features per token: [n, *lead] feature-major."""
    return (n,) + lead if fm else lead + (n,)


def linear_chain(pw1, pw2, x, bias1=None, act1="none", bias2=None, act2="none", out=None, *,
                 residual=None, ln=None, fm=(False, False, False)):
    """``linear(linear(x, pw1, bias1, act1), pw2, bias2, act2, residual=residual)`` in one call:
    the hidden activation stays inside the core in the layout the second layer reads.
    ``ln = (scale, bias, epsilon)`` layer-normalizes x's features first. ``fm`` says which of
    (x, residual, result) are feature-major: features on the first axis, [K, ...] instead of
    [..., K] (what a block hands the next one, so that neither transposes it)."""
    _check_pw(pw1)
    _check_pw(pw2)
    (m1, k1), (m2, k2) = pw1.shape, pw2.shape
    if k2 != m1:
        raise InputError(f"linear_chain: weight {pw2.shape} cannot take the {m1} outputs of "
                         f"weight {pw1.shape}")
    x = _f32(x, "linear_chain input")
    if x.ndim < 1 or x.shape[0 if fm[0] else -1] != k1:
        raise InputError(f"linear_chain input has shape {x.shape}, expected {k1} features "
                         f"for weight {pw1.shape}")
    lead = x.shape[1:] if fm[0] else x.shape[:-1]
    shape = _features(lead, m2, fm[2])
    c1, lo1, hi1 = _act(act1)
    c2, lo2, hi2 = _act(act2)
    y = _out(out, shape, "linear_chain")
    res = _same(residual, _features(lead, m2, fm[1]), "linear_chain residual")
    _core.linear_chain(pw1._h, _vec(bias1, m1, "linear_chain first bias"), c1, lo1, hi1,
                       pw2._h, _vec(bias2, m2, "linear_chain second bias"), c2, lo2, hi2,
                       x.reshape((k1, -1) if fm[0] else (-1, k1)), *_norm_args(ln, k1),
                       None if res is None else res.reshape(-1), _layout(fm),
                       y.reshape((m2, -1) if fm[2] else (-1, m2)))
    return y


def _nchw(x, what: str) -> np.ndarray:
    x = _f32(x, what)
    if x.ndim != 4:
        raise InputError(f"{what} must be NCHW (rank 4), got shape {x.shape}")
    return x


def _pair(v, name: str, n: int = 2) -> tuple[int, ...]:
    try:
        if n == 2:
            a, b = v
            return int(a), int(b)
        t, l, b, r = v
        return int(t), int(l), int(b), int(r)
    except (TypeError, ValueError):
        raise InputError(f"{name} needs {n} integers, got {v!r}") from None


def _conv_geometry(pw, xshape, kernel_shape, strides, pads, dilations, group):
    """Validated integer arguments and output shape of one conv call (cached per input shape)."""
    kh, kw = _pair(kernel_shape, "kernel_shape")
    sh, sw = _pair(strides, "strides")
    dh, dw = _pair(dilations, "dilations")
    pt, pl, pb, pr = _pair(pads, "pads", 4)
    n, c, h, w = xshape
    m, kk = pw.shape
    group = int(group)
    if group < 1 or c % group or m % group or kk != (c // group) * kh * kw:
        raise InputError(f"conv input has {c} channels; weight {pw.shape} does not fit "
                         f"group={group}, kernel {kh}x{kw} (expected K = C/group*kh*kw)")
    shape = (n, m, conv_out_size(h, kh, sh, pt, pb, dh), conv_out_size(w, kw, sw, pl, pr, dw))
    return (kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, group), shape


def conv2d(pw, x, kernel_shape, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1,
           bias=None, act="none", residual=None, out=None):
    """ONNX Conv on NCHW; pw holds the weight as [M, C/group * kh * kw]."""
    _check_pw(pw)
    x = _nchw(x, "conv input")
    # an engine calls each layer with the same arguments every run: validate once per shape
    try:
        key = (x.shape, tuple(kernel_shape), tuple(strides), tuple(pads), tuple(dilations), group)
        geom = pw._conv_cache.get(key)
    except TypeError:
        key, geom = None, None
    if geom is None:
        geom = _conv_geometry(pw, x.shape, kernel_shape, strides, pads, dilations, group)
        if key is not None and len(pw._conv_cache) < 64:
            pw._conv_cache[key] = geom
    args, shape = geom
    code, lo, hi = _act(act)
    y = _out(out, shape, "conv2d")
    _core.conv2d(pw._h, x, *args, _vec(bias, shape[1], "conv bias"), code, lo, hi,
                 _same(residual, shape, "conv residual"), y)
    return y


def bind_conv2d(pw, kernel_shape, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1,
                bias=None, act="none"):
    """``conv2d`` with everything but the input (and residual / out) fixed: a callable
    ``f(x, residual=None, out=None)`` that validates the arguments once per input shape and then
    goes straight to the core (an engine calls each layer the same way on every run, and the
    general entry point's checks cost more than a small layer's kernel)."""
    _check_pw(pw)
    code, lo, hi = _act(act)
    known: dict = {}
    handle = pw._h

    def run(x, residual=None, out=None):
        fixed = None
        if type(x) is np.ndarray and x.dtype == np.float32 and x.flags.c_contiguous:
            fixed = known.get(x.shape)
        if fixed is None:
            x = _nchw(x, "conv input")
            args, shape = _conv_geometry(pw, x.shape, kernel_shape, strides, pads, dilations, group)
            fixed = (args + (_vec(bias, shape[1], "conv bias"), code, lo, hi), shape)
            if len(known) < 64:
                known[x.shape] = fixed
        head, shape = fixed
        y = np.empty(shape, np.float32) if out is None else _out(out, shape, "conv2d")
        if residual is not None and not (type(residual) is np.ndarray and residual.shape == shape
                                         and residual.dtype == np.float32
                                         and residual.flags.c_contiguous):
            residual = _same(residual, shape, "conv residual")
        _core.conv2d(handle, x, *head, residual, y)
        return y
    return run


def conv2d_maxpool(pw, x, kernel_shape, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                   group=1, bias=None, act="none", out=None):
    """``conv2d`` followed by a 3x3 stride-2 MaxPool with pads 1 (ResNet's stem), in one call:
    a dense conv that runs rowwise pools rows as it makes them, never writing its own output."""
    _check_pw(pw)
    x = _nchw(x, "conv input")
    args, shape = _conv_geometry(pw, x.shape, kernel_shape, strides, pads, dilations, group)
    pooled = (shape[0], shape[1], (shape[2] - 1) // 2 + 1, (shape[3] - 1) // 2 + 1)
    code, lo, hi = _act(act)
    y = _out(out, pooled, "conv2d_maxpool")
    _core.conv2d_maxpool(pw._h, x, *args, _vec(bias, shape[1], "conv bias"), code, lo, hi, y)
    return y


def _depthwise_geometry(w, n, c, h, wd, strides, pads, dilations):
    """The checked float32 weight [c, 1, kh, kw], (sh, sw, pt, pl, pb, pr, dh, dw) and the output
    shape of a depthwise conv over [n, c, h, wd]."""
    w = _f32(w, "depthwise weight")
    if w.ndim != 4 or w.shape[0] != c or w.shape[1] != 1:
        raise InputError(f"depthwise weight has shape {w.shape}, expected [{c}, 1, kh, kw]")
    kh, kw = w.shape[2:]
    sh, sw = _pair(strides, "strides")
    dh, dw = _pair(dilations, "dilations")
    pt, pl, pb, pr = _pair(pads, "pads", 4)
    shape = (n, c, conv_out_size(h, kh, sh, pt, pb, dh), conv_out_size(wd, kw, sw, pl, pr, dw))
    return w, (sh, sw, pt, pl, pb, pr, dh, dw), shape


def depthwise_conv2d(w, x, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), bias=None,
                     act="none", out=None):
    """Depthwise Conv (group == C, one filter per channel); w is [C, 1, kh, kw]."""
    x = _nchw(x, "depthwise conv input")
    n, c, h, wd = x.shape
    w, geom, shape = _depthwise_geometry(w, n, c, h, wd, strides, pads, dilations)
    code, lo, hi = _act(act)
    y = _out(out, shape, "depthwise_conv2d")
    _core.depthwise_conv2d(w, x, *geom, _vec(bias, c, "depthwise bias"), code, lo, hi, y)
    return y


def conv1x1_depthwise(pw, x, bias1=None, act1="none", wd=None, strides=(1, 1), pads=(0, 0, 0, 0),
                      dilations=(1, 1), bias2=None, act2="none", out=None):
    """``depthwise_conv2d(wd, conv2d(pw, x, (1, 1), bias=bias1, act=act1), ...)`` in one call: a
    1x1 conv (stride 1, no pads; pw is [M, C]) and a depthwise conv (wd is [M, 1, kh, kw]) on its
    output, run in bands of output rows so that the 1x1's output (MobileNet's expanded
    activations) stays in cache and never goes to memory."""
    _check_pw(pw)
    x = _nchw(x, "conv1x1_depthwise input")
    n, c, h, w = x.shape
    m, k = pw.shape
    if k != c:
        raise InputError(f"conv1x1_depthwise input has {c} channels; the 1x1 weight {pw.shape} needs {k}")
    wd, geom, shape = _depthwise_geometry(wd, n, m, h, w, strides, pads, dilations)
    code1, lo1, hi1 = _act(act1)
    code2, lo2, hi2 = _act(act2)
    y = _out(out, shape, "conv1x1_depthwise")
    _core.conv1x1_depthwise(pw._h, x, _vec(bias1, m, "1x1 bias"), code1, lo1, hi1, wd, *geom,
                            _vec(bias2, m, "depthwise bias"), code2, lo2, hi2, y)
    return y


def depthwise_per_plane(channels, out_hw, strides=(1, 1)) -> bool:
    """Whether ``depthwise_conv2d`` runs this output shape plane by plane (the path
    ``conv1x1_depthwise`` uses), rather than on channel vectors (small planes)."""
    sh, sw = _pair(strides, "strides")
    return bool(_core.depthwise_per_plane(int(channels), int(out_hw[0]), int(out_hw[1]), sh, sw))


def max_pool2d(x, kernel_shape, strides=None, pads=(0, 0, 0, 0), dilations=(1, 1), ceil_mode=0,
               out=None):
    x = _nchw(x, "max pool input")
    kh, kw = _pair(kernel_shape, "kernel_shape")
    sh, sw = _pair(strides or (1, 1), "strides")
    dh, dw = _pair(dilations, "dilations")
    pt, pl, pb, pr = _pair(pads, "pads", 4)
    n, c, h, w = x.shape
    shape = (n, c, conv_out_size(h, kh, sh, pt, pb, dh, ceil_mode),
             conv_out_size(w, kw, sw, pl, pr, dw, ceil_mode))
    y = _out(out, shape, "max_pool2d")
    _core.max_pool2d(x, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, y)
    return y


def avg_pool2d(x, kernel_shape, strides=None, pads=(0, 0, 0, 0), ceil_mode=0,
               count_include_pad=0, out=None):
    x = _nchw(x, "average pool input")
    kh, kw = _pair(kernel_shape, "kernel_shape")
    sh, sw = _pair(strides or (1, 1), "strides")
    pt, pl, pb, pr = _pair(pads, "pads", 4)
    n, c, h, w = x.shape
    shape = (n, c, conv_out_size(h, kh, sh, pt, pb, 1, ceil_mode),
             conv_out_size(w, kw, sw, pl, pr, 1, ceil_mode))
    y = _out(out, shape, "avg_pool2d")
    _core.avg_pool2d(x, kh, kw, sh, sw, pt, pl, pb, pr, int(bool(count_include_pad)), y)
    return y


def global_avg_pool(x, out=None):
    x = _nchw(x, "global average pool input")
    y = _out(out, x.shape[:2] + (1, 1), "global_avg_pool")
    _core.global_avg_pool(x, y)
    return y


def add_act(a, b, act="none", out=None):
    """Fused elementwise ``act(a + b)``; b must have a's shape (or broadcast to it)."""
    a = _f32(a, "add input")
    b = _same(b, a.shape, "add operand")
    code, lo, hi = _act(act)
    y = _out(out, a.shape, "add_act")
    _core.add_act(a, b, code, lo, hi, y)
    return y


def activation(x, act, out=None):
    """Elementwise ``act(x)`` (any activation the epilogues take, see reference.parse_act);
    ``out`` may be ``x``."""
    x = _f32(x, "activation input")
    code, lo, hi = _act(act)
    y = _out(out, x.shape, "activation")
    _core.activation(x, code, lo, hi, y)
    return y


def channel_affine(x, scale, shift=None, act="none", out=None):
    """``act(x * scale + shift)`` with one scale (and shift) per channel of ``x`` [N, C, ...]
    (an inference BatchNormalization with its activation), or per plane, N * C values (a
    squeeze-and-excitation gate, [N, C, 1, 1]); ``shift`` may be None; ``out`` may be ``x``."""
    x = _f32(x, "channel_affine input")
    if x.ndim < 2:
        raise InputError(f"channel_affine input must be [N, C, ...], got shape {x.shape}")
    n, c = x.shape[0], x.shape[1]
    scale = _f32(scale, "channel_affine scale")
    if scale.size not in (c, n * c):
        raise InputError(f"channel_affine scale has {scale.size} values, expected {c} (per "
                         f"channel) or {n * c} (per plane)")
    shift = _vec(shift, scale.size, "channel_affine shift")
    code, lo, hi = _act(act)
    y = _out(out, x.shape, "channel_affine")
    _core.channel_affine(x, scale, shift, code, lo, hi, y)
    return y


def softmax(x, out=None):
    """Softmax over the last axis; ``out`` may be ``x`` (computed in place)."""
    x = _f32(x, "softmax input")
    y = _out(out, x.shape, "softmax")
    if x.ndim == 0:
        raise InputError("softmax input must have at least one axis")
    _core.softmax(x, y)
    return y


def layer_norm(x, scale, bias=None, epsilon=1e-5, out=None):
    """LayerNormalization over the last axis: ``(x - mean) / sqrt(var + eps) * scale + bias``."""
    x = _f32(x, "layer_norm input")
    if x.ndim == 0:
        raise InputError("layer_norm input must have at least one axis")
    n = x.shape[-1]
    y = _out(out, x.shape, "layer_norm")
    _core.layer_norm(x, _vec(scale, n, "layer_norm scale"), _vec(bias, n, "layer_norm bias"),
                     float(epsilon), y)
    return y


def batched_matmul(a, x, out=None):
    """``a @ x`` for a [..., M, K] and x [..., K, N] with equal leading dimensions (both operands
    are activations, e.g. attention scores and context)."""
    a = _f32(a, "batched_matmul left operand")
    x = _f32(x, "batched_matmul right operand")
    if a.ndim < 2 or x.ndim < 2 or a.shape[:-2] != x.shape[:-2] or a.shape[-1] != x.shape[-2]:
        raise InputError(f"batched_matmul needs [..., M, K] and [..., K, N] with the same leading "
                         f"dimensions, got {a.shape} and {x.shape}")
    shape = a.shape[:-1] + x.shape[-1:]
    y = _out(out, shape, "batched_matmul")
    m, k, n = a.shape[-2], a.shape[-1], x.shape[-1]
    batch = math.prod(a.shape[:-2])
    _core.batched_matmul(a.reshape(batch, m, k), x.reshape(batch, k, n), y.reshape(batch, m, n))
    return y


def attention(q, k, v, heads, scale=1.0, mask=None, out=None):
    """Scaled dot-product attention on token-major activations.

    q is [B, Sq, H*D], k and v [B, Sk, H*D] (the Q/K/V projections' outputs, heads side by side);
    returns [B, Sq, H*D] = softmax(scale * Q K^T + mask) V per head, heads side by side again.
    ``mask`` broadcasts to [B, H, Sq, Sk] (e.g. BERT's padding mask [B, 1, 1, Sk]).
    """
    q = _f32(q, "attention query")
    k = _f32(k, "attention key")
    v = _f32(v, "attention value")
    heads = int(heads)
    if q.ndim != 3 or k.ndim != 3 or v.shape != k.shape or q.shape[0] != k.shape[0] \
            or q.shape[2] != k.shape[2] or heads < 1 or q.shape[2] % heads:
        raise InputError(f"attention needs q [B, Sq, H*D] and k, v [B, Sk, H*D] with H = {heads} "
                         f"dividing the last axis, got {q.shape}, {k.shape}, {v.shape}")
    b, sq, hd = q.shape
    sk = k.shape[1]
    y = _out(out, q.shape, "attention")
    mask, strides = _mask_strides(mask, (b, heads, sq, sk))
    _core.attention(q, k, v, heads, float(scale), mask, *strides, y)
    return y


def _mask_strides(mask, full):
    """An attention mask as float32 with rows along keys, and its element strides over
    (batch, head, query): 0 on a broadcast axis, so the kernel never materializes it."""
    if mask is None:
        return None, (0, 0, 0)
    m = _f32(mask, "attention mask")
    if m.ndim > 4 or not _broadcastable(m.shape, full):
        raise InputError(f"attention mask has shape {m.shape}, which does not broadcast to "
                         f"[B, H, Sq, Sk] = {list(full)}")
    m = m.reshape((1,) * (4 - m.ndim) + m.shape)
    if m.shape[3] != full[3]:
        m = np.ascontiguousarray(np.broadcast_to(m, m.shape[:3] + (full[3],)))
    return m, tuple(0 if m.shape[i] == 1 else m.strides[i] // 4 for i in range(3))


def attention_block(x, qkv, o, heads, scale=1.0, mask=None, act="none", out=None, *,
                    residual=None, ln=None, fm=(False, False, False)):
    """A self-attention sublayer in one call, for x [B, S, K]:
    ``linear(attention(q, k, v, heads, scale, mask), *o, act, residual=residual)`` where
    ``[q | k | v] = linear(x, *qkv)``. ``qkv`` is (PackedWeight [3*H*D, K] holding the Q, K and
    V projections stacked, bias [3*H*D] or None), ``o`` (PackedWeight [M, H*D], bias or None).
    Between the projections nothing leaves the core. ``ln = (scale, bias, epsilon)``
    layer-normalizes x's features first; ``fm`` as in linear_chain (feature-major [K, B, S])."""
    x = _f32(x, "attention_block input")
    _check_pw(qkv[0])
    _check_pw(o[0])
    (m3, k), hd = qkv[0].shape, qkv[0].shape[0] // 3
    if x.ndim != 3 or k != x.shape[0 if fm[0] else -1] or m3 % 3 or o[0].shape[1] != hd \
            or int(heads) < 1 or hd % int(heads):
        raise InputError(f"attention_block needs x [B, S, K], a stacked Q/K/V weight [3*H*D, K] "
                         f"with H = {heads} dividing H*D, and an output weight [M, H*D]; got x "
                         f"{x.shape}, weights {qkv[0].shape} and {o[0].shape}")
    b, s = x.shape[1:] if fm[0] else x.shape[:2]
    m = o[0].shape[0]
    mask, strides = _mask_strides(mask, (b, int(heads), s, s))
    code, lo, hi = _act(act)
    y = _out(out, _features((b, s), m, fm[2]), "attention_block")
    res = _same(residual, _features((b, s), m, fm[1]), "attention_block residual")
    _core.attention_block(x, *_norm_args(ln, k), qkv[0]._h, _vec(qkv[1], m3, "projection bias"),
                          int(heads), float(scale), mask, *strides, o[0]._h,
                          _vec(o[1], m, "output bias"), code, lo, hi, res, _layout(fm), y)
    return y


def retain_freed_memory() -> bool:
    """Make glibc keep freed blocks up to 32 MiB on the heap for reuse (process-wide).

    By default glibc hands large freed blocks back to the OS, so every run's fresh activation
    arrays page-fault in again (about 30% of a BERT-base run on a busy 2-core machine). The
    Engine calls this once; returns False where the C library is not glibc (nothing changes).
    """
    return bool(_core.retain_freed_memory())


def set_num_threads(n: int) -> None:
    if int(n) <= 0:
        raise InputError(f"threads must be a positive integer, got {n}")
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    return _core.get_num_threads()


def isa() -> str:
    """The instruction set the core picked at import ("avx512", "avx2" or "portable")."""
    return _core.isa()
