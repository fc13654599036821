"""ONNX ops that move, reshape, index or combine tensors, and plain elementwise math (NumPy).

One plain function per ONNX op type, named exactly as the spec names it. Inputs are positional
(optional inputs default to None), attributes are keyword arguments with the spec's defaults.
An op with several outputs returns a tuple. The table that maps names to functions is in ops.py.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from onnx import helper, numpy_helper

from sparsify.engine import kernels
from sparsify.errors import EngineError, InputError


def _axes(axes, ndim: int) -> tuple[int, ...]:
    """ONNX axes (list attribute or int64 tensor input, possibly negative) -> sorted positives."""
    return tuple(sorted(int(a) + ndim if int(a) < 0 else int(a) for a in np.ravel(axes)))


# ---------------------------------------------------------------- elementwise math
def Add(A, B):
    return np.add(A, B)


def Sub(A, B):
    return np.subtract(A, B)


def Mul(A, B):
    y = mul_planes(A, B)
    return np.multiply(A, B) if y is None else y


def mul_planes(A, B, out=None):
    """A [N, C, H, W...] times a gate B [N, C, 1, 1...] (either order; a squeeze-and-excitation
    block's output) in the core, one scale per plane; None when the operands are not that."""
    if not (isinstance(A, np.ndarray) and isinstance(B, np.ndarray)
            and A.dtype == np.float32 and B.dtype == np.float32):
        return None
    if A.size < B.size:
        A, B = B, A
    if out is not None and out is not A:
        return None
    if (A.ndim < 3 or B.ndim != A.ndim or B.shape[:2] != A.shape[:2] or any(d != 1 for d in B.shape[2:])
            or A.size < 4096):
        return None
    return kernels.channel_affine(A, B, None, "none", out=out)


def Div(A, B):
    if np.issubdtype(np.result_type(A, B), np.integer):
        # ONNX integer division truncates toward zero (C semantics), numpy floors
        return np.trunc(np.true_divide(A, B)).astype(np.result_type(A, B))
    return np.divide(A, B)


def Pow(X, Y):
    out = np.power(X, Y.astype(X.dtype) if np.issubdtype(X.dtype, np.floating) else Y)
    return out.astype(X.dtype, copy=False)


def Mod(A, B, fmod=0):
    return np.fmod(A, B) if fmod else np.mod(A, B)


def Sqrt(X):
    return np.sqrt(X)


def Reciprocal(X):
    return np.reciprocal(X)


def Exp(X):
    return np.exp(X)


def Log(X):
    return np.log(X)


def Neg(X):
    return np.negative(X)


def Abs(X):
    return np.abs(X)


def Floor(X):
    return np.floor(X)


def Ceil(X):
    return np.ceil(X)


def Round(X):
    return np.round(X)  # round half to even, as the spec says


def Sign(X):
    return np.sign(X)


def Sin(X):
    return np.sin(X)


def Cos(X):
    return np.cos(X)


def Not(X):
    return np.logical_not(X)


def And(A, B):
    return np.logical_and(A, B)


def Or(A, B):
    return np.logical_or(A, B)


def Xor(A, B):
    return np.logical_xor(A, B)


def Equal(A, B):
    return np.equal(A, B)


def Less(A, B):
    return np.less(A, B)


def LessOrEqual(A, B):
    return np.less_equal(A, B)


def Greater(A, B):
    return np.greater(A, B)


def GreaterOrEqual(A, B):
    return np.greater_equal(A, B)


def IsNaN(X):
    return np.isnan(X)


def IsInf(X, detect_negative=1, detect_positive=1):
    return (np.isneginf(X) if detect_negative else False) | (np.isposinf(X) if detect_positive else False)


def Where(condition, X, Y):
    return np.where(condition, X, Y)


def _variadic(ufunc, inputs):
    out = np.array(inputs[0], copy=True)
    for x in inputs[1:]:
        out = ufunc(out, x)
    return out


def Sum(*data_0):
    return _variadic(np.add, data_0)


def Mean(*data_0):
    return (_variadic(np.add, data_0) / len(data_0)).astype(data_0[0].dtype, copy=False)


def Max(*data_0):
    return _variadic(np.maximum, data_0)


def Min(*data_0):
    return _variadic(np.minimum, data_0)


def Clip(input, min=None, max=None):  # noqa: A002 - spec names
    lo = -np.inf if min is None else min
    hi = np.inf if max is None else max
    if np.issubdtype(input.dtype, np.integer):
        info = np.iinfo(input.dtype)
        lo = info.min if min is None else min
        hi = info.max if max is None else max
    return np.minimum(np.maximum(input, lo), hi).astype(input.dtype, copy=False)


# ---------------------------------------------------------------- shapes and layout
def Identity(input):  # noqa: A002
    return input


def Dropout(data, ratio=None, training_mode=None, seed=0):
    # inference: identity; the optional mask output is all ones
    return data, np.ones(data.shape, dtype=bool)


def Shape(data, start=0, end=None):
    return np.array(data.shape[start:end], dtype=np.int64)


def Size(data):
    return np.array(data.size, dtype=np.int64)


def Reshape(data, shape, allowzero=0):
    shape = [int(s) for s in shape]
    if not allowzero:
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return data.reshape(shape)


def Flatten(input, axis=1):  # noqa: A002
    axis = axis + input.ndim if axis < 0 else axis
    # math.prod on the shape tuple: np.prod converts it to an array first (~5 us a call)
    return input.reshape(math.prod(input.shape[:axis]), math.prod(input.shape[axis:]))


def Transpose(data, perm=None):
    return np.transpose(data, perm)


def Squeeze(data, axes=None):
    if axes is None:
        return np.squeeze(data)
    return np.squeeze(data, axis=_axes(axes, data.ndim))


def Unsqueeze(data, axes):
    out_ndim = data.ndim + np.size(axes)
    shape = list(data.shape)
    for a in _axes(axes, out_ndim):
        shape.insert(a, 1)
    return data.reshape(shape)


def Concat(*inputs, axis):
    return np.concatenate(inputs, axis=axis)


def Split(input, split=None, axis=0, num_outputs=None):  # noqa: A002
    # `split` is an input from opset 13 and an attribute before; the plan passes num_outputs
    # (the node's output count) for the equal-split form of every opset
    dim = input.shape[axis]
    if split is None:
        chunk = -(-dim // num_outputs)
        split = [chunk] * (num_outputs - 1) + [dim - chunk * (num_outputs - 1)]
    sizes = [int(s) for s in split]
    if sum(sizes) != dim or min(sizes, default=0) < 0:
        raise InputError(f"split sizes {sizes} must be non-negative and add up to {dim}, the "
                         f"length of axis {axis}")
    points = np.cumsum(sizes)[:-1]
    return tuple(np.split(input, points, axis=axis))


def Slice(data, starts, ends, axes=None, steps=None):
    axes = range(len(starts)) if axes is None else [int(a) + data.ndim if a < 0 else int(a) for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * data.ndim
    for a, s, e, st in zip(axes, starts, ends, steps):
        index[a] = slice(int(s), int(e), int(st))  # Python slicing clamps exactly as the spec does
    return data[tuple(index)]


def Gather(data, indices, axis=0):
    return np.take(data, indices.astype(np.int64, copy=False), axis=axis)


def GatherElements(data, indices, axis=0):
    idx = np.where(indices < 0, indices + data.shape[axis], indices)
    return np.take_along_axis(data, idx, axis=axis)


def Expand(input, shape):  # noqa: A002
    out_shape = np.broadcast_shapes(input.shape, tuple(int(s) for s in shape))
    return np.broadcast_to(input, out_shape).copy()


def Tile(input, repeats):  # noqa: A002
    return np.tile(input, [int(r) for r in repeats])


def Range(start, limit, delta):
    return np.arange(start, limit, delta, dtype=np.result_type(start, limit, delta))


def Pad(data, pads, constant_value=None, axes=None, mode="constant", value=0.0):
    # opset < 11 passes `pads` and `value` as attributes, later versions as inputs
    pads = [int(p) for p in pads]
    n = len(pads) // 2
    axes = range(data.ndim) if axes is None else _axes(axes, data.ndim)
    width = [(0, 0)] * data.ndim
    for i, a in enumerate(axes):
        width[a] = (pads[i], pads[i + n])
    if min(min(w) for w in width) < 0:  # negative pads crop
        crop = tuple(slice(max(-lo, 0), data.shape[i] - max(-hi, 0)) for i, (lo, hi) in enumerate(width))
        data = data[crop]
        width = [(max(lo, 0), max(hi, 0)) for lo, hi in width]
    if mode == "constant":
        fill = value if constant_value is None else np.ravel(constant_value)[0] if np.size(constant_value) else 0
        return np.pad(data, width, mode="constant", constant_values=fill)
    return np.pad(data, width, mode={"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode])


def Cast(input, to, saturate=1, round_mode="up"):  # noqa: A002
    return input.astype(helper.tensor_dtype_to_np_dtype(to))


def CastLike(input, target_type, saturate=1, round_mode="up"):  # noqa: A002
    return input.astype(target_type.dtype)


def Constant(value=None, value_float=None, value_floats=None, value_int=None, value_ints=None,
             value_string=None, value_strings=None, sparse_value=None):
    if value is not None:
        return numpy_helper.to_array(value)
    if value_float is not None:
        return np.array(value_float, dtype=np.float32)
    if value_floats is not None:
        return np.array(value_floats, dtype=np.float32)
    if value_int is not None:
        return np.array(value_int, dtype=np.int64)
    if value_ints is not None:
        return np.array(value_ints, dtype=np.int64)
    raise EngineError("Constant node with a string or sparse value is not supported")


def ConstantOfShape(input, value=None):  # noqa: A002
    fill = np.zeros(1, np.float32) if value is None else numpy_helper.to_array(value)
    return np.full(tuple(int(s) for s in input), fill.ravel()[0], dtype=fill.dtype)


def _reduce(fn, data, axes, keepdims, noop_with_empty_axes):
    if axes is None or np.size(axes) == 0:
        if noop_with_empty_axes:
            return data
        axes = range(data.ndim)
    return fn(data, axis=_axes(axes, data.ndim), keepdims=bool(keepdims))


def ReduceMean(data, axes=None, keepdims=1, noop_with_empty_axes=0):
    # `axes` is an attribute before opset 18 and an input from 18: both arrive here the same way
    if (data.ndim == 4 and data.dtype == np.float32 and axes is not None and np.size(axes) == 2
            and _axes(axes, 4) == (2, 3) and data.shape[2] * data.shape[3] > 0):
        # a global average pool (torch's x.mean((2, 3))): the core's kernel, as GlobalAveragePool
        # runs; numpy's two-axis mean took 11 us on [1, 512, 2, 2]
        pooled = kernels.global_avg_pool(data)
        return pooled.reshape(data.shape[:2] + ((1, 1) if keepdims else ()))
    return _reduce(np.mean, data, axes, keepdims, noop_with_empty_axes).astype(data.dtype, copy=False)


def ReduceSum(data, axes=None, keepdims=1, noop_with_empty_axes=0):
    return _reduce(np.sum, data, axes, keepdims, noop_with_empty_axes).astype(data.dtype, copy=False)


def _lowest(dtype):
    return False if dtype == np.bool_ else np.iinfo(dtype).min if dtype.kind in "iu" else -np.inf


def _highest(dtype):
    return True if dtype == np.bool_ else np.iinfo(dtype).max if dtype.kind in "iu" else np.inf


def ReduceMax(data, axes=None, keepdims=1, noop_with_empty_axes=0):
    # the max of an empty set is the lowest value (the spec's identity), not an error
    return _reduce(functools.partial(np.max, initial=_lowest(data.dtype)), data, axes, keepdims,
                   noop_with_empty_axes)


def ReduceMin(data, axes=None, keepdims=1, noop_with_empty_axes=0):
    return _reduce(functools.partial(np.min, initial=_highest(data.dtype)), data, axes, keepdims,
                   noop_with_empty_axes)


def ReduceProd(data, axes=None, keepdims=1, noop_with_empty_axes=0):
    return _reduce(np.prod, data, axes, keepdims, noop_with_empty_axes).astype(data.dtype, copy=False)


def ReduceL2(data, axes=None, keepdims=1, noop_with_empty_axes=0):
    sq = _reduce(np.sum, np.square(data), axes, keepdims, noop_with_empty_axes)
    return np.sqrt(sq).astype(data.dtype, copy=False)


def ReduceSumSquare(data, axes=None, keepdims=1, noop_with_empty_axes=0):
    return _reduce(np.sum, np.square(data), axes, keepdims, noop_with_empty_axes).astype(data.dtype, copy=False)


def ArgMax(data, axis=0, keepdims=1, select_last_index=0):
    if select_last_index:
        idx = data.shape[axis] - 1 - np.argmax(np.flip(data, axis), axis=axis)
    else:
        idx = np.argmax(data, axis=axis)
    return (np.expand_dims(idx, axis) if keepdims else idx).astype(np.int64)


def ArgMin(data, axis=0, keepdims=1, select_last_index=0):
    return ArgMax(-data if data.dtype != np.bool_ else ~data, axis, keepdims, select_last_index)


def CumSum(x, axis, exclusive=0, reverse=0):
    ax = int(np.ravel(axis)[0])
    y = np.flip(x, ax) if reverse else x
    out = np.cumsum(y, axis=ax, dtype=x.dtype)
    if exclusive:
        out = np.concatenate([np.zeros_like(np.take(out, [0], axis=ax)), np.take(out, range(out.shape[ax] - 1), axis=ax)], ax)
    return np.flip(out, ax).copy() if reverse else out


def Einsum(*Inputs, equation):
    return np.einsum(equation, *Inputs)


def _int_or_none(x):
    return None if x is None else int(np.ravel(x)[0])


def TopK(X, K, axis=-1, largest=1, sorted=1):  # noqa: A002
    k = _int_or_none(K)
    if largest:  # descending order with ties broken by the lower index, as the spec says
        key = np.iinfo(X.dtype).max - X if X.dtype.kind == "u" else -X
    else:
        key = X
    idx = np.argsort(key, axis=axis, kind="stable")
    idx = np.take(idx, range(k), axis=axis)
    return np.take_along_axis(X, idx, axis=axis), idx.astype(np.int64)
