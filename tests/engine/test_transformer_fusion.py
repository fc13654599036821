"""Transformer blocks as exporters write them become few kernel calls: self-attention one
``kernels.attention`` step, a feed-forward block one ``kernels.linear_chain`` step.

Hand-built graphs in the torch exporter's form (head split by Reshape + Transpose, the Reshape
targets computed from Shape at run time because the batch is symbolic), with the variants the
matcher accepts and some it must leave alone; every one is checked against onnxruntime.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsify.engine import Engine

HEADS, D, S = 4, 8, 10
HD = HEADS * D


def _i64(*v):
    return np.array(v, np.int64)


def attention_model(scale_op="Div", mask=True, static_shapes=False, k_perm=(0, 2, 3, 1),
                    scores_out=False, out_proj=False, norm=False, residual="x"):
    rng = np.random.default_rng(0)
    inits = {"i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "ax0": _i64(0),
             "h": _i64(HEADS), "d": _i64(D), "hd": _i64(HD), "c": np.array(np.sqrt(D), np.float32),
             "ci": np.array(1 / np.sqrt(D), np.float32), "ax12": _i64(1, 2),
             "shp4": _i64(0, 0, HEADS, D), "shp3": _i64(0, 0, -1)}
    shape_nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
             helper.make_node("Gather", ["s", "i1"], ["t"], axis=0),
             helper.make_node("Unsqueeze", ["b", "ax0"], ["b1"]),
             helper.make_node("Unsqueeze", ["t", "ax0"], ["t1"]),
             helper.make_node("Concat", ["b1", "t1", "h", "d"], ["dyn4"], axis=0),
             helper.make_node("Concat", ["b1", "t1", "hd"], ["dyn3"], axis=0)]
    nodes = [] if static_shapes else shape_nodes
    shp4, shp3 = ("shp4", "shp3") if static_shapes else ("dyn4", "dyn3")
    src = "x"
    if norm:  # pre-norm: the projections read LayerNormalization(x), the residual x itself
        inits["g"] = rng.standard_normal(HD).astype(np.float32)
        inits["beta"] = rng.standard_normal(HD).astype(np.float32)
        nodes.append(helper.make_node("LayerNormalization", ["x", "g", "beta"], ["xn"], axis=-1,
                                      epsilon=1e-5))
        src = "xn"
    for name, perm in (("q", (0, 2, 1, 3)), ("k", k_perm), ("v", (0, 2, 1, 3))):
        inits["w" + name] = (rng.standard_normal((HD, HD)) / np.sqrt(HD)).astype(np.float32)
        inits["b" + name] = rng.standard_normal(HD).astype(np.float32)
        nodes += [helper.make_node("MatMul", [src, "w" + name], [name + "m"]),
                  helper.make_node("Add", ["b" + name, name + "m"], [name + "a"]),
                  helper.make_node("Reshape", [name + "a", shp4], [name + "r"]),
                  helper.make_node("Transpose", [name + "r"], [name + "t"], perm=list(perm))]
    kt = "kt"
    if tuple(k_perm) == (0, 2, 1, 3):  # K^T by a second Transpose: left unfused
        nodes.append(helper.make_node("Transpose", ["kt"], ["ktt"], perm=[0, 1, 3, 2]))
        kt = "ktt"
    nodes.append(helper.make_node("MatMul", ["qt", kt], ["sc"]))
    x = "sc"
    if scale_op:
        nodes.append(helper.make_node(scale_op, [x, "c" if scale_op == "Div" else "ci"], ["scaled"]))
        x = "scaled"
    if mask:
        nodes += [helper.make_node("Unsqueeze", ["m", "ax12"], ["m4"]),
                  helper.make_node("Add", [x, "m4"], ["masked"])]
        x = "masked"
    nodes += [helper.make_node("Softmax", [x], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "vt"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctxt"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctxt", shp3], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", S, HD])]
    if out_proj:  # the output projection with its bias and the residual
        inits["wo"] = (rng.standard_normal((HD, HD)) / np.sqrt(HD)).astype(np.float32)
        inits["bo"] = rng.standard_normal(HD).astype(np.float32)
        nodes += [helper.make_node("MatMul", ["y", "wo"], ["om"]),
                  helper.make_node("Add", ["bo", "om"], ["oa"]),
                  helper.make_node("Add", [residual, "oa"], ["z"])]
        outs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", S, HD])]
    if scores_out:
        outs.append(helper.make_tensor_value_info("sc", TensorProto.FLOAT, None))
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", S, HD])]
    if mask:
        ins.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, ["batch", S]))
    if residual != "x":  # a residual the Add broadcasts: the step checks its shape per call
        ins.append(helper.make_tensor_value_info(residual, TensorProto.FLOAT, [S, HD]))
    graph = helper.make_graph(nodes, "attention", ins, outs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _feeds(batch):
    rng = np.random.default_rng(batch)
    m = np.where(rng.random((batch, S)) < 0.3, -10000.0, 0.0).astype(np.float32)
    return {"x": rng.standard_normal((batch, S, HD)).astype(np.float32), "m": m}


@pytest.mark.parametrize("scale_op", ["Div", "Mul", None])
@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("static_shapes", [False, True])
def test_attention_block_becomes_one_step(scale_op, mask, static_shapes, onnx_check):
    model = attention_model(scale_op, mask, static_shapes)
    engine = Engine(model)
    ops = [s.op for s in engine.plan.steps]
    assert ops.count("Attention") == 1, ops
    # the three projections and the attention step: the shape arithmetic is gone
    assert sorted(ops) == sorted(["MatMul+Add"] * 3 + ["Attention"] + (["Unsqueeze"] if mask else [])), ops
    for batch in (1, 3):
        feeds = _feeds(batch)
        if not mask:
            feeds.pop("m")
        onnx_check.assert_same(engine.run(feeds), onnx_check.ort_run(model, feeds), 1e-4)


@pytest.mark.parametrize("static_shapes", [False, True])
@pytest.mark.parametrize("norm", [False, True])
def test_attention_sublayer_with_projections_becomes_one_step(static_shapes, norm, onnx_check):
    model = attention_model(out_proj=True, static_shapes=static_shapes, norm=norm)
    engine = Engine(model)
    block = "LayerNormalization+AttentionBlock" if norm else "AttentionBlock"
    assert sorted(s.op for s in engine.plan.steps) == [block, "Unsqueeze"]
    for batch in (1, 2):
        feeds = _feeds(batch)
        onnx_check.assert_same(engine.run(feeds), onnx_check.ort_run(model, feeds), 1e-4)


def test_attention_sublayer_with_a_broadcast_residual(onnx_check):
    model = attention_model(out_proj=True, residual="r")
    engine = Engine(model)
    assert sorted(s.op for s in engine.plan.steps) == ["AttentionBlock", "Unsqueeze"]
    for batch in (1, 2):
        feeds = dict(_feeds(batch), r=np.random.default_rng(5).standard_normal((S, HD)).astype(np.float32))
        onnx_check.assert_same(engine.run(feeds), onnx_check.ort_run(model, feeds), 1e-4)


def test_attention_is_not_fused_when_scores_are_read_elsewhere(onnx_check):
    model = attention_model(scores_out=True)
    engine = Engine(model)
    assert "Attention" not in [s.op for s in engine.plan.steps]
    feeds = _feeds(2)
    onnx_check.assert_same(engine.run(feeds), onnx_check.ort_run(model, feeds), 1e-4)


def test_attention_with_another_key_layout_is_left_to_the_single_ops(onnx_check):
    model = attention_model(k_perm=(0, 2, 1, 3))
    engine = Engine(model)
    assert "Attention" not in [s.op for s in engine.plan.steps]
    feeds = _feeds(2)
    onnx_check.assert_same(engine.run(feeds), onnx_check.ort_run(model, feeds), 1e-4)


def ffn_model(hidden_out=False, norm=False):
    rng = np.random.default_rng(1)
    w1 = (rng.standard_normal((HD, 3 * HD)) * (rng.random((HD, 3 * HD)) > 0.8)).astype(np.float32)
    w2 = (rng.standard_normal((3 * HD, HD)) * (rng.random((3 * HD, HD)) > 0.8)).astype(np.float32)
    inits = {"w1": w1, "b1": rng.standard_normal(3 * HD).astype(np.float32), "w2": w2,
             "b2": rng.standard_normal(HD).astype(np.float32)}
    nodes = []
    if norm:
        inits["g"] = rng.standard_normal(HD).astype(np.float32)
        nodes.append(helper.make_node("LayerNormalization", ["x", "g"], ["xn"], axis=-1))
    nodes += [helper.make_node("MatMul", ["xn" if norm else "x", "w1"], ["h"]),
             helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["o"]),
             helper.make_node("Add", ["b2", "o"], ["ob"]),
             helper.make_node("Add", ["x", "ob"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", S, HD])]
    if hidden_out:
        outs.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", S, 3 * HD]))
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["batch", S, HD])], outs,
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("hidden_out", [False, True])
@pytest.mark.parametrize("norm", [False, True])
def test_feed_forward_block_becomes_one_linear_chain(hidden_out, norm, onnx_check):
    model = ffn_model(hidden_out, norm)
    engine = Engine(model)
    ops = [s.op for s in engine.plan.steps]
    pre = ["LayerNormalization"] if norm and hidden_out else []
    assert ops == pre + (["MatMul+Add+Relu", "MatMul+Add+Add"] if hidden_out else [
        ("LayerNormalization>" if norm else "") + "MatMul+Add+Relu>MatMul+Add+Add"]), ops
    feeds = {"x": np.random.default_rng(2).standard_normal((2, S, HD)).astype(np.float32)}
    onnx_check.assert_same(engine.run(feeds), onnx_check.ort_run(model, feeds), 1e-4)


def test_residual_stream_between_blocks_stays_feature_major(onnx_check):
    """Two pre-norm feed-forward blocks: the stream between them is handed over feature-major
    (the first block writes it so, the second reads it as input and as residual)."""
    rng = np.random.default_rng(3)
    inits, nodes, x = {}, [], "x"
    for i in range(2):
        inits.update({f"g{i}": rng.standard_normal(HD).astype(np.float32),
                      f"w1{i}": (rng.standard_normal((HD, 2 * HD)) / 6).astype(np.float32),
                      f"w2{i}": (rng.standard_normal((2 * HD, HD)) / 8).astype(np.float32)})
        nodes += [helper.make_node("LayerNormalization", [x, f"g{i}"], [f"n{i}"], axis=-1),
                  helper.make_node("MatMul", [f"n{i}", f"w1{i}"], [f"h{i}"]),
                  helper.make_node("Relu", [f"h{i}"], [f"a{i}"]),
                  helper.make_node("MatMul", [f"a{i}", f"w2{i}"], [f"o{i}"]),
                  helper.make_node("Add", [x, f"o{i}"], [f"r{i}"])]
        x = f"r{i}"
    graph = helper.make_graph(
        nodes, "two_blocks", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", S, HD])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", S, HD])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    engine = Engine(model)
    assert [s.op for s in engine.plan.steps] == ["LayerNormalization>MatMul+Relu>MatMul+Add"] * 2
    feeds = {"x": np.random.default_rng(4).standard_normal((2, S, HD)).astype(np.float32)}
    onnx_check.assert_same(engine.run(feeds), onnx_check.ort_run(model, feeds), 1e-4)
