"""NumPy twins of every kernel in ``sparsify.engine.kernels``: same names, same signatures.

They define what the C++ core must compute and are what the kernel tests compare against. They
favour obviousness over speed (float64 accumulation, explicit padding), so a disagreement points
at the core. Layouts follow ONNX: NCHW activations, ``pads = (top, left, bottom, right)``.
"""

from __future__ import annotations

import math

import numpy as np

from sparsify.errors import InputError

_ACTS = ("none", "relu", "gelu")
_erf = np.frompyfunc(math.erf, 1, 1)


def parse_act(act) -> tuple[int, float, float]:
    """An activation -> (code, lo, hi), the core's encoding:

    ``"none"`` 0, ``"relu"`` 1, ``("clip", lo, hi)`` 2, ``"gelu"`` 3 (exact erf form, as ONNX
    Gelu and torch.nn.GELU()), ``"sigmoid"`` 4, ``"silu"`` 5 (x * sigmoid(x)),
    ``("hardsigmoid", alpha, beta)`` 6 (clip(alpha * x + beta, 0, 1)) and
    ``("hardswish", alpha, beta)`` 7 (x times that; ONNX HardSwish is alpha 1/6, beta 1/2).
    """
    if act is None or (isinstance(act, str) and act == "none"):
        return 0, -math.inf, math.inf
    named = {"relu": (1, 0.0, math.inf), "gelu": (3, -math.inf, math.inf),
             "sigmoid": (4, -math.inf, math.inf), "silu": (5, -math.inf, math.inf),
             "hardswish": (7, 1.0 / 6.0, 0.5)}
    if isinstance(act, str) and act in named:
        return named[act]
    if isinstance(act, (tuple, list)) and len(act) == 3 and act[0] == "clip":
        lo = -math.inf if act[1] is None else float(act[1])
        hi = math.inf if act[2] is None else float(act[2])
        return 2, lo, hi
    if isinstance(act, (tuple, list)) and len(act) == 3 and act[0] in ("hardsigmoid", "hardswish"):
        return (6 if act[0] == "hardsigmoid" else 7), float(act[1]), float(act[2])
    raise ValueError(f"act must be 'none', 'relu', 'gelu', 'sigmoid', 'silu', 'hardswish', "
                     f"('clip', lo, hi), ('hardsigmoid', alpha, beta) or "
                     f"('hardswish', alpha, beta), got {act!r}")


def apply_act(y: np.ndarray, act) -> np.ndarray:
    code, lo, hi = parse_act(act)
    if code == 1:
        return np.maximum(y, 0.0)
    if code == 2:
        return np.clip(y, lo, hi)
    if code == 3:
        return gelu(y)
    if code in (4, 5):
        y64 = np.asarray(y, np.float64)
        with np.errstate(over="ignore"):
            s = 1.0 / (1.0 + np.exp(-y64))
        return (y64 * s if code == 5 else s).astype(np.asarray(y).dtype)
    if code in (6, 7):
        h = np.clip(lo * np.asarray(y, np.float64) + hi, 0.0, 1.0)
        return (y * h if code == 7 else h).astype(np.asarray(y).dtype)
    return y


def gelu(x) -> np.ndarray:
    """x * Phi(x) with math.erf in float64 (slow, exact)."""
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def weight_matrix(pw) -> np.ndarray:
    """The dense [M, K] matrix behind a PackedWeight (or an ndarray passed as is)."""
    if isinstance(pw, np.ndarray):
        return pw.astype(np.float32)
    return np.asarray(pw.to_dense(), dtype=np.float32)


def conv_out_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int,
                  dilation: int = 1, ceil_mode: int = 0) -> int:
    """ONNX output length along one axis; with ceil_mode a window starting in the end padding
    is dropped (the rule onnxruntime and PyTorch share)."""
    if stride <= 0 or dilation <= 0 or kernel <= 0:
        raise InputError(f"kernel {kernel}, stride {stride} and dilation {dilation} must be "
                         "positive")
    span = size + pad_begin + pad_end - dilation * (kernel - 1) - 1
    if span < 0:
        if size > 0:  # onnxruntime rejects this too
            raise InputError(f"the window (kernel {kernel}, dilation {dilation}) is larger than "
                             f"the padded input ({size} + pads {pad_begin} and {pad_end})")
        return 0
    if ceil_mode:
        out = -(-span // stride) + 1
        if (out - 1) * stride >= size + pad_begin:
            out -= 1
        return out
    return span // stride + 1


def _epilogue(y, bias, act, residual):
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape((-1,) + (1,) * (y.ndim - 1))
    if residual is not None:
        y = y + np.asarray(residual, np.float64)
    return apply_act(y, act).astype(np.float32)


def gemm(pw, x, bias=None, act="none", residual=None, out=None):
    """``act(W @ x + bias[:, None] + residual)`` for x [K, N] -> [M, N]."""
    w = weight_matrix(pw).astype(np.float64)
    y = _epilogue(w @ np.asarray(x, np.float64), bias, act, residual)
    if out is not None:
        out[...] = y
        return out
    return y


def linear(pw, x, bias=None, act="none", out=None, *, residual=None):
    """``act(x @ W.T + bias + residual)`` for x [..., K] -> [..., M] (W packed as [out, in])."""
    w = weight_matrix(pw).astype(np.float64)
    y = np.asarray(x, np.float64) @ w.T
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    if residual is not None:
        y = y + np.asarray(residual, np.float64)
    y = apply_act(y, act).astype(np.float32)
    if out is not None:
        out[...] = y
        return out
    return y


def _token_major(a, fm):
    return a if a is None or not fm else np.moveaxis(a, 0, -1)


def _finish(y, fm, out):
    y = np.ascontiguousarray(np.moveaxis(y, -1, 0)) if fm else y
    if out is not None:
        out[...] = y
        return out
    return y


def linear_chain(pw1, pw2, x, bias1=None, act1="none", bias2=None, act2="none", out=None, *,
                 residual=None, ln=None, fm=(False, False, False)):
    """Two linear layers: ``linear(linear(x, pw1, bias1, act1), pw2, bias2, act2, residual)``,
    after ``layer_norm(x, *ln)`` when ln is given; fm flags feature-major (x, residual, result)."""
    x, residual = _token_major(x, fm[0]), _token_major(residual, fm[1])
    if ln is not None:
        x = layer_norm(x, *ln)
    h = linear(pw1, x, bias1, act1)
    return _finish(linear(pw2, h, bias2, act2, residual=residual), fm[2], out)


def _patches(x, kernel_shape, strides, pads, dilations, pad_value=0.0, ceil_mode=0):
    """x [N, C, H, W] -> windows [N, C, kh, kw, OH, OW] (padding filled with pad_value)."""
    n, c, h, w = x.shape
    kh, kw = kernel_shape
    sh, sw = strides
    dh, dw = dilations
    pt, pl, pb, pr = pads
    oh = conv_out_size(h, kh, sh, pt, pb, dh, ceil_mode)
    ow = conv_out_size(w, kw, sw, pl, pr, dw, ceil_mode)
    # extra end padding so every (possibly ceil_mode) window slice is in range
    need_h = (oh - 1) * sh + dh * (kh - 1) + 1 if oh > 0 else 0
    need_w = (ow - 1) * sw + dw * (kw - 1) + 1 if ow > 0 else 0
    eb = max(need_h - (h + pt), pb, 0)
    er = max(need_w - (w + pl), pr, 0)
    xp = np.full((n, c, h + pt + eb, w + pl + er), pad_value, dtype=np.float64)
    xp[:, :, pt:pt + h, pl:pl + w] = x
    cols = np.empty((n, c, kh, kw, oh, ow), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dh, j * dw
            cols[:, :, i, j] = xp[:, :, r0:r0 + sh * (oh - 1) + 1:sh, c0:c0 + sw * (ow - 1) + 1:sw]
    return cols, oh, ow


def conv2d(pw, x, kernel_shape, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1,
           bias=None, act="none", residual=None, out=None):
    """ONNX Conv on NCHW; pw holds the weight as [M, C/group * kh * kw]."""
    x = np.asarray(x, np.float64)
    n, c = x.shape[:2]
    w = weight_matrix(pw).astype(np.float64)
    m = w.shape[0]
    cols, oh, ow = _patches(x, kernel_shape, strides, pads, dilations)
    cg, mg = c // group, m // group
    y = np.empty((n, m, oh, ow), dtype=np.float64)
    for g in range(group):
        cg_cols = cols[:, g * cg:(g + 1) * cg].reshape(n, -1, oh * ow)
        y[:, g * mg:(g + 1) * mg] = (w[g * mg:(g + 1) * mg] @ cg_cols).reshape(n, mg, oh, ow)
    y = _epilogue(y.transpose(1, 0, 2, 3), bias, act,
                  None if residual is None else np.asarray(residual).transpose(1, 0, 2, 3))
    y = np.ascontiguousarray(y.transpose(1, 0, 2, 3))
    if out is not None:
        out[...] = y
        return out
    return y


def depthwise_conv2d(w, x, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), bias=None,
                     act="none", out=None):
    """Depthwise Conv (group == C, one filter per channel); w is [C, 1, kh, kw]."""
    w = np.asarray(w, np.float32)
    c, _, kh, kw = w.shape
    return conv2d(w.reshape(c, kh * kw), x, (kh, kw), strides, pads, dilations, c, bias, act,
                  None, out)


def conv1x1_depthwise(pw, x, bias1=None, act1="none", wd=None, strides=(1, 1), pads=(0, 0, 0, 0),
                      dilations=(1, 1), bias2=None, act2="none", out=None):
    """A 1x1 conv, then a depthwise conv on its output (the core runs them in bands)."""
    e = conv2d(pw, x, (1, 1), bias=bias1, act=act1).astype(np.float32)
    return depthwise_conv2d(wd, e, strides, pads, dilations, bias2, act2, out)


def max_pool2d(x, kernel_shape, strides=None, pads=(0, 0, 0, 0), dilations=(1, 1), ceil_mode=0,
               out=None):
    strides = strides or (1, 1)
    cols, _, _ = _patches(np.asarray(x, np.float64), kernel_shape, strides, pads, dilations,
                          -np.inf, ceil_mode)
    y = cols.max(axis=(2, 3)).astype(np.float32)
    if out is not None:
        out[...] = y
        return out
    return y


def avg_pool2d(x, kernel_shape, strides=None, pads=(0, 0, 0, 0), ceil_mode=0,
               count_include_pad=0, out=None):
    """Average pool; with count_include_pad the divisor counts padding but never the extra
    cells a ceil_mode window reaches beyond the end padding (onnxruntime's rule)."""
    strides = strides or (1, 1)
    x = np.asarray(x, np.float64)
    h, w = x.shape[2:]
    cols, oh, ow = _patches(x, kernel_shape, strides, pads, (1, 1), 0.0, ceil_mode)
    sums = cols.sum(axis=(2, 3))
    kh, kw = kernel_shape
    pt, pl, pb, pr = pads

    def counts(size, k, s, p0, p1, o):
        start = np.arange(o) * s - p0
        if count_include_pad:
            return np.minimum(start + k, size + p1) - start
        return np.minimum(start + k, size) - np.maximum(start, 0)

    ch = counts(h, kh, strides[0], pt, pb, oh)
    cw = counts(w, kw, strides[1], pl, pr, ow)
    y = (sums / np.outer(ch, cw)).astype(np.float32)
    if out is not None:
        out[...] = y
        return out
    return y


def global_avg_pool(x, out=None):
    y = np.asarray(x, np.float64).mean(axis=(2, 3), keepdims=True).astype(np.float32)
    if out is not None:
        out[...] = y
        return out
    return y


def add_act(a, b, act="none", out=None):
    """Fused elementwise ``act(a + b)`` for same-shaped arrays."""
    y = apply_act(np.asarray(a, np.float64) + np.asarray(b, np.float64), act).astype(np.float32)
    if out is not None:
        out[...] = y
        return out
    return y


def softmax(x, out=None):
    """Softmax over the last axis."""
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True)) if x.size else x
    y = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32) if x.size else x.astype(np.float32)
    if out is not None:
        out[...] = y
        return out
    return y


def layer_norm(x, scale, bias=None, epsilon=1e-5, out=None):
    """LayerNormalization over the last axis: (x - mean) / sqrt(var + eps) * scale + bias."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + epsilon) * np.asarray(scale, np.float64).reshape(-1)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(-1)
    y = y.astype(np.float32)
    if out is not None:
        out[...] = y
        return out
    return y


def batched_matmul(a, x, out=None):
    """``a @ x`` for a [..., M, K] and x [..., K, N] with equal leading dimensions."""
    y = (np.asarray(a, np.float64) @ np.asarray(x, np.float64)).astype(np.float32)
    if out is not None:
        out[...] = y
        return out
    return y


def attention(q, k, v, heads, scale=1.0, mask=None, out=None):
    """softmax(scale * Q K^T + mask) V per head for q [B, Sq, H*D], k and v [B, Sk, H*D]."""
    b, sq, hd = q.shape
    d = hd // heads

    def split(x):
        return np.asarray(x, np.float64).reshape(b, x.shape[1], heads, d).transpose(0, 2, 1, 3)

    s = split(q) @ split(k).transpose(0, 1, 3, 2) * scale
    if mask is not None:
        s = s + np.asarray(mask, np.float64)
    s = np.exp(s - s.max(axis=-1, keepdims=True))
    s /= s.sum(axis=-1, keepdims=True)
    y = (s @ split(v)).transpose(0, 2, 1, 3).reshape(b, sq, hd).astype(np.float32)
    if out is not None:
        out[...] = y
        return out
    return y


def attention_block(x, qkv, o, heads, scale=1.0, mask=None, act="none", out=None, *,
                    residual=None, ln=None, fm=(False, False, False)):
    """Stacked Q/K/V projection, attention and output projection; qkv and o are (weight, bias)."""
    x, residual = _token_major(x, fm[0]), _token_major(residual, fm[1])
    if ln is not None:
        x = layer_norm(x, *ln)
    q, k, v = np.split(linear(qkv[0], x, qkv[1]), 3, axis=-1)
    y = linear(o[0], attention(q, k, v, heads, scale, mask), o[1], act, residual=residual)
    return _finish(y, fm[2], out)


def retain_freed_memory() -> bool:
    """No allocator to tune for NumPy's twins."""
    return False


_threads = 1


def set_num_threads(n: int) -> None:
    global _threads
    _threads = int(n)


def get_num_threads() -> int:
    return _threads


def isa() -> str:
    return "reference"
