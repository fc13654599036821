"""Whole models against onnxruntime: torchvision classifiers at 224x224, sparsify's transformer
classifier and a BERT-base-shaped encoder, each dense and with 90% magnitude-pruned weights.

Each model is exported once per test session (TorchScript exporter, opset 17: about 8x faster
than the dynamo exporter on this machine) and pruned in the ONNX file with numpy, so the dense
and the sparse variant share one export. Accuracy: relative error max|a - b| / max|b| <= 1e-4.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sparsify.engine import Engine

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

TOL = 1e-4
SPARSITY = 0.9
# the quick ones run in every test pass; the rest are marked slow (export + run > ~10 s each)
FAST = ["resnet18", "mobilenet_v2", "squeezenet1_1", "shufflenet_v2_x1_0", "transformer"]
SLOW = ["resnet50", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "densenet121",
        "googlenet", "bert_encoder"]


def _torchvision(name: str):
    kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(weights=None, **kw)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial BatchNorm statistics so that folding them is tested
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval(), torch.randn(1, 3, 224, 224, generator=gen), "input"


def _build(name: str):
    from sparsify.models import create_model, sample_input

    if name == "transformer":
        return create_model("transformer").eval(), sample_input("transformer", batch_size=2), "ids"
    if name == "bert_encoder":  # BERT-base shapes: hidden 768, 12 heads, FFN 3072, sequence 128
        model = create_model("transformer", vocab_size=1000, max_len=128, dim=768, layers=2,
                             heads=12, mlp_dim=3072).eval()
        return model, sample_input("transformer", batch_size=1, vocab_size=1000, max_len=128), "ids"
    return _torchvision(name)


def export_onnx(name: str, path) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, x, input_name = _build(name)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False,
                          input_names=[input_name], output_names=["output"],
                          dynamic_axes={input_name: {0: "batch"}, "output": {0: "batch"}})


def prune_onnx(src, dst, sparsity: float = SPARSITY, blocks: bool = False) -> None:
    """Zero the smallest-magnitude ``sparsity`` of every Conv/Gemm/MatMul weight initializer;
    with ``blocks``, Conv and MatMul weights lose whole 4x1 blocks (four consecutive output
    channels at one input position, smallest L1 norm first), which the engine's block kernel
    runs."""
    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    weights = {n.input[1]: n.op_type for n in model.graph.node
               if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1
               and n.input[1] in inits}
    for name, op in sorted(weights.items()):
        w = numpy_helper.to_array(inits[name]).copy()
        k = int(w.size * sparsity)
        if w.ndim < 2 or k == 0:
            continue
        # output channels: a Conv weight's first axis, a MatMul weight's ([in, out]) last
        if blocks and op in ("Conv", "MatMul") and w.shape[0 if op == "Conv" else -1] % 4 == 0:
            groups = (w.reshape(w.shape[0] // 4, 4, -1) if op == "Conv"
                      else w.reshape(-1, w.shape[-1] // 4, 4).transpose(0, 2, 1))
            score = np.abs(groups).sum(axis=1)  # [blocks of 4 rows, positions]
            drop = np.zeros(score.size, bool)
            drop[np.argpartition(score.ravel(), k // 4 - 1)[:k // 4]] = True
            groups *= ~drop.reshape(score.shape)[:, None, :]  # views of w: zeroes w in place
        else:
            w.ravel()[np.argpartition(np.abs(w).ravel(), k - 1)[:k]] = 0
        inits[name].CopyFrom(numpy_helper.from_array(w, name))
    onnx.save(model, str(dst))


@pytest.fixture(scope="session")
def model_file(tmp_path_factory):
    """``model_file(name, pruned)`` -> path of the exported (and pruned) ONNX file, made once."""
    root = tmp_path_factory.mktemp("engine_models")
    made = {}

    def get(name: str, pruned: bool):
        key = (name, pruned)
        if key not in made:
            dense = root / f"{name}.onnx"
            if not dense.exists():
                export_onnx(name, dense)
            made[(name, False)] = dense
            if pruned:
                made[key] = root / f"{name}_pruned{'_4x1' if pruned == '4x1' else ''}.onnx"
                prune_onnx(dense, made[key], blocks=pruned == "4x1")
        return made[key]

    return get


def _feeds(name: str, model_path, batch: int = 1) -> dict:
    from sparsify.models import sample_input

    if name == "transformer":
        return {"ids": sample_input("transformer", batch_size=batch).numpy()}
    if name == "bert_encoder":
        return {"ids": sample_input("transformer", batch_size=batch, vocab_size=1000, max_len=128).numpy()}
    return {"input": np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)}


def _check(name, model_file, onnx_check, pruned: bool, batch: int = 1):
    path = model_file(name, pruned)
    engine = Engine(path, threads=1)
    feeds = _feeds(name, path, batch)
    got, want = engine.run(feeds), onnx_check.ort_run(path, feeds)
    what = {False: "dense", True: "pruned", "4x1": "pruned in 4x1 blocks"}[pruned]
    onnx_check.assert_same(got, want, TOL, what=f"{name} {what}")
    report = engine.report()
    if pruned:
        assert report["sparse_layers"] > 0, report["layers"]
    return report


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned90"])
@pytest.mark.parametrize("name", FAST)
def test_model_matches_onnxruntime(name, pruned, model_file, onnx_check):
    _check(name, model_file, onnx_check, pruned)


@pytest.mark.parametrize("name", ["resnet18", "transformer"])
def test_model_pruned_in_4x1_blocks_runs_the_block_kernel(name, model_file, onnx_check):
    report = _check(name, model_file, onnx_check, "4x1")
    blocked = [row["name"] for row in report["layers"] if row.get("blocks") == "4x1"]
    assert len(blocked) >= report["sparse_layers"] - 2, report["layers"]  # fc/Gemm: unstructured


@pytest.mark.slow
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned90"])
@pytest.mark.parametrize("name", SLOW)
def test_large_model_matches_onnxruntime(name, pruned, model_file, onnx_check):
    _check(name, model_file, onnx_check, pruned)


def test_batch_size_is_dynamic(model_file, onnx_check):
    engine = Engine(model_file("resnet18", True), threads=1)
    for batch in (3, 1):
        feeds = _feeds("resnet18", None, batch)
        onnx_check.assert_same(engine.run(feeds), onnx_check.ort_run(model_file("resnet18", True), feeds), TOL)


@pytest.mark.parametrize("pruned", [True, False], ids=["pruned90", "dense"])
def test_residual_layers_write_into_their_residual(pruned, model_file, onnx_check):
    # every ResNet-18 block ends in a conv + residual add: it takes its input's buffer (the
    # block input is read by the block's first conv too, which runs earlier); 2 threads cover
    # the split paths, batch 2 the image-per-thread one, and the run is repeated so a clobbered
    # constant or input would show
    path = model_file("resnet18", pruned)
    engine = Engine(path, threads=2)
    assert sum("(in place)" in s.name and "Add" in s.op for s in engine.plan.steps) == 8
    for batch in (1, 2):
        feeds = _feeds("resnet18", None, batch)
        x = feeds["input"].copy()
        want = onnx_check.ort_run(path, feeds)
        for _ in range(2):
            onnx_check.assert_same(engine.run(feeds), want, TOL)
        np.testing.assert_array_equal(feeds["input"], x)  # the caller's input is left alone


def test_report_on_pruned_resnet(model_file):
    report = Engine(model_file("resnet18", True)).report()
    convs = [row for row in report["layers"] if row["op"] == "Conv"]
    assert len(convs) == 20 and all(abs(row["sparsity"] - SPARSITY) < 0.01 for row in convs)
    assert report["fraction_of_native_ops"] > 0.9  # only Flatten runs in numpy
    assert report["numpy_ops"] == {"Flatten": 1}


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_onnxruntime_quantized_qdq_model_runs(name, model_file, onnx_check, tmp_path):
    """A QDQ file from onnxruntime's quantize_static (uint8 activations, int8 per-channel weights).

    onnxruntime runs it with integer kernels, the engine in float (weights dequantized at load,
    activations fake-quantized), so roundings at quantization-step boundaries differ and spread
    through the network. The bar: the engine is as close to onnxruntime as onnxruntime's own
    optimized (integer) and unoptimized (float QDQ) executions are to each other.
    """
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([_feeds(name, None, 1) for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    path = tmp_path / f"{name}_qdq.onnx"
    quantize_static(str(model_file(name, False)), str(path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    engine = Engine(path, threads=1)
    assert any(s.op == "QuantizeLinear+DequantizeLinear" for s in engine.plan.steps)
    feeds = _feeds(name, path, 2)
    assert_qdq_close(engine.run(feeds)[0], path, feeds, onnx_check)


def assert_qdq_close(got, path, feeds, onnx_check):
    """The engine (float QDQ) is as close to onnxruntime's integer execution as onnxruntime's
    unoptimized float QDQ execution is (or closer, twice that at most)."""
    import onnxruntime as ort

    fast = onnx_check.ort_run(path, feeds)[0]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    spread = onnx_check.rel_err(plain, fast)
    assert onnx_check.rel_err(got, fast) <= max(2 * spread, 1e-3)
    assert onnx_check.rel_err(got, plain) <= max(2 * spread, 1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_sparsify_export_runs(fmt, tmp_path, onnx_check):
    """Files from ``sparsify.export`` (FP32, and INT8 QDQ with uint8 activations) run here."""
    export = pytest.importorskip("sparsify.export").export
    from sparsify.models import create_model, sample_input

    torch.manual_seed(0)
    model = create_model("resnet18").eval()
    x = sample_input("resnet18", batch_size=2)
    path = tmp_path / f"resnet18_{fmt}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(model, path, x, format=fmt)
    engine = Engine(path, threads=1)
    feeds = {engine.input_names[0]: x.numpy()}
    if fmt == "fp32":
        onnx_check.assert_same(engine.run(feeds), onnx_check.ort_run(path, feeds), TOL)
    else:
        assert any(s.op == "QuantizeLinear+DequantizeLinear" for s in engine.plan.steps)
        assert_qdq_close(engine.run(feeds)[0], path, feeds, onnx_check)
