"""Every op in the engine's table, as a one-node model, against onnxruntime (random inputs,
attribute variants), plus the fusion patterns the plan builds, as small multi-node graphs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsify.engine import Engine
from sparsify.engine.ops import OPS

R = np.random.default_rng(1234)


def Init(value):
    """An input that becomes an initializer (a constant) of the test model."""
    return ("init", np.asarray(value))


def f(*shape, scale=1.0):
    return (R.standard_normal(shape) * scale).astype(np.float32)


def pos(*shape):
    return (R.random(shape) + 0.1).astype(np.float32)


def i64(*values):
    return np.array(values, dtype=np.int64)


def sparse(*shape, sparsity=0.9):
    w = f(*shape)
    w[R.random(shape) < sparsity] = 0
    return w


# (op, inputs, attrs, n_outputs, opset, tolerance); ids are made from op and attrs
C = []


def case(op, inputs, attrs=None, n_out=1, opset=17, tol=1e-5, id=None):
    C.append(pytest.param(op, inputs, attrs or {}, n_out, opset, tol, id=id or f"{op}-{len(C)}"))


x4 = f(2, 4, 9, 9)
# --- Conv: generic (weight as an input) and packed (weight as an initializer), attribute variants
case("Conv", [x4, f(6, 4, 3, 3), f(6)], {"pads": [1, 1, 1, 1]}, id="Conv-input-weight")
case("Conv", [x4, Init(f(6, 4, 3, 3)), Init(f(6))], {"pads": [1, 1, 1, 1]}, id="Conv-packed")
case("Conv", [x4, Init(sparse(6, 4, 3, 3))], {"strides": [2, 2]}, id="Conv-sparse-stride2")
case("Conv", [x4, Init(f(6, 4, 3, 3))], {"dilations": [2, 2], "pads": [2, 1, 2, 1]}, id="Conv-dilation")
case("Conv", [x4, Init(f(6, 2, 3, 3)), Init(f(6))], {"group": 2}, id="Conv-group2")
case("Conv", [x4, Init(f(4, 1, 3, 3)), Init(f(4))], {"group": 4, "pads": [1, 1, 1, 1]}, id="Conv-depthwise")
case("Conv", [x4, f(4, 1, 3, 3)], {"group": 4, "strides": [2, 2]}, id="Conv-depthwise-input")
case("Conv", [x4, Init(f(8, 1, 3, 3))], {"group": 4}, id="Conv-depthwise-multiplier2")
case("Conv", [x4, Init(f(5, 4, 1, 1))], {}, id="Conv-1x1")
case("Conv", [x4, Init(f(5, 4, 1, 7))], {"pads": [0, 3, 0, 3]}, id="Conv-1x7")
case("Conv", [x4, Init(f(5, 4, 3, 3))], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, id="Conv-same-upper")
case("Conv", [x4, Init(f(5, 4, 4, 4))], {"auto_pad": "SAME_LOWER", "strides": [2, 2]}, id="Conv-same-lower")
case("Conv", [x4, Init(f(5, 4, 3, 3))], {"auto_pad": "VALID"}, id="Conv-valid")
case("Conv", [x4, Init(f(5, 4, 3, 3))], {"pads": [0, 1, 2, 0]}, id="Conv-asymmetric-pads")
case("Conv", [f(2, 3, 20), Init(f(4, 3, 5))], {"pads": [2, 2], "strides": [2]}, id="Conv-1d")
# --- Gemm / MatMul
case("Gemm", [f(5, 7), Init(f(7, 3)), Init(f(3))], {}, id="Gemm-packed")
case("Gemm", [f(5, 7), Init(sparse(3, 7)), Init(f(1, 3))], {"transB": 1, "alpha": 0.5, "beta": 2.0}, id="Gemm-transB")
case("Gemm", [f(7, 5), f(3, 7), f(5, 3)], {"transA": 1, "transB": 1, "beta": 0.3}, id="Gemm-inputs-transA")
case("Gemm", [f(5, 7), Init(f(7, 3)), Init(f(5, 3))], {}, id="Gemm-matrix-C")
case("Gemm", [f(5, 7), Init(f(7, 3))], {}, id="Gemm-no-C")
case("MatMul", [f(4, 6), f(6, 3)], id="MatMul-2d")
case("MatMul", [f(2, 3, 4, 6), f(3, 6, 5)], id="MatMul-batched-broadcast")
case("MatMul", [f(2, 8, 6), Init(sparse(6, 5))], id="MatMul-packed-3d")
case("MatMul", [f(6), Init(f(6, 5))], id="MatMul-1d")
# --- pooling
case("MaxPool", [x4], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]})
case("MaxPool", [x4], {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1})
case("MaxPool", [x4], {"kernel_shape": [3, 3], "dilations": [2, 2]})
case("MaxPool", [x4], {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"})
case("MaxPool", [f(2, 3, 11)], {"kernel_shape": [3], "strides": [2]}, id="MaxPool-1d")
case("AveragePool", [x4], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]})
case("AveragePool", [x4], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1})
case("AveragePool", [x4], {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1})
case("GlobalAveragePool", [x4])
case("GlobalMaxPool", [x4])
# --- normalization
case("BatchNormalization", [x4, Init(f(4)), Init(f(4)), Init(f(4)), Init(pos(4))], {"epsilon": 1e-3})
case("BatchNormalization", [x4, f(4), f(4), f(4), pos(4)], id="BatchNormalization-inputs")
case("LayerNormalization", [f(2, 5, 16), Init(f(16)), Init(f(16))], {"epsilon": 1e-5})
case("LayerNormalization", [f(2, 5, 16), Init(f(5, 16))], {"axis": -2}, id="LayerNormalization-axis-2")
case("InstanceNormalization", [x4, f(4), f(4)])
case("LRN", [x4], {"size": 3, "alpha": 1e-3, "beta": 0.75, "bias": 2.0})
case("LRN", [f(2, 6, 3, 3)], {"size": 5})
# --- activations
for op in ("Relu", "Sigmoid", "Tanh", "HardSwish", "Softplus", "Softsign", "Erf", "Abs", "Neg", "Exp",
           "Floor", "Ceil", "Sign", "Sin", "Cos", "Round"):
    case(op, [f(3, 4, 5, scale=3.0)])
case("Sqrt", [pos(3, 4)])
case("Log", [pos(3, 4)])
case("Reciprocal", [pos(3, 4)])
case("Mish", [f(3, 4)], opset=18)
case("HardSigmoid", [f(3, 4, scale=4.0)], {"alpha": 0.3, "beta": 0.4})
case("LeakyRelu", [f(3, 4)], {"alpha": 0.2})
case("Elu", [f(3, 4)], {"alpha": 0.7})
case("Selu", [f(3, 4)])
case("Celu", [f(3, 4)], {"alpha": 2.0})
case("ThresholdedRelu", [f(3, 4)], {"alpha": 0.5})
case("PRelu", [f(2, 3, 4), Init(f(3, 1))])
case("Gelu", [f(3, 50, scale=3.0)], opset=20)
case("Gelu", [f(3, 50, scale=3.0)], {"approximate": "tanh"}, opset=20, id="Gelu-tanh")
case("Erf", [np.array([0.0, 1e-6, -1e-3, 0.3, 0.49, 0.51, 2.0, -3.5, 6.0], np.float32)], id="Erf-edges")
case("Softmax", [f(2, 3, 10, scale=5.0)])
case("Softmax", [f(2, 3, 10)], {"axis": 1}, id="Softmax-axis1")
case("LogSoftmax", [f(2, 10)])
case("Clip", [f(3, 4, scale=3.0), Init(np.float32(0)), Init(np.float32(6))], id="Clip-relu6")
case("Clip", [f(3, 4, scale=3.0), None, Init(np.float32(0.5))], id="Clip-max-only")
case("Clip", [f(3, 4)], id="Clip-none")
case("Clip", [np.arange(-5, 5, dtype=np.int64), Init(np.int64(-2)), Init(np.int64(3))], id="Clip-int")
# --- elementwise binary with broadcasting
for op in ("Add", "Sub", "Mul", "Div"):
    case(op, [f(2, 3, 4), f(3, 1)])
    case(op, [f(4), f(2, 3, 4)], id=f"{op}-broadcast-left")
case("Div", [i64(7, -7, 9, -9), i64(2, 2, -4, -4)], id="Div-int")
case("Pow", [pos(2, 3), f(2, 3)])
case("Pow", [f(2, 3), Init(np.float32(2.0))], id="Pow-square")
case("Mod", [i64(5, -5, 7, -7), i64(3, 3, -2, -2)])
case("Mod", [f(6), pos(6)], {"fmod": 1}, id="Mod-fmod")
case("Sum", [f(2, 3), f(3), f(2, 1)])
case("Mean", [f(2, 3), f(3)])
case("Max", [f(2, 3), f(3), f(2, 1)])
case("Min", [f(2, 3), f(2, 3)])
for op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"):
    case(op, [R.integers(0, 3, (3, 4)).astype(np.int64), R.integers(0, 3, (4,)).astype(np.int64)])
case("Not", [R.random((3, 4)) > 0.5])
case("And", [R.random((3, 4)) > 0.5, R.random((4,)) > 0.5])
case("Or", [R.random((3, 4)) > 0.5, R.random((3, 4)) > 0.5])
case("Xor", [R.random((3, 4)) > 0.5, R.random((3, 4)) > 0.5])
case("Where", [R.random((3, 4)) > 0.5, f(3, 4), f(4)])
case("IsNaN", [np.array([1.0, np.nan, np.inf], np.float32)])
case("IsInf", [np.array([1.0, np.nan, np.inf, -np.inf], np.float32)], {"detect_negative": 0})
# --- reductions
case("ReduceMean", [f(2, 3, 4), Init(i64(1, -1))], opset=18, id="ReduceMean-axes-input")
case("ReduceMean", [f(2, 3, 4)], {"axes": [1], "keepdims": 0}, opset=13, id="ReduceMean-axes-attr")
case("ReduceMean", [f(2, 3, 4)], opset=18, id="ReduceMean-all")
# the spatial mean of NCHW (torch's x.mean((2, 3))) runs the core's global average pool
case("ReduceMean", [f(2, 5, 3, 7), Init(i64(2, 3))], opset=18, id="ReduceMean-spatial")
case("ReduceMean", [f(2, 5, 3, 7), Init(i64(-1, -2))], {"keepdims": 0}, opset=18,
     id="ReduceMean-spatial-flat")
case("ReduceSum", [f(2, 3, 4), Init(i64(2))], {"keepdims": 0})
case("ReduceSum", [f(2, 3, 4), Init(np.zeros(0, np.int64))], {"noop_with_empty_axes": 1}, id="ReduceSum-noop")
case("ReduceMax", [f(2, 3, 4)], {"axes": [0, 2]})
case("ReduceMin", [f(2, 3, 4)], {"axes": [1]})
case("ReduceProd", [pos(2, 3)], {"axes": [1]})
case("ReduceL2", [f(2, 3)], {"axes": [1]})
case("ReduceSumSquare", [f(2, 3)], {"axes": [0], "keepdims": 0})
case("ArgMax", [f(3, 5)], {"axis": 1})
case("ArgMax", [np.array([[1, 3, 3], [2, 2, 0]], np.float32)], {"axis": 1, "keepdims": 0, "select_last_index": 1}, id="ArgMax-last")
case("ArgMin", [f(3, 5)], {"axis": 0})
case("CumSum", [f(3, 5), Init(np.int64(1))])
case("CumSum", [f(3, 5), Init(np.int64(0))], {"exclusive": 1, "reverse": 1}, id="CumSum-exclusive-reverse")
case("TopK", [f(3, 8), Init(i64(3))], n_out=2)
# --- shapes, layout and indexing
case("Reshape", [f(2, 3, 4), Init(i64(0, -1))])
case("Reshape", [f(2, 3, 4), i64(4, 6)], id="Reshape-shape-input")
case("Reshape", [np.zeros((0, 3), np.float32), Init(i64(3, 0))], {"allowzero": 1}, opset=14, id="Reshape-allowzero")
case("Flatten", [f(2, 3, 4, 5)])
case("Flatten", [f(2, 3, 4, 5)], {"axis": 0}, id="Flatten-axis0")
case("Flatten", [f(2, 3, 4, 5)], {"axis": -1}, id="Flatten-axis-1")
case("Transpose", [f(2, 3, 4)], {"perm": [2, 0, 1]})
case("Transpose", [f(2, 3, 4)], id="Transpose-default")
case("Concat", [f(2, 3), f(2, 5), f(2, 1)], {"axis": 1})
case("Concat", [f(2, 3), f(4, 3)], {"axis": -2}, id="Concat-negative-axis")
case("Split", [f(6, 4), Init(i64(2, 4))], {"axis": 0}, n_out=2, opset=13, id="Split-input")
case("Split", [f(6, 4)], {"axis": 0, "split": [1, 5]}, n_out=2, opset=11, id="Split-attr")
case("Split", [f(3, 6)], {"axis": 1}, n_out=3, opset=13, id="Split-equal")
case("Split", [f(3, 7)], {"axis": 1, "num_outputs": 3}, n_out=3, opset=18, id="Split-num-outputs")
case("Slice", [f(5, 6), Init(i64(1, -4)), Init(i64(4, 100))])
case("Slice", [f(5, 6), Init(i64(-1)), Init(i64(-1000)), Init(i64(1)), Init(i64(-2))], id="Slice-negative-step")
case("Slice", [f(5, 6, 3), Init(i64(0, 1)), Init(i64(5, 3)), Init(i64(0, 2)), Init(i64(2, 1))], id="Slice-axes-steps")
case("Gather", [f(5, 4), i64(0, -1, 3)])
case("Gather", [f(5, 4), Init(np.array([[1, 2], [3, 0]], np.int64))], {"axis": 1}, id="Gather-axis1")
case("Gather", [f(5, 4), Init(np.int64(2))], id="Gather-scalar")
case("GatherElements", [f(3, 4), Init(np.array([[0, 1], [2, 3], [-1, 0]], np.int64))], {"axis": 1})
case("Unsqueeze", [f(3, 4), Init(i64(0, -1))], opset=13)
case("Unsqueeze", [f(3, 4)], {"axes": [1]}, opset=11, id="Unsqueeze-attr")
case("Squeeze", [f(1, 3, 1, 4), Init(i64(2))], opset=13)
case("Squeeze", [f(1, 3, 1, 4)], opset=13, id="Squeeze-all")
case("Squeeze", [f(1, 3, 1, 4)], {"axes": [0]}, opset=11, id="Squeeze-attr")
case("Shape", [f(2, 3, 4)])
case("Shape", [f(2, 3, 4)], {"start": 1, "end": -1}, opset=15, id="Shape-start-end")
case("Size", [f(2, 3, 4)])
case("Cast", [f(3, 4, scale=5.0)], {"to": TensorProto.INT64})
case("Cast", [i64(1, 0, 3)], {"to": TensorProto.BOOL}, id="Cast-bool")
case("Cast", [f(3, 4)], {"to": TensorProto.FLOAT16}, id="Cast-half")
case("CastLike", [f(3), Init(np.zeros(1, np.float64))])
case("Expand", [f(3, 1), Init(i64(2, 3, 4))])
case("Tile", [f(2, 3), Init(i64(2, 2))])
case("Range", [Init(np.float32(1)), np.float32(5), Init(np.float32(0.5))])
case("Range", [np.int64(10), Init(np.int64(0)), Init(np.int64(-3))], id="Range-int")
case("ConstantOfShape", [i64(2, 3)], {"value": numpy_helper.from_array(np.array([1.5], np.float32))})
case("ConstantOfShape", [i64(2, 3)], id="ConstantOfShape-default")
case("Pad", [f(2, 3, 4), Init(i64(0, 1, 2, 0, 2, 1)), Init(np.float32(0.5))])
case("Pad", [f(2, 3, 4), Init(i64(0, 1, 1, 0, 1, 2))], {"mode": "reflect"}, id="Pad-reflect")
case("Pad", [f(2, 3, 4), Init(i64(0, 1, 1, 0, 1, 2))], {"mode": "edge"}, id="Pad-edge")
case("Pad", [f(2, 3, 4), Init(i64(1, -1, 0, 2)), None, Init(i64(0, 2))], opset=18, id="Pad-axes-negative-crop")
case("Identity", [f(3)])
case("Dropout", [f(3, 4)], {}, opset=13)
case("Einsum", [f(2, 3, 4), f(2, 4, 5)], {"equation": "bij,bjk->bik"})
# --- quantization
case("QuantizeLinear", [f(3, 8, scale=3.0), Init(np.float32(0.02)), Init(np.uint8(128))])
case("QuantizeLinear", [f(3, 8, scale=3.0), Init(np.float32(0.02)), Init(np.int8(-3))], id="QuantizeLinear-int8")
case("QuantizeLinear", [f(2, 3, 4), Init(np.array([0.1, 0.02, 0.05], np.float32)), Init(np.zeros(3, np.int8))],
     {"axis": 1}, id="QuantizeLinear-per-axis")
case("DequantizeLinear", [R.integers(0, 255, (3, 8)).astype(np.uint8), Init(np.float32(0.02)), Init(np.uint8(128))])
case("DequantizeLinear", [R.integers(-128, 127, (3, 2)).astype(np.int8), Init(np.array([0.1, 0.2, 0.3], np.float32)),
                          Init(np.zeros(3, np.int8))], {"axis": 0}, id="DequantizeLinear-per-axis")


@pytest.mark.parametrize("op,inputs,attrs,n_out,opset,tol", C)
def test_op_matches_onnxruntime(op, inputs, attrs, n_out, opset, tol, onnx_check):
    model, feeds = onnx_check.one_node_model(op, inputs, attrs, n_out, opset)
    got = Engine(model).run(feeds)
    onnx_check.assert_same(got, onnx_check.ort_run(model, feeds), tol, what=f"{op} {attrs}")


def test_every_op_in_the_table_has_a_case(onnx_check):
    covered = {p.values[0] for p in C} | {"Constant"}  # Constant: see test_constant_and_folding
    assert set(OPS) - covered == set()


def test_dynamic_batch_reuses_the_plan(onnx_check):
    model, _ = onnx_check.one_node_model("Conv", [f(1, 4, 9, 9), Init(f(6, 4, 3, 3))], {"pads": [1, 1, 1, 1]})
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    engine = Engine(model)
    steps = engine.plan.steps
    for batch in (1, 3, 7):
        x = f(batch, 4, 9, 9)
        onnx_check.assert_same(engine.run({"in0": x}), onnx_check.ort_run(model, {"in0": x}), 1e-5, f"batch {batch}")
    assert engine.plan.steps is steps


# ---------------------------------------------------------------- multi-node graphs: folding and fusion
def _graph(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, [helper.make_empty_tensor_value_info(o) for o in outputs],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_constant_and_folding(onnx_check):
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(f(4), "v")),
             helper.make_node("Mul", ["c", "two"], ["c2"]),
             helper.make_node("Add", ["x", "c2"], ["y"])]
    model = _graph(nodes, [_vi("x", [3, 4])], ["y"], {"two": np.float32([2.0])})
    engine = Engine(model)
    x = f(3, 4)
    onnx_check.assert_same(engine.run({"x": x}), onnx_check.ort_run(model, {"x": x}), 1e-6)
    assert [s.op for s in engine.plan.steps] == ["Add"]  # Constant and Mul folded at load


def test_conv_bn_relu_and_residual_fuse_into_one_kernel_call(onnx_check):
    w1, w2 = f(8, 8, 3, 3), sparse(8, 8, 1, 1)
    bn = {"s": pos(8), "b": f(8), "m": f(8), "v": pos(8)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "s", "b", "m", "v"], ["n1"]),
             helper.make_node("Relu", ["n1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
             helper.make_node("Add", ["c2", "x"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    model = _graph(nodes, [_vi("x", [2, 8, 6, 6])], ["y"], dict(w1=w1, w2=w2, b2=f(8), **bn))
    engine = Engine(model)
    x = f(2, 8, 6, 6)
    onnx_check.assert_same(engine.run({"x": x}), onnx_check.ort_run(model, {"x": x}), 1e-5)
    assert [s.op for s in engine.plan.steps] == ["Conv+BatchNormalization+Relu", "Conv+Add+Relu"]
    report = engine.report()
    assert report["fraction_of_native_ops"] == 1.0
    assert [row["fused"] for row in report["layers"]] == [["BatchNormalization", "Relu"], ["Add", "Relu"]]


def test_matmul_bias_residual_clip_fuse_and_gelu_stays_numpy(onnx_check):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Add", ["b", "m"], ["mb"]),
             helper.make_node("Add", ["mb", "x"], ["r"]),
             helper.make_node("Clip", ["r", "lo", "hi"], ["c"]),
             helper.make_node("Gelu", ["c"], ["y"])]
    model = _graph(nodes, [_vi("x", [2, 5, 16])], ["y"],
                   dict(w=sparse(16, 16), b=f(16), lo=np.float32(0), hi=np.float32(6)), opset=20)
    model.ir_version = 9
    engine = Engine(model)
    x = f(2, 5, 16)
    onnx_check.assert_same(engine.run({"x": x}), onnx_check.ort_run(model, {"x": x}), 1e-5)
    assert [s.op for s in engine.plan.steps] == ["MatMul+Add+Add+Clip", "Gelu"]


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_stem_conv_and_max_pool_fuse_into_one_call(kind, onnx_check):
    # ResNet's stem: Conv 7x7/2 -> BN -> Relu -> MaxPool 3x3/2 pads 1, with odd conv outputs
    bn = {"s": pos(16), "b": f(16), "m": f(16), "v": pos(16)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[3, 3, 3, 3], strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    w = f(16, 3, 7, 7) if kind == "dense" else sparse(16, 3, 7, 7)
    model = _graph(nodes, [_vi("x", [2, 3, 27, 35])], ["y", "p"], dict(w=w, **bn))
    engine = Engine(model, kind=kind)
    x = f(2, 3, 27, 35)
    onnx_check.assert_same(engine.run({"x": x}), onnx_check.ort_run(model, {"x": x}), 1e-5)
    assert [s.op for s in engine.plan.steps] == ["Conv+BatchNormalization+Relu+MaxPool", "MaxPool"]


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_expansion_and_depthwise_conv_run_in_bands_as_one_step(kind, onnx_check):
    # MobileNetV2's inverted residual: 1x1 expand -> BN -> Clip -> depthwise 3x3/2 -> BN -> Clip
    # -> 1x1 project; the expanded activations (64 x 64 x 64 floats: 1 MB) go to a band buffer
    bn = lambda c, p: {f"{p}s": pos(c), f"{p}b": f(c), f"{p}m": f(c), f"{p}v": pos(c)}  # noqa: E731
    clip = {"lo": np.float32(0), "hi": np.float32(6)}
    nodes = [helper.make_node("Conv", ["x", "we"], ["e"]),
             helper.make_node("BatchNormalization", ["e", "es", "eb", "em", "ev"], ["en"]),
             helper.make_node("Clip", ["en", "lo", "hi"], ["ec"]),
             helper.make_node("Conv", ["ec", "wd"], ["d"], group=64, pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("BatchNormalization", ["d", "ds", "db", "dm", "dv"], ["dn"]),
             helper.make_node("Clip", ["dn", "lo", "hi"], ["dc"]),
             helper.make_node("Conv", ["dc", "wp"], ["y"])]
    we = f(64, 8, 1, 1) if kind == "dense" else sparse(64, 8, 1, 1)
    model = _graph(nodes, [_vi("x", [1, 8, 64, 64])], ["y"],
                   dict(we=we, wd=f(64, 1, 3, 3), wp=sparse(8, 64, 1, 1), **bn(64, "e"), **bn(64, "d"), **clip))
    engine = Engine(model, kind=kind)
    x = f(1, 8, 64, 64)
    onnx_check.assert_same(engine.run({"x": x}), onnx_check.ort_run(model, {"x": x}), 1e-5)
    assert [s.op for s in engine.plan.steps] == [
        "Conv+BatchNormalization+Clip+Conv+BatchNormalization+Clip", "Conv"]
    rows = engine.report()["layers"]
    assert [r["kind"] for r in rows] == [kind, "depthwise", kind]
    assert rows[1]["fused"][:2] == ["BatchNormalization", "Clip"]
    # the expansion read by something else too, or too small to be worth bands: two steps
    small = _graph(nodes[:6], [_vi("x", [1, 8, 16, 16])], ["dc"],
                   dict(we=we, wd=f(64, 1, 3, 3), **bn(64, "e"), **bn(64, "d"), **clip))
    assert len(Engine(small, kind=kind).plan.steps) == 2
    twice = _graph(nodes[:6], [_vi("x", [1, 8, 64, 64])], ["dc", "ec"],
                   dict(we=we, wd=f(64, 1, 3, 3), **bn(64, "e"), **bn(64, "d"), **clip))
    assert len(Engine(twice, kind=kind).plan.steps) == 2


def test_intermediate_read_twice_is_not_fused(onnx_check):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Add", ["r", "c"], ["y"])]
    model = _graph(nodes, [_vi("x", [1, 3, 5, 5])], ["y"], {"w": f(4, 3, 1, 1)})
    engine = Engine(model)
    x = f(1, 3, 5, 5)
    onnx_check.assert_same(engine.run({"x": x}), onnx_check.ort_run(model, {"x": x}), 1e-5)
    assert [s.op for s in engine.plan.steps] == ["Conv", "Relu", "Add"]


def test_silu_hardswish_and_sigmoid_fuse_into_conv_epilogues(onnx_check):
    # torch exports SiLU as Sigmoid and Mul, and HardSwish as HardSwish (or HardSigmoid and Mul)
    bn = {"s": pos(8), "b": f(8), "m": f(8), "v": pos(8)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "s", "b", "m", "v"], ["n1"]),
             helper.make_node("Sigmoid", ["n1"], ["g1"]),
             helper.make_node("Mul", ["g1", "n1"], ["a1"]),  # either operand order
             helper.make_node("Conv", ["a1", "wd"], ["c2"], group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c2"], ["g2"]),
             helper.make_node("Mul", ["c2", "g2"], ["a2"]),
             helper.make_node("Conv", ["a2", "w3", "b3"], ["c3"]),
             helper.make_node("HardSigmoid", ["c3"], ["g3"], alpha=0.25, beta=0.4),
             helper.make_node("Mul", ["c3", "g3"], ["a3"]),
             helper.make_node("Conv", ["a3", "w4"], ["c4"]),
             helper.make_node("HardSwish", ["c4"], ["a4"]),
             helper.make_node("Conv", ["a4", "w5"], ["c5"]),
             helper.make_node("Sigmoid", ["c5"], ["y"])]
    inits = dict(w1=f(8, 3, 3, 3), wd=f(8, 1, 3, 3), w3=sparse(8, 8, 1, 1), b3=f(8), w4=f(8, 8, 1, 1),
                 w5=f(4, 8, 1, 1), **bn)
    model = _graph(nodes, [_vi("x", [2, 3, 9, 9])], ["y"], inits)
    engine = Engine(model)
    x = f(2, 3, 9, 9)
    x[0, 0, 0, :3] = [np.inf, -np.inf, np.nan]
    onnx_check.assert_same(engine.run({"x": x}), onnx_check.ort_run(model, {"x": x}), 1e-5)
    assert [s.op for s in engine.plan.steps] == [
        "Conv+BatchNormalization+Sigmoid+Mul", "Conv+Sigmoid+Mul", "Conv+HardSigmoid+Mul",
        "Conv+HardSwish", "Conv+Sigmoid"]


def test_silu_is_not_fused_when_its_input_has_another_reader(onnx_check):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Sigmoid", ["c"], ["g"]),
             helper.make_node("Mul", ["c", "g"], ["m"]),
             helper.make_node("Add", ["m", "c"], ["y"])]
    model = _graph(nodes, [_vi("x", [1, 3, 5, 5])], ["y"], {"w": f(4, 3, 1, 1)})
    engine = Engine(model)
    x = f(1, 3, 5, 5)
    onnx_check.assert_same(engine.run({"x": x}), onnx_check.ort_run(model, {"x": x}), 1e-5)
    assert [s.op for s in engine.plan.steps] == ["Conv", "Sigmoid", "Mul", "Add"]


def test_batchnorm_on_its_own_runs_with_its_activation_as_one_native_step(onnx_check):
    # DenseNet's pre-activation: BatchNormalization and Relu on a Concat, which no conv absorbs
    bn = {"s": pos(6), "b": f(6), "m": f(6), "v": pos(6)}
    nodes = [helper.make_node("Concat", ["x", "z"], ["cat"], axis=1),
             helper.make_node("BatchNormalization", ["cat", "s", "b", "m", "v"], ["n"], epsilon=1e-3),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("Conv", ["r", "w"], ["y"]),
             helper.make_node("BatchNormalization", ["z", "s3", "b3", "m3", "v3"], ["y2"])]
    inits = dict(w=f(5, 6, 1, 1), s3=pos(3), b3=f(3), m3=f(3), v3=pos(3), **bn)
    model = _graph(nodes, [_vi("x", [2, 3, 4, 4]), _vi("z", [2, 3, 4, 4])], ["y", "y2"], inits)
    engine = Engine(model)
    feeds = {"x": f(2, 3, 4, 4), "z": f(2, 3, 4, 4)}
    onnx_check.assert_same(engine.run(feeds), onnx_check.ort_run(model, feeds), 1e-5)
    assert [s.op for s in engine.plan.steps] == ["Concat", "BatchNormalization+Relu", "Conv",
                                                 "BatchNormalization"]


def test_squeeze_and_excitation_gate_multiplies_in_the_core(onnx_check):
    # EfficientNet's SE block: pool, two 1x1 convs, a sigmoid gate [N, C, 1, 1] times the map
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c0"], ["p"]),
             helper.make_node("Conv", ["p", "w1", "b1"], ["s1"]),
             helper.make_node("Relu", ["s1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["s2"]),
             helper.make_node("Sigmoid", ["s2"], ["g"]),
             helper.make_node("Mul", ["g", "c0"], ["y"])]  # the gate first: either order
    inits = dict(w0=f(16, 3, 3, 3), w1=f(4, 16, 1, 1), b1=f(4), w2=f(16, 4, 1, 1), b2=f(16))
    model = _graph(nodes, [_vi("x", [2, 3, 20, 20])], ["y"], inits)
    engine = Engine(model)
    x = f(2, 3, 20, 20)
    onnx_check.assert_same(engine.run({"x": x}), onnx_check.ort_run(model, {"x": x}), 1e-5)
    assert [s.op for s in engine.plan.steps][-1] == "Mul"


def test_qdq_activation_pair_runs_as_fake_quant_and_weights_dequantize_at_load(onnx_check):
    wq = R.integers(-127, 127, (6, 4, 3, 3)).astype(np.int8)
    ws = (R.random(6) * 0.01 + 0.001).astype(np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1])]
    inits = dict(xs=np.float32(0.05), xz=np.uint8(120), wq=wq, ws=ws, wz=np.zeros(6, np.int8))
    model = _graph(nodes, [_vi("x", [1, 4, 7, 7])], ["y"], inits, opset=13)
    engine = Engine(model)
    x = f(1, 4, 7, 7, scale=2.0)
    assert [s.op for s in engine.plan.steps] == ["QuantizeLinear+DequantizeLinear", "Conv"]
    # onnxruntime runs this in int8; the float path differs by accumulation order only
    onnx_check.assert_same(engine.run({"x": x}), onnx_check.ort_run(model, {"x": x}), 1e-4)


def test_written_out_gelu_becomes_one_step_and_elementwise_ops_reuse_buffers(onnx_check):
    nodes = [helper.make_node("Sub", ["x", "w"], ["h"]),
             helper.make_node("Div", ["h", "sqrt2"], ["d"]),
             helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]),
             helper.make_node("Mul", ["h", "a"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["g"]),
             helper.make_node("Mul", ["g", "x"], ["p"]),
             helper.make_node("Relu", ["p"], ["y"])]
    inits = dict(w=f(4, 16), sqrt2=np.float32(np.sqrt(2)), one=np.float32(1), half=np.float32(0.5))
    model = _graph(nodes, [_vi("x", [4, 16])], ["y"], inits)
    engine = Engine(model)
    x = f(4, 16, scale=2.0)
    onnx_check.assert_same(engine.run({"x": x}), onnx_check.ort_run(model, {"x": x}), 1e-5)
    assert [s.op for s in engine.plan.steps] == ["Sub", "Gelu", "Mul", "Relu"]
    # Gelu makes a new array that only the Mul reads: the Mul and then the Relu write into it
    assert [s.name.endswith("(in place)") for s in engine.plan.steps] == [False, False, True, True]
    assert engine.run({"x": x})[0] is not None and not np.shares_memory(engine.run({"x": x})[0], x)


@pytest.mark.parametrize("form", ["written_out", "mul_form", "onnx_gelu"])
@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_gelu_after_matmul_and_bias_fuses_into_the_kernel_epilogue(form, kind, onnx_check):
    """BERT's FFN: MatMul -> Add(bias) -> GELU is one kernel call with GELU in its epilogue."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["h"])]
    if form == "onnx_gelu":
        nodes.append(helper.make_node("Gelu", ["h"], ["y"]))
        gelu_ops = ["Gelu"]
    else:
        scale = ("Div", np.float32(np.sqrt(2))) if form == "written_out" else ("Mul", np.float32(1 / np.sqrt(2)))
        nodes += [helper.make_node(scale[0], ["h", "c"], ["d"]),
                  helper.make_node("Erf", ["d"], ["e"]),
                  helper.make_node("Add", ["one", "e"], ["a"]),
                  helper.make_node("Mul", ["a", "h"], ["g"]),
                  helper.make_node("Mul", ["g", "half"], ["y"])]
        gelu_ops = [scale[0], "Erf", "Add", "Mul", "Mul"]
    inits = dict(w=sparse(40, 70, sparsity=0.9 if kind == "sparse" else 0.0), b=f(70),
                 c=np.float32(np.sqrt(2) if form == "written_out" else 1 / np.sqrt(2)),
                 one=np.float32(1), half=np.float32(0.5))
    opset = 20 if form == "onnx_gelu" else 17
    model = _graph(nodes, [_vi("x", [2, 19, 40])], ["y"], inits, opset=opset)
    model.ir_version = 9
    engine = Engine(model, kind=kind)
    x = f(2, 19, 40, scale=2.0)
    onnx_check.assert_same(engine.run({"x": x}), onnx_check.ort_run(model, {"x": x}), 1e-5)
    assert [s.op for s in engine.plan.steps] == ["+".join(["MatMul", "Add"] + gelu_ops)]
    assert engine.report()["layers"][0]["fused"] == ["Add"] + gelu_ops


def test_gelu_is_not_fused_when_its_input_has_another_reader(onnx_check):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Div", ["h", "sqrt2"], ["d"]),
             helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]),
             helper.make_node("Mul", ["h", "a"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["g"]),
             helper.make_node("Add", ["g", "h"], ["y"])]  # h read a third time
    inits = dict(w=f(16, 16), sqrt2=np.float32(np.sqrt(2)), one=np.float32(1), half=np.float32(0.5))
    model = _graph(nodes, [_vi("x", [4, 16])], ["y"], inits)
    engine = Engine(model)
    x = f(4, 16, scale=2.0)
    onnx_check.assert_same(engine.run({"x": x}), onnx_check.ort_run(model, {"x": x}), 1e-5)
    assert [s.op for s in engine.plan.steps] == ["MatMul", "Gelu", "Add"]


@pytest.mark.parametrize("kind", ["auto", "sparse", "dense"])
def test_forced_kernel_kind_gives_the_same_result(kind, onnx_check):
    model, feeds = onnx_check.one_node_model("Conv", [x4, Init(sparse(6, 4, 3, 3, sparsity=0.8)), Init(f(6))],
                                             {"pads": [1, 1, 1, 1]})
    engine = Engine(model, kind=kind)
    onnx_check.assert_same(engine.run(feeds), onnx_check.ort_run(model, feeds), 1e-5)
    expected = {"auto": engine.report()["layers"][0]["kind"], "sparse": "sparse", "dense": "dense"}[kind]
    assert engine.report()["layers"][0]["kind"] == expected


def test_residual_with_unprovable_shapes_is_fused_with_a_guard(onnx_check):
    # "seq" differs between the two inputs' symbolic dims, so shapes cannot be proven equal
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["mb"]),
             helper.make_node("Add", ["r", "mb"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    inputs = [_vi("x", ["n", "seq", 16]), _vi("r", ["nr", "len", 8])]
    model = _graph(nodes, inputs, ["y"], dict(w=sparse(16, 8), b=f(8)))
    engine = Engine(model)
    assert [s.op for s in engine.plan.steps] == ["MatMul+Add+Add+Relu"]
    for r_shape in [(2, 5, 8), (2, 1, 8), (1, 5, 8)]:  # equal, then broadcast by the Add
        feeds = {"x": f(2, 5, 16), "r": f(*r_shape)}
        onnx_check.assert_same(engine.run(feeds), onnx_check.ort_run(model, feeds), 1e-5, str(r_shape))
