"""`sparsify export`: checkpoint -> checked ONNX from the command line."""

from __future__ import annotations

import json

import onnx
import torch

from sparsify import quant
from sparsify.checkpoint import save_checkpoint
from sparsify.cli import main
from sparsify.models import create_model

torch.set_num_threads(1)
DIGITS = {"in_channels": 1, "image_size": 8}

QAT_RECIPE = """
modifiers:
  - type: EpochRange
    start_epoch: 0.0
    end_epoch: 2.0
  - type: Quantization
    start_epoch: 0.0
    freeze_bn_stats_epoch: 1.0
"""


def _pruned_resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, **DIGITS)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight[torch.rand_like(m.weight) < 0.9] = 0
    return model.eval()


def test_cli_export_fp32(tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    model = _pruned_resnet18()
    save_checkpoint(ckpt, model.state_dict())
    out = tmp_path / "model.onnx"
    rc = main(["export", str(ckpt), "--model", "resnet18", "--data", "digits",
               "--format", "fp32", "--out", str(out), "--json"])
    assert rc == 0 and out.is_file()
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "fp32" and report["checked"]
    zeros = int((model.conv1.weight == 0).sum())
    assert report["zeros"]["conv1.weight"][0] == zeros


def test_cli_export_qat_checkpoint_needs_its_recipe(tmp_path, capsys):
    model = _pruned_resnet18()
    quant.prepare(model)
    quant.calibrate(model, [torch.randn(16, 1, 8, 8)])
    ckpt = tmp_path / "qat.pt"
    save_checkpoint(ckpt, model.state_dict())
    recipe = tmp_path / "qat.yaml"
    recipe.write_text(QAT_RECIPE)
    out = tmp_path / "q.onnx"

    rc = main(["export", str(ckpt), "--model", "resnet18", "--data", "digits",
               "--format", "int8", "--out", str(out)])
    assert rc == 2 and not out.exists()
    assert "holds fake-quantization scales" in capsys.readouterr().err

    rc = main(["export", str(ckpt), "--model", "resnet18", "--data", "digits", "--format",
               "int8", "--recipe", str(recipe), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "int8 from qat" in capsys.readouterr().out
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert "Quantization" in meta["sparsify.recipe"]


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, _pruned_resnet18().state_dict())
    rc = main(["export", str(ckpt), "--model", "resnet18", "--data", "digits",
               "--format", "fp32", "--out", str(tmp_path / "nope" / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: cannot write") and err.count("\n") == 1
    rc = main(["export", str(ckpt), "--model", "resnet18", "--format", "fp32",
               "--out", str(tmp_path / "m.onnx")])  # mnist shapes: 28x28, but 10 classes fit
    assert rc == 0
    rc = main(["export", str(ckpt), "--model", "resnet18", "--data", "digits", "--num-classes",
               "7", "--format", "fp32", "--out", str(tmp_path / "m.onnx")])
    assert rc == 2 and "fc.weight" in capsys.readouterr().err


def test_cli_export_bad_numbers_are_one_line_and_write_nothing(tmp_path, capsys):
    from sparsify.export import MAX_OPSET, MIN_OPSET

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "lenet.pt",
                           create_model("lenet", num_classes=10, **DIGITS).state_dict())
    out = tmp_path / "m.onnx"
    base = ["export", str(ckpt), "--model", "lenet", "--data", "digits", "--out", str(out)]
    cases = [
        (["--format", "fp32", "--opset", "99999"], f"opset 99999 is not supported: torch's "
                                                  f"exporter writes opsets {MIN_OPSET} to "
                                                  f"{MAX_OPSET}"),
        (["--format", "fp32", "--opset", str(MAX_OPSET + 1)], "--opset"),
        (["--format", "fp32", "--num-classes", "-5"], "--num-classes (num_classes) must be a "
                                                      "positive integer, got -5"),
        (["--format", "fp32", "--num-classes", "0"], "got 0"),
        (["--format", "int8", "--calibration-data", "digits", "--calibration-batches", "-1"],
         "--calibration-batches (num_batches) must be a positive integer, got -1"),
    ]
    for extra, expected in cases:
        rc = main(base + extra)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert expected in err and "Traceback" not in err, err
        assert not out.exists() and list(tmp_path.iterdir()) == [ckpt]
    assert MIN_OPSET <= 18 <= MAX_OPSET
