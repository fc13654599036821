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
