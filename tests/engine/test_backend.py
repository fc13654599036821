"""onnx's own backend conformance tests (``onnx.backend.test``) run against the engine.

Only the node tests of ops in the engine's table are included; every exclusion below says why.
The cases are generated in memory by the installed onnx package (no data files, no network).
"""

from __future__ import annotations

import onnx.backend.test
import pytest
from onnx.backend.base import Backend, BackendRep

from sparsify.engine import Engine

pytest.importorskip("onnx.reference")


class EngineRep(BackendRep):
    def __init__(self, engine: Engine):
        self.engine = engine

    def run(self, inputs, **kwargs):
        feeds = inputs if isinstance(inputs, dict) else dict(zip(self.engine.input_names, inputs))
        return self.engine.run(feeds)


class EngineBackend(Backend):
    @classmethod
    def prepare(cls, model, device="CPU", **kwargs):
        super().prepare(model, device, **kwargs)
        return EngineRep(Engine(model))

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"


# snake_case test-name prefixes of the ops in sparsify.engine.ops.OPS
OPS = [
    "conv", "gemm", "matmul", "maxpool", "averagepool", "globalaveragepool", "globalmaxpool",
    "batchnorm", "layer_normalization", "instancenorm", "lrn",
    "relu", "leakyrelu", "prelu", "elu", "selu", "celu", "thresholdedrelu", "sigmoid", "hardsigmoid",
    "hardswish", "tanh", "softplus", "softsign", "mish", "erf", "gelu", "softmax", "logsoftmax", "clip",
    "quantizelinear", "dequantizelinear",
    "add", "sub", "mul", "div", "pow", "mod", "sqrt", "reciprocal", "exp", "log", "neg", "abs", "floor",
    "ceil", "round", "sign", "sin", "cos", "sum", "mean", "max", "min", "not", "and", "or", "xor",
    "equal", "less", "less_equal", "greater", "greater_equal", "isnan", "isinf", "where",
    "reduce_mean", "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_l2",
    "reduce_sum_square", "argmax", "argmin", "cumsum", "top_k", "einsum",
    "identity", "dropout", "shape", "size", "reshape", "flatten", "transpose", "squeeze", "unsqueeze",
    "concat", "split", "slice", "gather", "gather_elements", "expand", "tile", "range", "pad",
    "constant_pad", "edge_pad", "reflect_pad", "wrap_pad", "cast", "castlike", "constant",
    "constantofshape",
]

# (pattern, reason): every exclusion says why
EXCLUDE = [
    (r"(float16|fp16|FLOAT16|bfloat16|BFLOAT16|e4m3|e5m2|FLOAT8|float8|int4|INT4|uint4|UINT4|"
     r"float4|FLOAT4|e8m0|INT2|UINT2|int2|uint2)", "16-, 8-, 4- and 2-bit float/int types are not supported"),
    (r"string|STRING", "string tensors are not supported"),
    (r"^test_(maxpool|averagepool)_3d|^test_(maxpool|averagepool).*_3d_", "3-D pooling is not supported (1-D and 2-D are)"),
    (r"^test_averagepool_2d_dilations", "AveragePool with dilations (opset 19) is not supported"),
    (r"^test_batchnorm_.*training_mode", "training-mode BatchNormalization (running statistics outputs)"),
    (r"^test_identity_(opt|sequence)", "optional and sequence types are not supported"),
    (r"^test_split_to_sequence|^test_sequence", "sequence types are not supported"),
    (r"^test_maxpool_with_argmax", "MaxPool's Indices output is not supported"),
    (r"^test_(quantizelinear|dequantizelinear)_blocked", "blocked quantization (opset 21) is not supported"),
    (r"^test_range_.*_expanded", "the expanded form of Range uses Loop, which is not in the table"),
]

backend_test = onnx.backend.test.BackendTest(EngineBackend, __name__)
backend_test.include(r"^test_(" + "|".join(OPS) + r")(_.*)?_cpu$")
for pattern, _reason in EXCLUDE:
    backend_test.exclude(pattern)

globals().update(backend_test.test_cases)
