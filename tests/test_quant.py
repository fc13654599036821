"""sparsify.quant: scale math vs numpy, calibration methods, fake-quant structure, strip."""

import logging

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from sparsify import quant
from sparsify.errors import RecipeError
from sparsify.quant import scales

torch.set_num_threads(1)


class Block(nn.Module):
    """conv-bn-relu, a depthwise conv, a residual add and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.dw(y)) + y)
        return self.fc(y.mean((2, 3)))


def _trained_bn(model, x):
    # give BN non-trivial statistics and affine params so folding is really exercised
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_weight_scales_match_numpy_reference():
    w = torch.randn(6, 3, 3, 3)
    w[2] = 0
    ref = np.abs(w.numpy()).reshape(6, -1).max(axis=1) / 127.0
    ref[2] = np.median(np.delete(ref, 2))  # an all-zero channel: the others' median
    np.testing.assert_allclose(scales.weight_scales(w).numpy(), ref, rtol=1e-6)
    per_tensor = scales.weight_scales(w, per_channel=False).numpy()
    np.testing.assert_allclose(per_tensor, np.full(6, np.abs(w.numpy()).max() / 127), rtol=1e-6)


def test_quantize_weight_is_symmetric_and_keeps_every_zero():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    w[w.abs() < 0.8] = 0.0  # pruned
    w[0, 0] = 1e-4  # far below half a step: must not become a new zero
    s = scales.weight_scales(w)
    q = scales.quantize_weight(w, s)
    assert q.dtype == torch.int8 and int(q.min()) >= -127 and int(q.max()) <= 127
    assert torch.equal(q == 0, w == 0)
    assert int(q[0, 0]) == 1
    ref = np.clip(np.round(w.numpy() / s.numpy()[:, None]), -127, 127)
    ref[0, 0] = 1
    np.testing.assert_array_equal(q.numpy(), ref)
    # fake quant equals the rounded weight and has a straight-through gradient
    wp = w.clone().requires_grad_(True)
    out = scales.fake_quant_weight(wp, s)
    torch.testing.assert_close(out, scales.round_weight(w, s))
    out.sum().backward()
    assert torch.all(wp.grad == 1.0)


def test_act_qparams_asymmetric_uint8():
    scale, zp = scales.act_qparams(-1.0, 3.0)
    assert scale == pytest.approx(4.0 / 255) and zp == round(1.0 / (4.0 / 255))
    scale, zp = scales.act_qparams(0.5, 2.0)  # range widened to contain 0
    assert zp == 0 and scale == pytest.approx(2.0 / 255)
    scale, zp = scales.act_qparams(-2.0, 1.0, symmetric=True)
    assert zp == 128 and scale == pytest.approx(4.0 / 255)
    assert scales.act_qparams(0.0, 0.0) == (1.0, 0)


def _hist(x, bins=2048):
    lo, hi = min(float(x.min()), 0.0), float(x.max())
    h, _ = np.histogram(x, bins=bins, range=(lo, hi))
    return h.astype(np.float64), lo, hi


def test_entropy_clips_heavy_tails_but_not_uniform_data():
    rng = np.random.default_rng(0)
    heavy = np.abs(rng.standard_cauchy(200_000)).clip(max=1e4)
    h, lo, hi = _hist(heavy)
    _, t = scales.entropy_range(h, lo, hi)
    assert t < 0.2 * hi
    uniform = rng.uniform(0, 1, 200_000)
    h, lo, hi = _hist(uniform)
    _, t = scales.entropy_range(h, lo, hi)
    assert t > 0.9 * hi
    # signed data: symmetric threshold, both ends clipped on heavy tails
    signed = rng.standard_cauchy(200_000).clip(-1e3, 1e3)
    h, lo, hi = _hist(signed)
    tlo, thi = scales.entropy_range(h, lo, hi)
    assert lo < tlo < 0 < thi < hi


def test_percentile_range_on_known_distribution():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, 400_000)
    h, lo, hi = _hist(x)
    plo, phi = scales.percentile_range(h, lo, hi, 99.0)
    assert phi == pytest.approx(0.98, abs=0.01) and plo == pytest.approx(-0.98, abs=0.01)


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_calibrate_sets_scales_and_structure(method):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    model = _trained_bn(Block(), x)
    state = quant.calibrate(model, [x[:8], (x[8:], torch.zeros(8))], method=method)
    assert set(state["layers"]) == {"conv1", "dw", "fc"}
    assert state["layers"]["conv1"]["bn"] == "bn1" and state["layers"]["dw"]["bn"] == "bn2"
    # depthwise conv: still one scale per output channel
    assert len(state["layers"]["dw"]["weight_scale"]) == 8
    # dw's unit output feeds the residual add: it gets its own observer
    assert state["layers"]["dw"]["output_scale"] > 0
    # conv1's unit ends in its ReLU module, whose output also feeds the add
    assert state["layers"]["conv1"]["output_act"] == "relu"
    assert state["layers"]["conv1"]["output_zero_point"] == 0
    assert "output_scale" not in state["layers"]["fc"]  # Linear: float output is fine for ORT
    assert all(0 <= e["input_zero_point"] <= 255 for e in state["layers"].values())
    assert state["layers"]["conv1"]["input_zero_point"] > 0  # signed input: asymmetric
    minmax_hi = float(x.max())
    s, zp = state["layers"]["conv1"]["input_scale"], state["layers"]["conv1"]["input_zero_point"]
    hi = (255 - zp) * s
    if method == "minmax":
        assert hi == pytest.approx(minmax_hi, rel=0.02)
    else:
        assert hi <= minmax_hi * 1.01


def test_strip_folds_bn_rounds_weights_and_matches_fake_quant_weights():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    model = _trained_bn(Block(), x)
    with torch.no_grad():
        model.conv1.weight[model.conv1.weight.abs() < 0.1] = 0.0
    zeros = int((model.conv1.weight == 0).sum())
    state = quant.calibrate(model, [x])
    stripped = quant.strip_fake_quant(model).eval()
    assert not any(isinstance(m, (nn.BatchNorm2d, quant.ActQuant)) for m in stripped.modules())
    assert type(stripped.conv1) is nn.Conv2d and stripped.conv1.bias is not None
    w = stripped.conv1.weight.detach()
    s = torch.tensor(state["layers"]["conv1"]["weight_scale"]).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(w / s, torch.round(w / s), atol=1e-4, rtol=0)
    assert int((w == 0).sum()) == zeros
    # the original model with activation fake-quant off computes exactly the stripped graph
    quant.set_quantizing(model, False)
    with torch.no_grad():
        torch.testing.assert_close(stripped(x), model(x), atol=1e-5, rtol=1e-4)
    assert isinstance(model.bn1, nn.BatchNorm2d)  # strip works on a copy


def test_fold_batchnorm_on_plain_model_is_exact():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = _trained_bn(Block(), x)
    with torch.no_grad():
        ref = model(x)
        out = quant.strip_fake_quant(model)(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,pairs", [("resnet18", 20), ("mobilenet_v2", 52)])
def test_torchvision_conv_bn_pairs_found(name, pairs):
    model = getattr(torchvision.models, name)(num_classes=10)
    report = quant.prepare(model)
    assert len(report["bn"]) == pairs and report["traced"]
    assert not report["fallback"]


class WithTransposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.up = nn.ConvTranspose2d(4, 4, 2)

    def forward(self, x):
        return self.up(self.conv(x))


def test_unsupported_layer_is_reported_and_stays_fp32(caplog):
    model = WithTransposed()
    with caplog.at_level(logging.WARNING, logger="sparsify.quant"):
        state = quant.calibrate(model, [torch.randn(2, 3, 8, 8)])
    assert [f["name"] for f in state["fallback"]] == ["up"]
    assert "ConvTranspose2d" in state["fallback"][0]["type"]
    assert "up" in caplog.text and "FP32" in caplog.text
    assert type(model.up) is nn.ConvTranspose2d and quant.is_quantized(model.conv)


def test_ignore_by_type_and_regex_and_unmatched_regex_is_an_error():
    model = Block()
    chosen, ignored, _ = quant.select_modules(model, ignore=["Linear", "re:d.*"])
    assert chosen == ["conv1"] and set(ignored) == {"fc", "dw"}
    with pytest.raises(RecipeError, match="re:nothing"):
        quant.select_modules(model, ignore=["re:nothing.*"])


def test_to_fp16_keeps_layernorm_fp32():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    quant.to_fp16(model)
    assert model[0].weight.dtype == torch.float16 and model[1].weight.dtype == torch.float32
    out = model(torch.randn(3, 8).half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_residual_identity_sees_the_same_quantized_tensor_as_the_conv():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    quant.prepare(model)
    conv1 = model.layer1[1].conv1
    # layer1.1's input feeds conv1 and the identity add: quantized once, at layer1.0's output
    assert conv1._prequantized and conv1._input_all_consumers
    assert any(getattr(h, "__self__", None) is conv1.input_quant
               for h in model.layer1[0]._forward_hooks.values())
    # layer2.0's input feeds conv1 and downsample.0: one shared observer
    assert model.layer2[0].conv1.input_quant is model.layer2[0].downsample[0].input_quant
    # a unit whose output observer already quantizes the tensor lends it to the next layer
    block = Block()
    quant.prepare(block)
    assert block.dw.input_quant is block.conv1.output_quant


def test_strip_leaves_the_original_model_intact():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    model = _trained_bn(Block(), x)
    quant.calibrate(model, [x])
    with torch.no_grad():
        before = model(x)
        quant.strip_fake_quant(model)
        after = model(x)
    torch.testing.assert_close(before, after, atol=0, rtol=0)
    assert model.bn2._forward_hooks  # the output observer hook is still there
