"""Bad input to the engine: each mistake is a typed error whose message names what is wrong."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsify.engine import Engine
from sparsify.errors import EngineError, InputError, SparsifyError, UnsupportedOpError


def _model(batch="batch"):
    """x [batch, 3, 8, 8] float32, y [batch, 2] int64 -> conv, relu, softmax, plus y + 1."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Softmax", ["r"], ["out"], axis=1, name="softmax"),
             helper.make_node("Add", ["y", "one"], ["out2"], name="add")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8]),
              helper.make_tensor_value_info("y", TensorProto.INT64, [batch, 2])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("out2", TensorProto.INT64, None)]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(1, np.int64), "one")]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _feeds(batch=2):
    return {"x": np.ones((batch, 3, 8, 8), np.float32), "y": np.zeros((batch, 2), np.int64)}


@pytest.fixture(scope="module")
def engine():
    return Engine(_model())


def test_good_feeds_run(engine):
    out, out2 = engine.run(_feeds())
    assert out.shape == (2, 4, 8, 8) and out2.tolist() == [[1, 1], [1, 1]]
    assert engine.input_names == ["x", "y"] and engine.output_names == ["out", "out2"]


def test_missing_input_is_named(engine):
    feeds = _feeds()
    del feeds["y"]
    with pytest.raises(InputError, match=r"missing input\(s\) \['y'\].*inputs are \['x', 'y'\]"):
        engine.run(feeds)


def test_extra_input_is_named(engine):
    with pytest.raises(InputError, match=r"unknown input\(s\) \['z'\]"):
        engine.run({**_feeds(), "z": np.zeros(1, np.float32)})


def test_wrong_rank_names_input_and_expected_shape(engine):
    with pytest.raises(InputError, match=r"input 'x' has shape \[3, 8, 8\] \(rank 3\), expected rank 4: \[batch, 3, 8, 8\]"):
        engine.run({**_feeds(), "x": np.ones((3, 8, 8), np.float32)})


def test_wrong_shape_names_input_axis_and_expected_shape(engine):
    with pytest.raises(InputError, match=r"input 'x' has shape \[2, 3, 8, 9\], expected \[batch, 3, 8, 8\] \(axis 3 must be 8\)"):
        engine.run({**_feeds(), "x": np.ones((2, 3, 8, 9), np.float32)})


def test_inconsistent_symbolic_dims_are_reported(engine):
    with pytest.raises(InputError, match=r"input 'y' has batch=3 .* input 'x' has batch=2"):
        engine.run({"x": np.ones((2, 3, 8, 8), np.float32), "y": np.zeros((3, 2), np.int64)})


def test_wrong_dtype_names_input_and_expected_dtype(engine):
    with pytest.raises(InputError, match=r"input 'x' has dtype float64, expected float32"):
        engine.run({**_feeds(), "x": np.ones((2, 3, 8, 8))})


def test_non_array_and_non_dict_feeds(engine):
    with pytest.raises(InputError, match=r"input 'x' must be a numpy array, got list"):
        engine.run({**_feeds(), "x": [[1.0]]})
    with pytest.raises(InputError, match="feeds must be a dict"):
        engine.run([np.ones(1)])


def test_any_batch_size_runs(engine):
    for batch in (1, 5):
        assert engine.run(_feeds(batch))[0].shape == (batch, 4, 8, 8)


def test_nan_and_inf_propagate_without_crash(engine):
    feeds = _feeds()
    feeds["x"][0, 0, 0, 0] = np.nan
    feeds["x"][1, 1, 4, 4] = np.inf
    out, _ = engine.run(feeds)
    assert np.isnan(out[0]).any()  # NaN spreads through the conv window and the softmax
    assert not np.isnan(out[0, :, 7, 7]).any()  # ... but not beyond that window
    assert not np.isfinite(out[1, :, 3:6, 3:6]).all() and np.isfinite(out[1, :, 0, 0]).all()


def test_nan_matches_onnxruntime(engine, onnx_check):
    feeds = _feeds()
    feeds["x"] = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    feeds["x"][0, 1, 2, 3] = np.nan
    feeds["x"][1, 2, 5, 5] = -np.inf
    onnx_check.assert_same(engine.run(feeds), onnx_check.ort_run(_model(), feeds), 1e-5)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_threads(threads):
    with pytest.raises(InputError, match="threads must be a positive integer"):
        Engine(_model(), threads=threads)


def test_missing_file(tmp_path):
    with pytest.raises(EngineError, match=r"does not exist"):
        Engine(tmp_path / "nope.onnx")


def test_truncated_file(tmp_path):
    path = tmp_path / "truncated.onnx"
    data = _model().SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match=r"truncated\.onnx.*truncated or of another format"):
        Engine(path)


@pytest.mark.parametrize("content", [b"this is not an onnx file\n", b"", b"\x00\x01\x02\xff" * 64],
                         ids=["text", "empty", "binary"])
def test_non_onnx_file(tmp_path, content):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(EngineError, match=r"model\.onnx"):
        Engine(path)


def test_unsupported_ops_are_all_listed_at_load():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="ok_relu"),
             helper.make_node("NonMaxSuppression", ["a", "a"], ["b"], name="nms_1"),
             helper.make_node("FusedGemm", ["a", "a"], ["c"], name="ms_gemm", domain="com.microsoft"),
             helper.make_node("MaxPool", ["a"], ["d", "idx"], kernel_shape=[2, 2], name="pool_with_indices")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("b", "c", "d")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(UnsupportedOpError) as err:
        Engine(model)
    msg = str(err.value)
    assert "3 node(s)" in msg
    assert "NonMaxSuppression (node 'nms_1', opset 17)" in msg
    assert "com.microsoft::FusedGemm (node 'ms_gemm')" in msg
    assert "MaxPool (node 'pool_with_indices', opset 17): MaxPool's Indices output" in msg
    assert "ok_relu" not in msg


def test_errors_are_sparsify_errors():
    assert issubclass(UnsupportedOpError, EngineError) and issubclass(InputError, SparsifyError)


def test_model_proto_and_path_load_the_same(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    a, b = Engine(path).run(_feeds()), Engine(_model()).run(_feeds())
    np.testing.assert_array_equal(a[0], b[0])


def test_cli_run_prints_outputs_and_writes_npz(tmp_path, capsys):
    from sparsify.cli import main

    model = tmp_path / "m.onnx"
    onnx.save(_model(), str(model))
    feeds = _feeds(3)
    np.save(tmp_path / "x.npy", feeds["x"])
    np.save(tmp_path / "y.npy", feeds["y"])
    out = tmp_path / "out.npz"
    assert main(["run", str(model), "--input", str(tmp_path / "x.npy"), "--input", f"y={tmp_path / 'y.npy'}",
                 "--threads", "1", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "out: shape [3, 4, 8, 8] float32" in printed and "out2: shape [3, 2] int64" in printed
    with np.load(out) as saved:
        np.testing.assert_array_equal(saved["out2"], np.ones((3, 2), np.int64))


@pytest.mark.parametrize("make_args,message", [
    (lambda d: ["--input", str(d / "x64.npy"), "--input", str(d / "y.npy")],
     "input 'x' has dtype float64, expected float32"),
    (lambda d: ["--input", str(d / "nope.npy")], "nope.npy does not exist"),
    (lambda d: ["--input", f"x={d / 'x.npy'}"], r"missing input(s) ['y']"),
    (lambda d: ["--input", str(d / "x.npy"), "--threads", "0"], "threads must be a positive integer"),
], ids=["dtype", "missing-file", "missing-input", "threads"])
def test_cli_run_errors_are_one_line_with_status_2(tmp_path, capsys, make_args, message):
    from sparsify.cli import main

    model = tmp_path / "m.onnx"
    onnx.save(_model(), str(model))
    np.save(tmp_path / "x.npy", _feeds()["x"])
    np.save(tmp_path / "x64.npy", _feeds()["x"].astype(np.float64))
    np.save(tmp_path / "y.npy", _feeds()["y"])
    assert main(["run", str(model)] + make_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_failing_node_is_named(onnx_check):
    # a symbolic length that the graph's constant cannot broadcast with: fails inside the Add
    graph = helper.make_graph([helper.make_node("Add", ["x", "pos"], ["y"], name="add_positions")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.zeros((1, 4), np.float32), "pos")])
    engine = Engine(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    assert engine.run({"x": np.ones((2, 4), np.float32)})[0].shape == (2, 4)
    with pytest.raises(EngineError, match=r"node 'add_positions' \(Add\) failed on inputs of shapes \[2, 5\], \[1, 4\]"):
        engine.run({"x": np.ones((2, 5), np.float32)})


def _graph_model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _vec(name, shape=("N", 4)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None if shape is None else list(shape))


def _f32(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("build", [
    # a Clip whose bounds are not scalars, fused into the MatMul before it
    lambda: _graph_model([helper.make_node("MatMul", ["x", "W"], ["t"], name="m"),
                          helper.make_node("Clip", ["t", "lo", "hi"], ["y"], name="c")],
                         [_vec("x")], [_vec("y", None)],
                         [numpy_helper.from_array(_f32(4, 3), "W"), numpy_helper.from_array(_f32(2), "lo"),
                          numpy_helper.from_array(_f32(2), "hi")]),
    # a MatMul with one input
    lambda: _graph_model([helper.make_node("MatMul", ["x"], ["y"], name="m")], [_vec("x")], [_vec("y", None)]),
    # a BatchNormalization of 3 channels after a conv of 2
    lambda: _graph_model([helper.make_node("Conv", ["x", "W"], ["t"], name="c"),
                          helper.make_node("BatchNormalization", ["t", "s", "b", "m", "v"], ["y"], name="bn")],
                         [_vec("x", ("N", 1, 8, 8))], [_vec("y", None)],
                         [numpy_helper.from_array(_f32(2, 1, 3, 3), "W")]
                         + [numpy_helper.from_array(_f32(3), k) for k in "sbmv"]),
], ids=["clip-bounds", "matmul-one-input", "bn-channels"])
def test_malformed_graphs_are_engine_errors_at_load(build):
    with pytest.raises(EngineError, match="the graph cannot be planned"):
        Engine(build())


@pytest.mark.parametrize("node,feed,message", [
    (helper.make_node("Cast", ["x"], ["y"], to=999, name="bad_cast"), (2, 4), r"node 'bad_cast' \(Cast\) failed.*KeyError"),
    (helper.make_node("Split", ["x", "s"], ["y", "z"], axis=1, name="bad_split"), (2, 4), "must be non-negative and add up to 4"),
    (helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[20, 20], name="big_pool"), (2, 1, 8, 8),
     r"node 'big_pool'.*larger than the padded input"),
    (helper.make_node("Conv", ["x", "W"], ["y"], strides=[0, 0], name="stride0"), (2, 1, 8, 8), "must be positive"),
    (helper.make_node("Gemm", ["x", "b"], ["y"], name="gemm_vec"), (2, 4), "Gemm takes two matrices"),
], ids=["cast-to", "split-sizes", "pool-window", "conv-stride", "gemm-rank"])
def test_bad_attributes_fail_as_named_engine_errors(node, feed, message):
    inits = [numpy_helper.from_array(np.array([3, 3], np.int64), "s"),
             numpy_helper.from_array(_f32(2, 1, 3, 3), "W"), numpy_helper.from_array(_f32(4), "b")]
    inits = [t for t in inits if t.name in node.input]
    outputs = [_vec(o, None) for o in node.output]
    engine = Engine(_graph_model([node], [_vec("x", ("N",) + feed[1:])], outputs, inits))
    with pytest.raises(EngineError, match=message):
        engine.run({"x": _f32(*feed)})


def test_a_value_written_twice_and_a_future_opset_are_refused():
    twice = _graph_model([helper.make_node("Relu", ["x"], ["y"], name="a"),
                          helper.make_node("Neg", ["x"], ["y"], name="b")], [_vec("x")], [_vec("y", None)])
    with pytest.raises(EngineError, match="'y' is written by node 'a' and by node 'b'"):
        Engine(twice)
    future = _graph_model([helper.make_node("Relu", ["x"], ["y"])], [_vec("x")], [_vec("y", None)], opset=99)
    with pytest.raises(UnsupportedOpError, match="opset 99"):
        Engine(future)


def test_missing_external_data_is_an_engine_error(tmp_path):
    w = numpy_helper.from_array(_f32(4, 3), "W")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    entry = w.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    path = tmp_path / "m.onnx"
    onnx.save(_graph_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_vec("x")], [_vec("y", None)], [w]),
              str(path))
    with pytest.raises(EngineError, match=r"m\.onnx is not a readable ONNX model.*external data"):
        Engine(path)


def test_bad_engine_arguments_are_input_errors(tmp_path, engine):
    for source in (None, 3, onnx.GraphProto()):
        with pytest.raises(InputError, match="path to an .onnx file or an onnx.ModelProto"):
            Engine(source)
    with pytest.raises(EngineError, match="is a directory"):
        Engine(tmp_path)
    with pytest.raises(InputError, match="threads must be at most 1024"):
        Engine(_model(), threads=2**31)
    with pytest.raises(InputError, match="output_names must be a list"):
        engine.run(_feeds(), output_names=3)


def test_unreadable_input_files_are_input_errors(tmp_path):
    from sparsify.engine.engine import read_feeds

    (tmp_path / "empty.npy").write_bytes(b"")
    np.savez(tmp_path / "ok.npz", x=np.ones(3, np.float32))
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    (tmp_path / "text.npy").write_text("a: 1\n")
    for name in ("empty.npy", "cut.npz", "objects.npz", "text.npy"):
        with pytest.raises(InputError, match=f"cannot read .*{name}"):
            read_feeds([str(tmp_path / name)], ["x"])
    with pytest.raises(InputError, match="is a directory"):
        read_feeds([str(tmp_path)], ["x"])


def test_cli_run_without_inputs(tmp_path, capsys):
    """A model without inputs runs with no --input; one with inputs names the missing ones."""
    from sparsify.cli import main

    const = _graph_model([helper.make_node("Relu", ["c"], ["y"])], [], [_vec("y", None)],
                         [numpy_helper.from_array(np.array([-1.0, 2.0], np.float32), "c")])
    onnx.save(const, str(tmp_path / "const.onnx"))
    assert main(["run", str(tmp_path / "const.onnx")]) == 0
    assert "y: shape [2] float32" in capsys.readouterr().out
    onnx.save(_model(), str(tmp_path / "m.onnx"))
    assert main(["run", str(tmp_path / "m.onnx")]) == 2
    assert "missing input(s) ['x', 'y']" in capsys.readouterr().err


def test_matmul_of_two_types_is_refused():
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mixed")
    model = _graph_model([node], [_vec("x")], [_vec("y", None)],
                         [numpy_helper.from_array(np.ones((4, 3), np.int32), "W")])
    with pytest.raises(EngineError, match=r"node 'mixed' \(MatMul\).*types float32 and int32"):
        Engine(model).run({"x": _f32(2, 4)})
