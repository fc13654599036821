"""THE op table: ONNX op type -> plain function (see ops_nn.py and ops_tensor.py).

A new op is one function named as the spec names it and one line here. Functions take the node's
inputs positionally (a missing optional input is None) and its attributes as keyword arguments
with the spec's defaults; an op with several outputs returns a tuple.
"""

from __future__ import annotations

import numpy as np

from sparsify.engine import ops_nn as nn
from sparsify.engine import ops_tensor as t

OPS = {
    # convolution, gemm, pooling: C++ kernels
    "Conv": nn.Conv,
    "Gemm": nn.Gemm,
    "MatMul": nn.MatMul,
    "MaxPool": nn.MaxPool,
    "AveragePool": nn.AveragePool,
    "GlobalAveragePool": nn.GlobalAveragePool,
    "GlobalMaxPool": nn.GlobalMaxPool,
    # normalization
    "BatchNormalization": nn.BatchNormalization,
    "LayerNormalization": nn.LayerNormalization,
    "InstanceNormalization": nn.InstanceNormalization,
    "LRN": nn.LRN,
    # activations
    "Relu": nn.Relu,
    "LeakyRelu": nn.LeakyRelu,
    "PRelu": nn.PRelu,
    "Elu": nn.Elu,
    "Selu": nn.Selu,
    "Celu": nn.Celu,
    "ThresholdedRelu": nn.ThresholdedRelu,
    "Sigmoid": nn.Sigmoid,
    "HardSigmoid": nn.HardSigmoid,
    "HardSwish": nn.HardSwish,
    "Tanh": nn.Tanh,
    "Softplus": nn.Softplus,
    "Softsign": nn.Softsign,
    "Mish": nn.Mish,
    "Erf": nn.Erf,
    "Gelu": nn.Gelu,
    "Softmax": nn.Softmax,
    "LogSoftmax": nn.LogSoftmax,
    "Clip": t.Clip,
    # quantization
    "QuantizeLinear": nn.QuantizeLinear,
    "DequantizeLinear": nn.DequantizeLinear,
    # elementwise math and logic
    "Add": t.Add,
    "Sub": t.Sub,
    "Mul": t.Mul,
    "Div": t.Div,
    "Pow": t.Pow,
    "Mod": t.Mod,
    "Sqrt": t.Sqrt,
    "Reciprocal": t.Reciprocal,
    "Exp": t.Exp,
    "Log": t.Log,
    "Neg": t.Neg,
    "Abs": t.Abs,
    "Floor": t.Floor,
    "Ceil": t.Ceil,
    "Round": t.Round,
    "Sign": t.Sign,
    "Sin": t.Sin,
    "Cos": t.Cos,
    "Sum": t.Sum,
    "Mean": t.Mean,
    "Max": t.Max,
    "Min": t.Min,
    "Not": t.Not,
    "And": t.And,
    "Or": t.Or,
    "Xor": t.Xor,
    "Equal": t.Equal,
    "Less": t.Less,
    "LessOrEqual": t.LessOrEqual,
    "Greater": t.Greater,
    "GreaterOrEqual": t.GreaterOrEqual,
    "IsNaN": t.IsNaN,
    "IsInf": t.IsInf,
    "Where": t.Where,
    # reductions
    "ReduceMean": t.ReduceMean,
    "ReduceSum": t.ReduceSum,
    "ReduceMax": t.ReduceMax,
    "ReduceMin": t.ReduceMin,
    "ReduceProd": t.ReduceProd,
    "ReduceL2": t.ReduceL2,
    "ReduceSumSquare": t.ReduceSumSquare,
    "ArgMax": t.ArgMax,
    "ArgMin": t.ArgMin,
    "CumSum": t.CumSum,
    "TopK": t.TopK,
    "Einsum": t.Einsum,
    # shapes, layout, indexing
    "Identity": t.Identity,
    "Dropout": t.Dropout,
    "Shape": t.Shape,
    "Size": t.Size,
    "Reshape": t.Reshape,
    "Flatten": t.Flatten,
    "Transpose": t.Transpose,
    "Squeeze": t.Squeeze,
    "Unsqueeze": t.Unsqueeze,
    "Concat": t.Concat,
    "Split": t.Split,
    "Slice": t.Slice,
    "Gather": t.Gather,
    "GatherElements": t.GatherElements,
    "Expand": t.Expand,
    "Tile": t.Tile,
    "Range": t.Range,
    "Pad": t.Pad,
    "Cast": t.Cast,
    "CastLike": t.CastLike,
    "Constant": t.Constant,
    "ConstantOfShape": t.ConstantOfShape,
}

# op -> (first opset of the table's semantics, function for older opsets)
BEFORE = {
    "Softmax": (13, nn.Softmax_1),
    "LogSoftmax": (13, nn.LogSoftmax_1),
}


def op_function(op_type: str, opset: int):
    """The function that runs ``op_type`` as defined at ``opset``."""
    if op_type in BEFORE and opset < BEFORE[op_type][0]:
        return BEFORE[op_type][1]
    return OPS[op_type]


# ops whose function runs in the C++ core (for the report's fraction_of_native_ops)
# (Gemm and MatMul of two float32 activations use the core's dense GEMM too, see ops_nn.matmul)
NATIVE = {"Conv", "Gemm", "MatMul", "MaxPool", "AveragePool", "GlobalAveragePool"}


# elementwise activations with a core kernel (float32 input of 256 elements or more; smaller ones
# and other dtypes run in NumPy)
NATIVE_ACTIVATIONS = {"Relu", "Sigmoid", "HardSigmoid", "HardSwish"}


def runs_native(op_type: str, attrs: dict, opset: int) -> bool:
    """Whether a node's function runs in the C++ core: the ops above, the activations in
    NATIVE_ACTIVATIONS, and Softmax / LayerNormalization over the last axis (float32 input; other
    dtypes fall back to NumPy)."""
    if op_type in NATIVE or op_type in NATIVE_ACTIVATIONS:
        return True
    if op_type == "Softmax":
        return opset >= 13 and attrs.get("axis", -1) == -1
    if op_type == "LayerNormalization":
        return attrs.get("axis", -1) == -1
    return False

# ops whose output may share memory with an input: never written in place
VIEWS = {"Identity", "Dropout", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice",
         "Split", "Cast", "CastLike", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
         "ReduceL2", "ReduceSumSquare", "Clip", "Pow", "Mean", "Erf", "Sigmoid", "Constant"}


# ops whose function always returns a new array (so a later step may overwrite it)
FRESH = {"Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Tanh", "Gelu", "Softmax", "Exp", "Sqrt", "Neg",
         "Where", "Concat", "MatMul", "Gemm", "Conv", "Sum", "QuantizeLinear+DequantizeLinear"}


def _binary_into(ufunc, pos):
    return lambda bound: (lambda a, b: ufunc(a, b, out=a)) if pos == 0 else (lambda a, b: ufunc(a, b, out=b))


def _mul_into(pos):
    """In place into input pos; a squeeze-and-excitation gate runs in the core (t.mul_planes)."""
    def make(bound):
        def run(a, b):
            into = a if pos == 0 else b
            y = t.mul_planes(a, b, out=into)
            return np.multiply(a, b, out=into) if y is None else y
        return run
    return make


def _softmax_into(bound):
    if getattr(bound, "func", bound) is not nn.Softmax:  # the opset < 13 form flattens first
        return None
    axis = bound.keywords.get("axis", -1) if hasattr(bound, "keywords") else -1
    return lambda x: nn.softmax_(x, axis)


# op -> {input position: make(bound function) -> a function writing into that input, or None}
INPLACE = {
    "Add": {0: _binary_into(np.add, 0), 1: _binary_into(np.add, 1)},
    "Mul": {0: _mul_into(0), 1: _mul_into(1)},
    "Sub": {0: _binary_into(np.subtract, 0)},
    "Relu": {0: lambda bound: (lambda x: np.maximum(x, 0, out=x))},
    "Softmax": {0: _softmax_into},
}


def unsupported_reason(node, opset: int) -> str | None:
    """Why a node whose op type is in OPS still cannot run (an attribute form we lack), else None."""
    attrs = {a.name for a in node.attribute}
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        return "MaxPool's Indices output is not supported"
    kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), [])
    if node.op_type in ("Conv", "MaxPool", "AveragePool") and len(kernel) > 2:
        return f"{len(kernel)}-D {node.op_type} is not supported (1-D and 2-D are)"
    dilated = any(a.name == "dilations" and any(d != 1 for d in a.ints) for a in node.attribute)
    if node.op_type == "AveragePool" and dilated:
        return "AveragePool with dilations is not supported"
    if node.op_type in ("QuantizeLinear", "DequantizeLinear") and "block_size" in attrs:
        return "blocked quantization is not supported"
    if node.op_type == "Cast" and "round_mode" in attrs:
        return "Cast with round_mode (float8) is not supported"
    return None
