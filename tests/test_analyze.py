import json
import warnings

import pytest
import torch

from sparsify.analyze import analyze, format_report
from sparsify.checkpoint import save_checkpoint
from sparsify.errors import CheckpointError, InputError
from sparsify.models import create_model

torch.set_num_threads(1)


@pytest.fixture
def pruned_lenet():
    torch.manual_seed(0)
    model = create_model("lenet").eval()
    with torch.no_grad():
        w = model.classifier[1].weight  # [128, 1568]
        w[:, : w.shape[1] * 3 // 4] = 0  # 75% zeros
    return model


def test_checkpoint_flops_follow_the_layer_formulas(tmp_path, pruned_lenet):
    path = save_checkpoint(tmp_path / "m.safetensors", pruned_lenet.state_dict())
    report = analyze(path, model="lenet", data="mnist")
    layers = {x["name"]: x for x in report["layers"]}
    # conv 1->16, 3x3 on 28x28: 2 * (16*28*28) * (1*3*3)
    assert layers["features.0.weight"]["dense_flops"] == 2 * 16 * 28 * 28 * 9
    # conv 16->32, 3x3 on 14x14
    assert layers["features.3.weight"]["dense_flops"] == 2 * 32 * 14 * 14 * 16 * 9
    fc1 = layers["classifier.1.weight"]
    assert fc1["dense_flops"] == 2 * 128 * 1568 and fc1["params"] == 128 * 1568
    assert fc1["sparsity"] == pytest.approx(0.75)
    assert fc1["sparse_flops"] == fc1["dense_flops"] // 4
    total = report["total"]
    assert total["dense_flops"] == sum(x["dense_flops"] for x in report["layers"])
    assert total["flops_reduction"] > 1.0
    text = format_report(report)
    assert "classifier.1.weight" in text and "75.00%" in text and "FLOPs reduction" in text
    json.dumps(report)  # the --json output


def test_onnx_matches_the_checkpoint_analysis(tmp_path, pruned_lenet):
    ckpt = save_checkpoint(tmp_path / "m.pt", pruned_lenet.state_dict())
    onnx_path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(pruned_lenet, torch.randn(1, 1, 28, 28), str(onnx_path),
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    from_ckpt = analyze(ckpt, model="lenet")
    from_onnx = analyze(onnx_path)
    assert from_onnx["kind"] == "onnx"
    assert [x["params"] for x in from_onnx["layers"]] == [x["params"] for x in from_ckpt["layers"]]
    assert [x["dense_flops"] for x in from_onnx["layers"]] == [
        x["dense_flops"] for x in from_ckpt["layers"]]
    assert from_onnx["total"]["sparse_flops"] == from_ckpt["total"]["sparse_flops"]
    assert "total" in format_report(from_onnx)


def test_transformer_counts_attention_matmuls_as_other_flops(tmp_path):
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "t.pt", create_model("transformer").state_dict())
    report = analyze(path, model="transformer")
    # scores and weighted values: 2 matmuls x 2 FLOPs x heads*T*T*head_dim, per layer
    assert report["total"]["other_flops"] == 2 * 2 * 2 * 64 * 64 * 128
    assert len(report["layers"]) == 13


def test_without_model_only_tensor_statistics(tmp_path, pruned_lenet):
    path = save_checkpoint(tmp_path / "m.pt", pruned_lenet.state_dict())
    report = analyze(path)
    assert all(x["dense_flops"] is None for x in report["layers"])
    assert "dense_flops" not in report["total"]
    assert "-" in format_report(report)


def test_errors(tmp_path, pruned_lenet):
    with pytest.raises(CheckpointError, match="does not exist"):
        analyze(tmp_path / "missing.pt")
    with pytest.raises(InputError, match="does not exist"):
        analyze(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(InputError, match="cannot read ONNX file"):
        analyze(tmp_path / "bad.onnx")
    path = save_checkpoint(tmp_path / "m.pt", pruned_lenet.state_dict())
    with pytest.raises(CheckpointError, match="does not fit"):
        analyze(path, model="resnet18")
    with pytest.raises(InputError, match="only matters with --model"):
        analyze(path, data="mnist")


def test_onnx_analysis_names_the_layers_the_block_kernel_runs(tmp_path):
    # a conv pruned in 4x1 blocks (four output channels share their inputs) and one pruned loose
    import numpy as np

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 1))
    with torch.no_grad():
        keep = torch.rand(4, 8 * 9) < 0.1
        model[0].weight.mul_(keep.repeat_interleave(4, 0).reshape(16, 8, 3, 3))
        model[2].weight.mul_((torch.rand(16, 16, 1, 1) < 0.1).float())
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.randn(1, 8, 10, 10), str(path), input_names=["x"],
                          dynamo=False)
    report = analyze(path)
    engines = [x["engine"] for x in report["layers"]]
    assert engines == ["sparse (4x1 blocks)", "sparse"], engines
    assert "sparse (4x1 blocks)" in format_report(report)
    assert np.isclose(report["layers"][0]["sparsity"], 1 - keep.float().mean().item())


def test_malformed_onnx_files_are_input_errors(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="is not an ONNX model"):
        analyze(empty)

    def save(name, node, weight):
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
        path = tmp_path / name
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
        return path

    vec = numpy_helper.from_array(np.ones(4, np.float32), "W")
    with pytest.raises(InputError, match=r"node 'fc' \(Gemm\) has a weight of shape \[4\]"):
        analyze(save("gemm.onnx", helper.make_node("Gemm", ["x", "W"], ["y"], name="fc"), vec))
    short = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    short.raw_data = short.raw_data[:10]
    with pytest.raises(InputError, match="initializer 'W' cannot be read"):
        analyze(save("short.onnx", helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"), short))
    # a batched MatMul weight [B, K, N]: K is its second-to-last axis
    batched = numpy_helper.from_array(np.ones((2, 4, 3), np.float32), "W")
    report = analyze(save("batched.onnx", helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"), batched))
    assert report["layers"][0]["params"] == 24
