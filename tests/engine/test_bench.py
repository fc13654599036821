"""sparsify.engine.bench, Engine.profile and `sparsify benchmark`: what they measure and report,
and their errors. Speed itself is measured by scripts, never asserted here."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsify.cli import main
from sparsify.engine import Engine
from sparsify.engine.bench import benchmark, format_benchmark, sample_feeds, time_blocks
from sparsify.errors import InputError


def conv_model(batch="N", spatial=8, extra_symbolic=False):
    """Conv(+bias) -> Relu -> Conv -> GlobalAveragePool -> Flatten -> Gemm; 70% of weights zero."""
    rng = np.random.default_rng(0)

    def weight(shape):
        w = rng.standard_normal(shape).astype(np.float32)
        return w * (rng.random(shape) >= 0.7)

    inits = [numpy_helper.from_array(weight((16, 3, 3, 3)), "w1"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1"),
             numpy_helper.from_array(weight((32, 16, 1, 1)), "w2"),
             numpy_helper.from_array(weight((10, 32)), "w3")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w3"], ["y"], name="fc", transB=1)]
    h = "H" if extra_symbolic else spatial
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, h, spatial])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(), path)
    return path


def test_benchmark_times_both_runtimes_on_the_same_inputs(model_path):
    r = benchmark(model_path, batch=3, threads=1, repeats=4, warmup=1, profile=True)
    assert r["batch"] == r["items_per_call"] == 3
    assert set(r["latency"]) == {"engine", "onnxruntime"}
    for name, stats in r["latency"].items():
        assert stats["n"] >= 4 and 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
        assert r["items_per_s"][name] == pytest.approx(1e3 * 3 / stats["p50_ms"])
    assert r["speedup_vs_onnxruntime"] == pytest.approx(
        r["latency"]["onnxruntime"]["p50_ms"] / r["latency"]["engine"]["p50_ms"])
    assert r["max_rel_diff"] < 1e-5
    assert r["report"]["num_layers"] == 3
    engine = Engine(model_path)
    assert [row["name"] for row in r["profile"]] == [s.name for s in engine.plan.steps]
    text = format_benchmark(r)
    assert "engine speedup vs onnxruntime" in text and "slowest" in text and "conv1" in text
    json.dumps(r)  # the CLI writes it as JSON


def test_engine_only_and_given_feeds(model_path):
    x = np.random.default_rng(1).random((2, 3, 8, 8)).astype(np.float32)
    r = benchmark(model_path, feeds={"x": x}, repeats=2, warmup=0, onnxruntime=False)
    assert set(r["latency"]) == {"engine"} and r["batch"] == 2
    assert "speedup_vs_onnxruntime" not in r and "max_rel_diff" not in r


def test_profile_rows_name_the_kernel_of_each_layer(model_path):
    engine = Engine(model_path, threads=1)
    rows = engine.profile({"x": np.ones((1, 3, 8, 8), np.float32)}, repeats=3)
    assert len(rows) == len(engine.plan.steps)
    assert all(row["ms"] >= 0 for row in rows)
    kinds = {row["name"].split("+")[0]: row["kind"] for row in rows}
    layers = {layer["name"]: layer["kind"] for layer in engine.report()["layers"]}
    for name, kind in layers.items():
        assert kinds[name] == kind
    assert kinds["pool"] is None
    with pytest.raises(InputError, match="repeats"):
        engine.profile({"x": np.ones((1, 3, 8, 8), np.float32)}, repeats=0)
    with pytest.raises(InputError, match="missing input"):
        engine.profile({}, repeats=1)


def test_sample_feeds_fill_the_batch_axis_and_refuse_other_symbols(tmp_path):
    feeds = sample_feeds(Engine(conv_model()), batch=5)
    assert feeds["x"].shape == (5, 3, 8, 8) and feeds["x"].dtype == np.float32
    with pytest.raises(InputError, match=r"symbolic size 'H' on axis 2.*--input"):
        sample_feeds(Engine(conv_model(extra_symbolic=True)))


def test_sample_feeds_draw_token_ids_from_the_embedding_rows():
    table = numpy_helper.from_array(np.random.default_rng(0).random((37, 4)).astype(np.float32), "emb")
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"]),
             helper.make_node("ReduceSum", ["e"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", 50])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    ids = sample_feeds(Engine(model), batch=4)["ids"]
    assert ids.shape == (4, 50) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < 37 and len(np.unique(ids)) > 10


def test_time_blocks_alternates_and_counts():
    calls = []
    res = time_blocks({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                      warmup=1, repeats=6, blocks=3, settle_s=0.0)
    assert res["a"]["n"] == res["b"]["n"] == 6
    # blocks alternate: a's block (1 warm-up + 2 timed), then b's, three times
    assert calls == (["a"] * 3 + ["b"] * 3) * 3


def test_bad_arguments_raise(model_path):
    with pytest.raises(InputError, match="batch"):
        benchmark(model_path, batch=0)
    with pytest.raises(InputError, match="repeats"):
        benchmark(model_path, repeats=0)


def test_cli_benchmark(model_path, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    assert main(["benchmark", str(model_path), "--batch", "2", "--threads", "1", "--repeats", "3",
                 "--warmup", "0", "--profile", "--top", "2", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime" in out and "engine speedup vs onnxruntime" in out and "slowest 2 steps" in out
    assert json.loads(out_json.read_text())["batch"] == 2
    np.save(tmp_path / "x.npy", np.ones((4, 3, 8, 8), np.float32))
    assert main(["benchmark", str(model_path), "--input", str(tmp_path / "x.npy"), "--repeats", "2",
                 "--no-onnxruntime"]) == 0
    assert "batch 4" in capsys.readouterr().out


@pytest.mark.parametrize("argv, pattern", [
    (["--batch", "0"], r"--batch must be a positive integer"),
    (["--repeats", "-1"], r"--repeats must be a positive integer"),
    (["--threads", "0"], r"threads must be a positive integer"),
])
def test_cli_benchmark_bad_arguments_are_one_line(model_path, capsys, argv, pattern):
    assert main(["benchmark", str(model_path), *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert pytest.importorskip("re").search(pattern, lines[0]), lines[0]


def test_cli_benchmark_missing_file(tmp_path, capsys):
    assert main(["benchmark", str(tmp_path / "nope.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_model_onnxruntime_refuses_is_one_typed_error(tmp_path, capsys):
    """The engine runs it; onnxruntime does not know its IR version: a typed error pointing at
    --no-onnxruntime, which then times the engine alone."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 99
    path = tmp_path / "future_ir.onnx"
    onnx.save(model, str(path))
    from sparsify.errors import EngineError

    with pytest.raises(EngineError, match=r"onnxruntime cannot run .*future_ir\.onnx.*--no-onnxruntime"):
        benchmark(path, repeats=2, warmup=1)
    assert main(["benchmark", str(path), "--repeats", "2"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert benchmark(path, repeats=2, warmup=1, onnxruntime=False)["items_per_call"] == 1


def test_a_model_without_inputs_is_timed():
    graph = helper.make_graph([helper.make_node("Relu", ["c"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ones(4, np.float32), "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert benchmark(model, repeats=2, warmup=1, onnxruntime=False)["items_per_call"] == 1
