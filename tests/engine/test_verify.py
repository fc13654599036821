"""sparsify.engine.verify: the engine against onnxruntime, per output and per node."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsify.cli import main
from sparsify.engine import Engine
from sparsify.engine.verify import _rel_diff, format_verify, verify
from sparsify.errors import InputError

pytest.importorskip("onnxruntime")


def small_model():
    """Conv -> Relu -> MaxPool -> Conv -> Add(constant) -> Sigmoid: values the plan keeps."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal((1, 4, 1, 1)).astype(np.float32), "shift")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], name="conv2"),
             helper.make_node("Mul", ["c2", "c2"], ["sq"], name="square"),
             helper.make_node("Sigmoid", ["sq"], ["y"], name="gate")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_agreeing_model_passes_per_output_and_per_node():
    result = verify(small_model(), batch=2, per_node=True)
    assert result["ok"] and result["first_divergence"] is None
    assert result["outputs"][0]["shape"] == [2, 4, 4, 4] and result["outputs"][0]["rel_diff"] < 1e-5
    compared = {row["name"]: row for row in result["nodes"]}
    # the Conv's output went into its fused ReLU; the ReLU's, the pool's and the product remain
    assert {"r1", "p1", "sq", "y"} <= set(compared) and "c1" not in compared
    assert compared["p1"]["node"] == "pool" and compared["p1"]["op"] == "MaxPool"
    assert all(row["ok"] for row in result["nodes"])
    text = format_verify(result)
    assert "every compared value within 0.0001" in text and "agrees with onnxruntime" in text


def test_the_first_diverging_node_is_named():
    engine = Engine(small_model())
    k = next(i for i, s in enumerate(engine.plan.steps) if s.op == "MaxPool")
    fn, ins, out, free = engine._steps[k]
    engine._steps[k] = (lambda *a: fn(*a) + np.float32(0.01), ins, out, free)  # a kernel gone wrong
    result = verify(engine, per_node=True)
    assert not result["ok"]
    first = result["first_divergence"]
    assert first["name"] == "p1" and first["node"] == "pool" and first["rel_diff"] > 1e-4
    before = [row for row in result["nodes"] if row["name"] == "r1"]
    assert before and before[0]["ok"]  # the value before it still agrees
    assert "first value past 0.0001: 'p1' from node 'pool' (MaxPool)" in format_verify(result)


def test_rel_diff_counts_nan_and_inf_positions():
    ref = np.array([1.0, np.nan, np.inf, -2.0], np.float32)
    assert _rel_diff(ref.copy(), ref) == 0.0
    assert _rel_diff(np.array([1.0, 0.0, np.inf, -2.0], np.float32), ref) == float("inf")
    assert _rel_diff(np.array([1.0, np.nan, -np.inf, -2.0], np.float32), ref) == float("inf")
    assert abs(_rel_diff(np.array([1.0, np.nan, np.inf, -2.2], np.float32), ref) - 0.1) < 1e-6
    assert _rel_diff(np.array([1, 2]), np.array([1, 3])) == float("inf")  # integers: exact


def test_bad_tolerance_and_batch():
    with pytest.raises(InputError, match="tolerance"):
        verify(small_model(), tolerance=float("nan"))
    with pytest.raises(InputError, match="batch must be a positive integer"):
        verify(small_model(), batch=0)


def test_cli_verify(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), str(path))
    assert main(["verify", str(path), "--per-node", "--batch", "3", "--json", str(tmp_path / "v.json")]) == 0
    out = capsys.readouterr().out
    assert "agrees with onnxruntime" in out and "value(s) compared" in out
    saved = json.loads((tmp_path / "v.json").read_text())
    assert saved["ok"] and saved["outputs"][0]["shape"] == [3, 4, 4, 4]
    np.save(tmp_path / "x.npy", np.ones((1, 3, 8, 8), np.float32))
    assert main(["verify", str(path), "--input", str(tmp_path / "x.npy")]) == 0
    assert main(["verify", str(path), "--batch", "0"]) == 2
    assert "--batch must be a positive integer" in capsys.readouterr().err


def test_cli_verify_exits_1_when_outputs_differ(tmp_path, capsys, monkeypatch):
    from sparsify.engine import kernels

    real = kernels.max_pool2d
    monkeypatch.setattr(kernels, "max_pool2d", lambda *a, **k: real(*a, **k) + np.float32(0.01))
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), str(path))
    assert main(["verify", str(path), "--per-node"]) == 1
    out = capsys.readouterr().out
    assert "first value past 0.0001: 'p1' from node 'pool'" in out and "differ from onnxruntime" in out


def test_dataset_check_reports_top1_and_agreement(tmp_path, capsys):
    """A LeNet for the digits data (untrained: the two runtimes must still agree item by item)."""
    import torch

    from sparsify.data import dataset_shape, load_dataset
    from sparsify.export import export
    from sparsify.models import create_model

    classes, kwargs = dataset_shape("digits")
    torch.manual_seed(0)
    net = create_model("lenet", num_classes=classes, **kwargs).eval()
    path = tmp_path / "lenet.onnx"
    export(net, path, load_dataset("digits", "val").inputs[:1], format="fp32")
    result = verify(path, data="digits", limit=100, batch=3, per_node=True)
    ds = result["dataset"]
    assert result["ok"] and ds["items"] == 100 and ds["agreement"] == 100.0
    assert ds["top1"]["engine"] == ds["top1"]["onnxruntime"] and ds["rel_diff"] < 1e-5
    assert result["outputs"][0]["shape"] == [3, classes]
    assert main(["verify", str(path), "--data", "digits", "--limit", "50"]) == 0
    assert "digits (val, 50 items): top-1 engine" in capsys.readouterr().out
    with pytest.raises(InputError, match="give feeds or data"):
        verify(path, {"x": np.zeros((1, 1, 8, 8), np.float32)}, data="digits")
    other = tmp_path / "small.onnx"
    onnx.save(small_model(), str(other))
    with pytest.raises(InputError, match="verify it on the data it was trained for"):
        verify(other, data="digits")
    assert main(["verify", str(path), "--data", "digits", "--limit", "0"]) == 2


def test_a_model_onnxruntime_refuses_is_one_typed_error():
    from sparsify.errors import EngineError

    model = small_model()
    model.ir_version = 99  # the engine runs it; onnxruntime does not know the version
    with pytest.raises(EngineError, match="onnxruntime cannot run this model"):
        verify(model)
