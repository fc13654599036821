"""ONNX neural-network ops: convolution, GEMM, pooling, normalization, activations, (de)quantization.

Conv, Gemm, MatMul and the pools call the C++ core through ``kernels``; the rest is NumPy.
These functions serve graphs whose weights are not constants (the plan binds constant-weight
Conv/Gemm/MatMul to packed weights at load, see plan.py) and the one-node conformance tests.
"""

from __future__ import annotations

import math

import numpy as np

from sparsify.engine import kernels
from sparsify.errors import EngineError, InputError


# ---------------------------------------------------------------- geometry helpers
def conv_geometry(in_spatial, kernel_shape, strides=None, pads=None, dilations=None, auto_pad="NOTSET"):
    """Resolve ONNX conv/pool attributes to (kernel, strides, pads[2*n] in ONNX order, dilations)."""
    n = len(kernel_shape)
    strides = tuple(strides) if strides else (1,) * n
    dilations = tuple(dilations) if dilations else (1,) * n
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(in_spatial, kernel_shape, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(large if auto_pad == "SAME_UPPER" else small)
        pads = tuple(begins + ends)
    elif auto_pad == "VALID" or not pads:
        pads = (0,) * (2 * n)
    return tuple(int(k) for k in kernel_shape), strides, tuple(int(p) for p in pads), dilations


def as_2d(x, kernel, strides, pads, dilations):
    """Lift a 1-D conv/pool problem to 2-D (H = 1) so that the 2-D kernels serve it."""
    return (x[:, :, None, :], (1,) + kernel, (1,) + strides, (0, pads[0], 0, pads[1]), (1,) + dilations)


def _f32(x):
    # the kernels are float32; other types (float64, uint8 pooling) round-trip through it
    return x if x.dtype == np.float32 else x.astype(np.float32)


# ---------------------------------------------------------------- conv / gemm / matmul
def Conv(X, W, B=None, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
    kernel_shape = kernel_shape or W.shape[2:]
    k, s, p, d = conv_geometry(X.shape[2:], kernel_shape, strides, pads, dilations, auto_pad)
    one_d = X.ndim == 3
    if one_d:
        X, k, s, p, d = as_2d(X, k, s, p, d)
        W = W[:, :, None, :]
    if X.ndim != 4:
        raise EngineError(f"Conv on {X.ndim - 2}-D inputs is not supported (1-D and 2-D are)")
    bias = None if B is None else np.ascontiguousarray(B, dtype=np.float32)
    if group == X.shape[1] == W.shape[0] and W.shape[1] == 1:
        y = kernels.depthwise_conv2d(np.ascontiguousarray(W, np.float32), _f32(X), s, p, d, bias)
    else:
        pw = kernels.PackedWeight.pack(np.ascontiguousarray(W.reshape(W.shape[0], -1), np.float32), kind="dense")
        y = kernels.conv2d(pw, _f32(X), k, s, p, d, group, bias)
    y = y.astype(X.dtype, copy=False)
    return y[:, :, 0, :] if one_d else y


def matmul(A, B):
    """``A @ B`` with numpy's broadcasting, on the core's dense GEMM for float32 matrices.

    Going through the core keeps one thread pool busy: numpy's BLAS threads and the core's
    OpenMP threads spin against each other on a small machine (measured: 300 ms instead of
    0.3 ms for BERT's attention scores on 2 cores).
    """
    if A.dtype != B.dtype:  # ONNX types both inputs alike; NumPy would promote silently
        raise InputError(f"the two inputs have types {A.dtype} and {B.dtype}; ONNX's MatMul and "
                         "Gemm take one type (insert a Cast)")
    if A.dtype != np.float32 or A.ndim < 2 or B.ndim < 2 or not A.size or not B.size:
        return np.matmul(A, B)
    batch = np.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    (m, _), n = A.shape[-2:], B.shape[-1]
    out = np.empty(batch + (m, n), np.float32)
    if not batch:
        return kernels.gemm(kernels.PackedWeight.pack(A, kind="dense"), B, out=out)
    # one core call for the whole batch (attention: [B, H, S, D] x [B, H, D, S]); a broadcast
    # operand is materialized, a small copy next to the products
    a = np.ascontiguousarray(np.broadcast_to(A, batch + A.shape[-2:]))
    b = np.ascontiguousarray(np.broadcast_to(B, batch + B.shape[-2:]))
    return kernels.batched_matmul(a, b, out=out)


def Gemm(A, B, C=None, alpha=1.0, beta=1.0, transA=0, transB=0):
    if A.ndim != 2 or B.ndim != 2:
        raise InputError(f"Gemm takes two matrices, got A of shape {list(A.shape)} and B of shape "
                         f"{list(B.shape)}; use MatMul for other ranks")
    y = matmul(A.T if transA else A, B.T if transB else B)
    if alpha != 1.0:
        y *= np.asarray(alpha, y.dtype)
    if C is not None:
        y += C * np.asarray(beta, y.dtype) if beta != 1.0 else C
    return y


def MatMul(A, B):
    return matmul(A, B)


# ---------------------------------------------------------------- pooling
def _pool(kind, X, auto_pad, ceil_mode, dilations, kernel_shape, pads, strides, count_include_pad=0):
    k, s, p, d = conv_geometry(X.shape[2:], kernel_shape, strides, pads, dilations, auto_pad)
    one_d = X.ndim == 3
    if one_d:
        X, k, s, p, d = as_2d(X, k, s, p, d)
    if X.ndim != 4:
        raise EngineError(f"{kind} on {X.ndim - 2}-D inputs is not supported (1-D and 2-D are)")
    if kind == "MaxPool":
        y = kernels.max_pool2d(_f32(X), k, s, p, d, ceil_mode)
    else:
        if d != (1, 1):
            raise EngineError("AveragePool with dilations is not supported")
        y = kernels.avg_pool2d(_f32(X), k, s, p, ceil_mode, count_include_pad)
    y = y.astype(X.dtype, copy=False)
    return y[:, :, 0, :] if one_d else y


def MaxPool(X, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape=None, pads=None,
            storage_order=0, strides=None):
    return _pool("MaxPool", X, auto_pad, ceil_mode, dilations, kernel_shape, pads, strides)


def AveragePool(X, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None,
                kernel_shape=None, pads=None, strides=None):
    return _pool("AveragePool", X, auto_pad, ceil_mode, dilations, kernel_shape, pads, strides, count_include_pad)


def GlobalAveragePool(X):
    if X.ndim == 4 and X.dtype == np.float32:
        return kernels.global_avg_pool(X).reshape(X.shape[0], X.shape[1], 1, 1)
    return X.mean(axis=tuple(range(2, X.ndim)), keepdims=True)


def GlobalMaxPool(X):
    return X.max(axis=tuple(range(2, X.ndim)), keepdims=True)


# ---------------------------------------------------------------- normalization
def _channel(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def BatchNormalization(X, scale, B, input_mean, input_var, epsilon=1e-5, momentum=0.9, training_mode=0):
    inv = scale / np.sqrt(input_var + np.asarray(epsilon, input_var.dtype))
    return X * _channel(inv, X.ndim) + _channel(B - input_mean * inv, X.ndim)


def LayerNormalization(X, Scale, B=None, axis=-1, epsilon=1e-5, stash_type=1):
    axes = tuple(range(axis + X.ndim if axis < 0 else axis, X.ndim))
    mean = X.mean(axis=axes, keepdims=True)
    centered = X - mean
    var = np.mean(np.square(centered), axis=axes, keepdims=True)
    inv_std = 1.0 / np.sqrt(var + np.asarray(epsilon, X.dtype))
    y = centered
    y *= inv_std
    y *= Scale
    if B is not None:
        y += B
    return y, mean, inv_std


def layer_norm_y(X, Scale, B=None, axis=-1, epsilon=1e-5, stash_type=1):
    """LayerNormalization's first output only (what exported models read): the core's row
    kernel when normalizing over the last axis with per-element scale and bias."""
    n = X.shape[-1] if X.ndim else 0
    if X.dtype == np.float32 and axis in (-1, X.ndim - 1) and n and Scale.size == n \
            and (B is None or B.size == n):
        return kernels.layer_norm(X, Scale, B, epsilon)
    return LayerNormalization(X, Scale, B, axis, epsilon, stash_type)[0]


def InstanceNormalization(input, scale, B, epsilon=1e-5):  # noqa: A002
    axes = tuple(range(2, input.ndim))
    mean = input.mean(axis=axes, keepdims=True)
    var = input.var(axis=axes, keepdims=True)
    y = (input - mean) / np.sqrt(var + np.asarray(epsilon, input.dtype))
    return y * _channel(scale, input.ndim) + _channel(B, input.ndim)


def LRN(X, size, alpha=0.0001, beta=0.75, bias=1.0):
    sq = np.square(X)
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    padded = np.pad(sq, [(0, 0), (before, after)] + [(0, 0)] * (X.ndim - 2))
    window = np.cumsum(padded, axis=1, dtype=np.float64)
    window = np.concatenate([np.zeros_like(window[:, :1]), window], axis=1)
    sums = (window[:, size:] - window[:, :-size]).astype(X.dtype)
    return X / (np.asarray(bias, X.dtype) + np.asarray(alpha / size, X.dtype) * sums) ** np.asarray(beta, X.dtype)


# ---------------------------------------------------------------- activations
def _native(X) -> bool:
    """float32 tensors take the core's vectorized activations; other dtypes keep NumPy's."""
    return isinstance(X, np.ndarray) and X.dtype == np.float32 and X.size >= 256


def Relu(X):
    if _native(X):
        return kernels.activation(X, "relu")
    return np.maximum(X, 0)  # a Python 0 takes X's dtype


def LeakyRelu(X, alpha=0.01):
    return np.where(X < 0, X * np.asarray(alpha, X.dtype), X)


def PRelu(X, slope):
    return np.where(X < 0, X * slope, X)


def Elu(X, alpha=1.0):
    return np.where(X < 0, np.asarray(alpha, X.dtype) * np.expm1(np.minimum(X, 0)), X)


def Selu(X, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875):
    return np.asarray(gamma, X.dtype) * Elu(X, alpha)


def Celu(X, alpha=1.0):
    return np.maximum(X, 0) + np.minimum(0, np.asarray(alpha, X.dtype) * np.expm1(X / np.asarray(alpha, X.dtype)))


def ThresholdedRelu(X, alpha=1.0):
    return np.where(X > alpha, X, np.zeros((), X.dtype))


def Sigmoid(X):
    if _native(X):
        return kernels.activation(X, "sigmoid")
    # exp of -|x| never overflows; the two branches are the same function
    e = np.exp(-np.abs(X))
    return np.where(X >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(X.dtype, copy=False)


def HardSigmoid(X, alpha=0.2, beta=0.5):
    if _native(X):
        return kernels.activation(X, ("hardsigmoid", alpha, beta))
    y = X * np.asarray(alpha, X.dtype)
    y += np.asarray(beta, X.dtype)
    return np.clip(y, 0, 1, out=y)


def HardSwish(X):
    if _native(X):
        return kernels.activation(X, "hardswish")
    return X * HardSigmoid(X, 1.0 / 6.0, 0.5)


def Tanh(input):  # noqa: A002
    return np.tanh(input)


def Softplus(X):
    return np.logaddexp(X, np.zeros((), X.dtype))


def Softsign(input):  # noqa: A002
    return input / (1 + np.abs(input))


def Mish(X):
    return X * np.tanh(Softplus(X))


# Abramowitz & Stegun 7.1.26: erf to 1.5e-7 absolute, with one exp and no branches
_ERF_P = 0.3275911
_ERF_A = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)


def erf_(x):
    """erf of a float array, computed in place (returns ``x``) in x's precision."""
    a = np.abs(x)
    t = a * x.dtype.type(_ERF_P)
    t += 1
    np.reciprocal(t, out=t)
    poly = t * x.dtype.type(_ERF_A[0])
    for c in _ERF_A[1:]:
        poly += x.dtype.type(c)
        poly *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    poly *= a
    np.subtract(1, poly, out=poly)
    return np.copysign(poly, x, out=x)


def Erf(input):  # noqa: A002
    if not np.issubdtype(input.dtype, np.floating):
        return erf_(input.astype(np.float64)).astype(input.dtype)
    return erf_(input.copy())


def Gelu(X, approximate="none"):
    if approximate == "tanh":
        inner = np.asarray(math.sqrt(2 / math.pi), X.dtype) * (X + np.asarray(0.044715, X.dtype) * X ** 3)
        return np.asarray(0.5, X.dtype) * X * (1 + np.tanh(inner))
    y = X * X.dtype.type(1 / math.sqrt(2))
    erf_(y)
    y += 1
    y *= X
    y *= X.dtype.type(0.5)
    return y


def Softmax(input, axis=-1):  # noqa: A002
    return softmax_(input.copy(), axis)


def softmax_(x, axis=-1):
    """Softmax computed in place (returns ``x``)."""
    if x.dtype == np.float32 and x.ndim and axis in (-1, x.ndim - 1) and x.flags.c_contiguous:
        return kernels.softmax(x, out=x)
    x -= x.max(axis=axis, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=axis, keepdims=True)
    return x


def LogSoftmax(input, axis=-1):  # noqa: A002
    y = input - input.max(axis=axis, keepdims=True)
    y -= np.log(np.exp(y).sum(axis=axis, keepdims=True))
    return y


def _as_2d(fn, x, axis):
    axis = axis + x.ndim if axis < 0 else axis
    return fn(x.reshape(math.prod(x.shape[:axis]), -1), axis=1).reshape(x.shape)


def Softmax_1(input, axis=1):  # noqa: A002
    """Softmax before opset 13: over all dimensions from ``axis`` on, flattened."""
    return _as_2d(Softmax, input, axis)


def LogSoftmax_1(input, axis=1):  # noqa: A002
    return _as_2d(LogSoftmax, input, axis)


# ---------------------------------------------------------------- quantization
def _per_axis(v, x_ndim, axis):
    if np.ndim(v) == 0 or x_ndim == 0:
        return v
    shape = [1] * x_ndim
    shape[axis] = -1
    return v.reshape(shape)


def QuantizeLinear(x, y_scale, y_zero_point=None, axis=1, saturate=1, block_size=0, output_dtype=0, precision=0):
    dtype = np.dtype(np.uint8) if y_zero_point is None else y_zero_point.dtype
    zp = 0 if y_zero_point is None else _per_axis(y_zero_point, x.ndim, axis).astype(np.float32)
    q = np.rint(x / _per_axis(y_scale, x.ndim, axis)) + zp
    info = np.iinfo(dtype)
    return np.clip(q, info.min, info.max).astype(dtype)


def DequantizeLinear(x, x_scale, x_zero_point=None, axis=1, block_size=0, output_dtype=0):
    scale = _per_axis(x_scale, x.ndim, axis)
    zp = 0 if x_zero_point is None else _per_axis(x_zero_point, x.ndim, axis).astype(np.int32)
    return ((x.astype(np.int32) - zp).astype(scale.dtype) * scale).astype(scale.dtype, copy=False)


def fake_quantize(x, scale, zero_point, qmin, qmax):
    """QuantizeLinear followed by DequantizeLinear, in float: what a QDQ activation pair computes."""
    q = x / scale
    np.rint(q, out=q)
    q += zero_point
    np.clip(q, qmin, qmax, out=q)
    q -= zero_point
    q *= scale
    return q
