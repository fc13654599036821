"""sparsify.export: checked ONNX for FP32 / FP16 / INT8, atomic writes, errors a user can cause."""

from __future__ import annotations

import logging
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from sparsify import export_checks, quant
from sparsify.errors import ExportError
from sparsify.export import export, read_metadata
from sparsify.models import create_model, sample_input

torch.set_num_threads(1)

SMALL_IMAGE = {"in_channels": 1, "image_size": 16}
SMALL_TEXT = {"vocab_size": 100, "max_len": 16, "dim": 32, "layers": 1, "heads": 4,
              "mlp_dim": 64}


class TinyNet(nn.Module):
    """Conv-BN-ReLU x2, pool, Linear: exports in about a second."""

    def __init__(self, extra: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.extra = extra
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        if self.extra is not None:
            x = self.extra(x)
        return self.fc(x.mean(dim=(2, 3)))


def prune_(model: nn.Module, sparsity: float = 0.8, seed: int = 0) -> nn.Module:
    """Zero the smallest weights of every Conv/Linear, give BNs non-trivial statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                k = int(sparsity * w.numel())
                if k:
                    cut = w.abs().flatten().kthvalue(k).values
                    w[w.abs() <= cut] = 0
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
    return model.eval()


def zeros_by_weight(model: nn.Module) -> dict[str, int]:
    return {f"{n}.weight": int((m.weight == 0).sum()) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def no_temp_files(directory) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return prune_(TinyNet())


@pytest.fixture
def tiny_input():
    return torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# FP32


def test_fp32_resnet18_keeps_zeros_folds_bn_dynamic_batch(tmp_path):
    model = prune_(create_model("resnet18", **SMALL_IMAGE))
    x = sample_input("resnet18", 1, **SMALL_IMAGE)
    path = tmp_path / "r18.onnx"
    report = export(model, path, x, format="fp32", recipe="recipes/resnet18_mnist_prune90.yaml")

    assert path.is_file() and no_temp_files(tmp_path)
    assert report.checked and report.max_rel_error <= 1e-4 and report.top1_agreement == 1.0
    assert 1 in report.check_batch_sizes and 16 in report.check_batch_sizes
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version >= 17
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    # zeros per layer, read from the file, equal the model's
    file_zeros = {k: z for k, (z, _) in export_checks.zero_counts(proto).items()}
    assert file_zeros == zeros_by_weight(model)
    assert report.zeros == {k: (z, n) for k, (z, n) in report.zeros.items()}
    assert {k: z for k, (z, _) in report.zeros.items()} == zeros_by_weight(model)
    # parameter names survive the exporter
    assert "layer1.0.conv1.weight" in {t.name for t in proto.graph.initializer}
    meta = read_metadata(path)
    assert meta["format"] == "fp32" and "MagnitudePruning" in meta["recipe"]
    assert meta["sparsity"]["conv1.weight"]["zeros"] == file_zeros["conv1.weight"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 16):
        xb = torch.randn(batch, 1, 16, 16)
        with torch.no_grad():
            ref = model(xb).numpy()
        out = session.run(None, {"input": xb.numpy()})[0]
        assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_transformer_fp32_and_fp16(tmp_path):
    model = prune_(create_model("transformer", **SMALL_TEXT))
    x = sample_input("transformer", 2, vocab_size=100, max_len=16)
    r32 = export(model, tmp_path / "t32.onnx", x, format="fp32")
    r16 = export(model, tmp_path / "t16.onnx", x, format="fp16")
    assert r32.max_rel_error <= 1e-4 and r16.max_rel_error <= 1e-2
    # MatMul weights (stored [in, out]) keep the Linear's name and its zeros
    assert r32.zeros == r16.zeros
    assert {k: z for k, (z, _) in r32.zeros.items()} == zeros_by_weight(model)
    p16 = onnx.load(str(tmp_path / "t16.onnx"))
    inits = {t.name: t for t in p16.graph.initializer}
    assert inits["layers.0.fc1.weight"].data_type == TensorProto.FLOAT16
    # normalization stays FP32 between casts
    ln = next(n for n in p16.graph.node if n.op_type == "LayerNormalization")
    assert inits[ln.input[1]].data_type == TensorProto.FLOAT
    assert p16.graph.input[0].type.tensor_type.elem_type == TensorProto.INT64
    assert p16.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert (tmp_path / "t16.onnx").stat().st_size < 0.6 * (tmp_path / "t32.onnx").stat().st_size


def test_fp16_float_io_and_half_initializers(tiny, tiny_input, tmp_path):
    report = export(tiny, tmp_path / "h.onnx", tiny_input, format="fp16")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "h.onnx").stat().st_mode & 0o777 == 0o666 & ~umask  # not left private
    proto = onnx.load(str(tmp_path / "h.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    conv_w = {n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    assert all(t.data_type == TensorProto.FLOAT16 for t in proto.graph.initializer
               if t.name in conv_w)
    assert report.max_rel_error <= 1e-2
    assert {k: z for k, (z, _) in report.zeros.items()} == zeros_by_weight(tiny)


def test_fp16_keeps_tiny_weights_nonzero():
    from sparsify.export_graph import half_tensor as _half_tensor

    t = numpy_helper.from_array(np.array([1e-9, -1e-9, 0.0, 1.0], np.float32), "w")
    h = numpy_helper.to_array(_half_tensor(t))
    assert h.dtype == np.float16 and list(h != 0) == [True, True, False, True]


def test_compressed_sparse_storage(tiny, tiny_input, tmp_path):
    dense = export(tiny, tmp_path / "d.onnx", tiny_input)
    packed = export(tiny, tmp_path / "s.onnx", tiny_input, compress_sparse=True)
    proto = onnx.load(str(tmp_path / "s.onnx"))
    assert packed.compressed and len(proto.graph.sparse_initializer) >= 2
    assert packed.file_size < dense.file_size
    assert packed.zeros == dense.zeros  # read back through the sparse initializers
    assert packed.max_rel_error <= 1e-4  # onnxruntime ran the compressed file


def test_compressed_int8_weights(tiny_input, tmp_path):
    torch.manual_seed(0)
    model = prune_(TinyNet(), sparsity=0.95)  # int8 COO pays off above 89% zeros
    report = export(model, tmp_path / "q.onnx", tiny_input, format="int8", compress_sparse=True)
    proto = onnx.load(str(tmp_path / "q.onnx"))
    names = {sp.values.name for sp in proto.graph.sparse_initializer}
    assert "conv2.weight_quantized" in names
    assert report.compressed and report.file_size < report.dense_file_size
    assert {k: z for k, (z, _) in report.zeros.items()} == zeros_by_weight(model)


# ---------------------------------------------------------------------------------------------
# INT8


def test_int8_calibration_resnet18(tmp_path, caplog):
    torch.manual_seed(0)
    model = prune_(create_model("resnet18", **SMALL_IMAGE))
    x = sample_input("resnet18", 1, **SMALL_IMAGE)
    calib = [torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(i))
             for i in range(3)]
    fp32 = export(model, tmp_path / "f.onnx", x)
    with caplog.at_level(logging.INFO, logger="sparsify.export"):
        report = export(model, tmp_path / "q.onnx", x, format="int8", calibration_data=calib)
    assert "calibrating" in caplog.text
    assert report.quantization == "calibration"
    assert report.top1_agreement >= export_checks.MIN_TOP1_AGREEMENT["int8"]
    assert report.file_size <= 0.3 * fp32.file_size
    proto = onnx.load(str(tmp_path / "q.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = {t.name: t for t in proto.graph.initializer}
    weight_dq = [n for n in proto.graph.node
                 if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert any(inits[n.input[0]].data_type == TensorProto.INT8 for n in weight_dq)
    act_q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert all(inits[n.input[2]].data_type == TensorProto.UINT8 for n in act_q)
    # every pruned zero is an int8 zero; counts equal the model's unless rounding added some
    for name, zeros in zeros_by_weight(model).items():
        assert report.zeros[name][0] == zeros + report.new_zeros.get(name, 0)


def test_int8_check_runs_the_file_as_written_where_fused_kernels_saturate(tmp_path, caplog,
                                                                           monkeypatch):
    torch.manual_seed(0)
    model = prune_(create_model("resnet18", **SMALL_IMAGE))
    x = sample_input("resnet18", 1, **SMALL_IMAGE)
    calib = [torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(i))
             for i in range(3)]
    monkeypatch.setattr(export_checks, "fused_int8_exact", lambda: False)
    with caplog.at_level(logging.WARNING, logger="sparsify.export"):
        report = export(model, tmp_path / "q.onnx", x, format="int8", calibration_data=calib)
    assert not report.check_optimized and "saturating int16" in caplog.text
    # as written, the file computes what the fake-quantized model does
    assert report.top1_agreement == 1.0 and report.max_rel_error < 0.01
    monkeypatch.setattr(export_checks, "fused_int8_exact", lambda: True)
    assert export(model, tmp_path / "f.onnx", x).check_optimized  # FP32 always runs optimized


def test_int8_qat_model_uses_its_scales(tiny, tiny_input, tmp_path):
    quant.prepare(tiny)
    tiny.train()
    with torch.no_grad():  # a few QAT-style forward passes: EMA observers see training data
        for i in range(4):
            tiny(torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(i)))
    tiny.eval()
    scale_before = float(tiny.conv1.input_quant.scale)
    report = export(tiny, tmp_path / "qat.onnx", tiny_input, format="int8")
    assert report.quantization == "qat"
    assert float(tiny.conv1.input_quant.scale) == scale_before  # the caller's model untouched
    proto = onnx.load(str(tmp_path / "qat.onnx"))
    scales = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    q_in = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    assert np.isclose(float(scales[q_in.input[1]]), scale_before)


def test_int8_transformer_reports_embedding_fallback(tmp_path):
    model = prune_(create_model("transformer", **SMALL_TEXT))
    x = sample_input("transformer", 4, vocab_size=100, max_len=16)
    report = export(model, tmp_path / "t8.onnx", x, format="int8")
    assert any(f.startswith("embed (Embedding)") for f in report.fallbacks)
    assert report.top1_agreement >= 0.9
    assert {k: z for k, (z, _) in report.zeros.items()}.keys() == zeros_by_weight(model).keys()


def test_int8_unsupported_layer_stays_fp32_and_is_reported(tmp_path, tiny_input):
    torch.manual_seed(0)
    model = prune_(TinyNet(extra=nn.ConvTranspose2d(16, 16, 1)))
    report = export(model, tmp_path / "fb.onnx", tiny_input, format="int8")
    assert any("extra (ConvTranspose2d)" in f for f in report.fallbacks)
    proto = onnx.load(str(tmp_path / "fb.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    deconv = next(n for n in proto.graph.node if n.op_type == "ConvTranspose")
    assert inits[deconv.input[1]].data_type == TensorProto.FLOAT


QAT_RECIPE = """
modifiers:
  - type: EpochRange
    start_epoch: 0.0
    end_epoch: 2.0
  - type: Quantization
    start_epoch: 0.0
"""

CALIBRATION_RECIPE = """
modifiers:
  - type: EpochRange
    start_epoch: 0.0
    end_epoch: 1.0
  - type: Quantization
    start_epoch: 1.0
    method: percentile
"""


def test_int8_recipe_expects_qat_but_model_has_none(tiny, tiny_input, tmp_path):
    with pytest.raises(ExportError, match="no quantization structure") as err:
        export(tiny, tmp_path / "x.onnx", tiny_input, format="int8", recipe=QAT_RECIPE)
    assert "model_from_checkpoint" in str(err.value)
    assert not (tmp_path / "x.onnx").exists() and no_temp_files(tmp_path)


def test_int8_calibration_only_recipe_is_honoured(tiny, tiny_input, tmp_path):
    report = export(tiny, tmp_path / "c.onnx", tiny_input, format="int8",
                    recipe=CALIBRATION_RECIPE)
    assert report.quantization == "calibration"
    assert "Quantization" in read_metadata(tmp_path / "c.onnx")["recipe"]


# ---------------------------------------------------------------------------------------------
# errors and atomicity


def test_wrong_shape_sample_input(tiny, tmp_path):
    with pytest.raises(ExportError, match=r"does not run on the sample input of shape \[2, 3"):
        export(tiny, tmp_path / "m.onnx", torch.randn(2, 3, 12, 12))
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tiny, tiny_input, tmp_path):
    with pytest.raises(ExportError, match="unknown export format 'int4'"):
        export(tiny, tmp_path / "m.onnx", tiny_input, format="int4")
    with pytest.raises(ExportError, match="opset 13"):
        export(tiny, tmp_path / "m.onnx", tiny_input, opset=13)
    with pytest.raises(ExportError, match="sample_input must be a Tensor"):
        export(tiny, tmp_path / "m.onnx", [[1.0, 2.0]])


def test_unwritable_output_path(tiny, tiny_input, tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export(tiny, tmp_path / "missing" / "m.onnx", tiny_input)
    with pytest.raises(ExportError, match="is a directory"):
        export(tiny, tmp_path, tiny_input)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root ignores modes
            with pytest.raises(ExportError, match="not writable"):
                export(tiny, locked / "m.onnx", tiny_input)
    finally:
        locked.chmod(0o700)


def test_failed_check_leaves_no_file(tiny, tiny_input, tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")  # an earlier export keeps its content

    def failing(result, fmt):
        raise ExportError(f"output check ({fmt}): forced failure")

    monkeypatch.setattr(export_checks, "enforce_tolerance", failing)
    with pytest.raises(ExportError, match="forced failure"):
        export(tiny, path, tiny_input)
    assert path.read_bytes() == b"old" and no_temp_files(tmp_path)


def test_interrupted_write_leaves_no_file(tiny, tiny_input, tmp_path, monkeypatch):
    real_save = onnx.save

    def half_save(proto, f, *a, **kw):
        with open(f, "wb") as fh:  # half a file, then the process is interrupted
            fh.write(proto.SerializeToString()[:1000])
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        export(tiny, tmp_path / "m.onnx", tiny_input)
    monkeypatch.setattr(onnx, "save", real_save)
    assert list(tmp_path.iterdir()) == []


def test_tolerance_violation_is_named(tiny, tiny_input, tmp_path, monkeypatch):
    monkeypatch.setitem(export_checks.TOLERANCES, "fp32", 0.0)
    original = export_checks.compare_outputs

    def noisy(session, batches, refs, fmt, **kw):
        return original(session, batches, [[r + 1.0 for r in ref] for ref in refs], fmt, **kw)

    monkeypatch.setattr(export_checks, "compare_outputs", noisy)
    with pytest.raises(ExportError, match=r"output check \(fp32\).*above the 0 tolerance"):
        export(tiny, tmp_path / "m.onnx", tiny_input)
    assert list(tmp_path.iterdir()) == []


def test_sparsity_check_catches_lost_zeros(tiny, tiny_input, tmp_path):
    export(tiny, tmp_path / "m.onnx", tiny_input)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    w = next(t for t in proto.graph.initializer if t.name == "conv2.weight")
    exported = numpy_helper.to_array(w).copy()
    given = {"conv2.weight": tiny.conv2.weight.detach().numpy()}
    counts, added = export_checks.check_sparsity(proto, {"conv2.weight": exported}, given, "fp32")
    assert counts["conv2.weight"][0] == int((given["conv2.weight"] == 0).sum()) and not added
    broken = exported.copy()
    broken[broken == 0] = 1e-3
    w.CopyFrom(numpy_helper.from_array(broken, "conv2.weight"))
    with pytest.raises(ExportError, match="'conv2.weight' has 0 zeros in the file"):
        export_checks.check_sparsity(proto, {"conv2.weight": exported}, given, "fp32")


# ---------------------------------------------------------------------------------------------
# the larger models (slow on two cores)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_mobilenet_v2_depthwise(fmt, tmp_path):
    model = prune_(create_model("mobilenet_v2", **SMALL_IMAGE), sparsity=0.7)
    x = sample_input("mobilenet_v2", 2, **SMALL_IMAGE)
    report = export(model, tmp_path / "m.onnx", x, format=fmt)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    groups = [a.i for n in proto.graph.node if n.op_type == "Conv"
              for a in n.attribute if a.name == "group"]
    assert max(groups) > 1  # depthwise convs exported as grouped Conv
    assert {k: z for k, (z, _) in report.zeros.items()} == {
        k: v + report.new_zeros.get(k, 0) for k, v in zeros_by_weight(model).items()}


@pytest.mark.slow
def test_resnet50_fp32(tmp_path):
    model = prune_(create_model("resnet50", **SMALL_IMAGE))
    report = export(model, tmp_path / "r50.onnx", sample_input("resnet50", 1, **SMALL_IMAGE))
    assert report.max_rel_error <= 1e-4
    assert {k: z for k, (z, _) in report.zeros.items()} == zeros_by_weight(model)


def test_sparsify_export_is_callable_after_module_import(tiny, tiny_input, tmp_path):
    import sparsify
    import sparsify.export  # binds the package attribute to the module

    report = sparsify.export(tiny, tmp_path / "m.onnx", tiny_input, check=False)
    assert report.path.is_file() and not report.checked
