"""QuantizationModifier: recipe validation, QAT schedule in a session, SparseML mapping."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sparsify
from sparsify import quant
from sparsify.errors import RecipeError
from sparsify.modifiers import MODIFIERS
from sparsify.modifiers.quantization import QuantizationModifier, from_sparseml
from sparsify.recipe import load_recipe

torch.set_num_threads(1)


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def data(n=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return x, y


def run(model, recipe, steps, steps_per_epoch=4, lr=0.05):
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    session = sparsify.apply(model, recipe, optimizer=opt, steps_per_epoch=steps_per_epoch)
    model.train()
    for i in range(steps):
        xb, yb = x[(i * 16) % 64:][:16], y[(i * 16) % 64:][:16]
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        session.step()
    return session


def recipe_error(text):
    with pytest.raises(RecipeError) as info:
        load_recipe(text)
    return str(info.value)


def test_in_the_modifier_table():
    assert MODIFIERS["Quantization"] is QuantizationModifier


@pytest.mark.parametrize("scheme,field", [
    ("{weights: {num_bits: 4}}", "scheme.weights.num_bits"),
    ("{weights: {symmetric: false}}", "scheme.weights.symmetric"),
    ("{input_activations: {strategy: channel}}", "scheme.input_activations.strategy"),
    ("{input_activations: {num_bits: 16}}", "scheme.input_activations.num_bits"),
    ("{weights: {bits: 8}}", "scheme.weights.bits"),
    ("W4A16", "W4A16"),
])
def test_bad_scheme_is_a_recipe_error_naming_the_field(scheme, field):
    msg = recipe_error(f"modifiers:\n  - type: Quantization\n    scheme: {scheme}\n")
    assert field in msg and "Quantization" in msg


def test_presets_and_explicit_scheme():
    r = load_recipe("modifiers:\n  - {type: Quantization, scheme: fp16}\n")
    assert r.modifiers[0].precision == "fp16"
    r = load_recipe("modifiers:\n  - type: Quantization\n    scheme:\n      weights: "
                    "{num_bits: 8, symmetric: true, strategy: tensor}\n"
                    "      input_activations: {num_bits: 8, symmetric: true}\n")
    s = r.modifiers[0].quant_scheme()
    assert r.modifiers[0].precision == "int8"
    assert not s.weight_per_channel and s.act_symmetric
    msg = recipe_error("modifiers:\n  - {type: Quantization, start_epoch: 2, "
                       "freeze_bn_stats_epoch: 1}\n")
    assert "freeze_bn_stats_epoch" in msg
    assert "observer_epoch" in recipe_error(
        "modifiers:\n  - {type: Quantization, disable_quantization_observer_epochs: 1}\n")


def test_ignore_that_matches_nothing_fails_at_apply():
    with pytest.raises(RecipeError, match="re:nope"):
        sparsify.apply(net(), "modifiers:\n  - {type: Quantization, ignore: ['re:nope']}\n")


QAT = """
modifiers:
  - type: ConstantPruning
    params: __ALL_PRUNABLE__
  - type: Quantization
    start_epoch: 1.0
    freeze_bn_stats_epoch: 2.0
    disable_quantization_observer_epoch: 2.5
"""


def test_qat_schedule_and_pruned_zeros_stay_zero():
    model = net()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight[m.weight.abs() < m.weight.abs().median()] = 0.0
    zeros = {n: p == 0 for n, p in model.named_parameters() if p.dim() > 1}
    session = run(model, QAT, steps=3)
    assert not any(quant.is_quantized(m) for m in model.modules())  # epoch 0.75 < 1.0
    session.step()  # epoch 1.0: structure inserted, same objects, same parameter names
    assert quant.is_quantized(model[0]) and quant.is_quantized(model[8])
    assert {n for n, _ in model.named_parameters()} >= set(zeros)
    x, y = data()
    opt = session.state.optimizer
    for i in range(7):  # to epoch 2.75: BN frozen at 2.0, observers off at 2.5
        loss = nn.functional.cross_entropy(model(x[:16]), y[:16])
        opt.zero_grad()
        loss.backward()
        opt.step()
        session.step()
        if session.epoch == 2.5:
            frozen = float(model[3].input_quant.scale), model[0].weight_scale.clone()
    assert type(model[1]) is quant.modules.FrozenBatchNorm2d
    assert float(model[3].input_quant.scale) == frozen[0]
    assert torch.equal(model[0].weight_scale, frozen[1])
    model = session.finalize()
    state = quant.quantization_state(model)
    assert set(state["layers"]) == {"0", "3", "8"}
    for n, was_zero in zeros.items():
        p = model.get_parameter(n)
        assert torch.equal(p == 0, was_zero), n
        layer = quant.quant_layers(model)[n.rsplit(".", 1)[0]]
        fq = quant.scales.fake_quant_weight(p, quant.scales.weight_scales(p))
        assert torch.equal(fq == 0, was_zero)
    stripped = quant.strip_fake_quant(model)
    for n, was_zero in zeros.items():
        assert torch.equal(stripped.get_parameter(n) == 0, was_zero)


def test_short_qat_lowers_the_fake_quant_loss():
    # a short QAT run must not break the model: its fake-quant loss ends below its start
    model = net()
    x, y = data()
    session = run(model, "modifiers:\n  - {type: Quantization, start_epoch: 0.0}\n", steps=1)
    first = float(nn.functional.cross_entropy(model(x), y).detach())
    for _ in range(3):
        run_session_steps(session, model, x, y, 8)
    assert float(nn.functional.cross_entropy(model(x), y).detach()) < first


def run_session_steps(session, model, x, y, n):
    opt = session.state.optimizer
    for i in range(n):
        xb, yb = x[(i * 16) % 64:][:16], y[(i * 16) % 64:][:16]
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        session.step()


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_calibration_steps_in_a_session(method):
    model = net()
    recipe = (f"modifiers:\n  - {{type: Quantization, num_calibration_steps: 4, "
              f"method: {method}}}\n")
    session = run(model, recipe, steps=2, lr=0.0)
    assert not model[3].input_quant.quantizing  # still calibrating
    run_session_steps(session, model, *data(), 2)
    assert model[3].input_quant.quantizing and model[3].input_quant.initialized
    if method == "entropy":
        assert not model[3].input_quant.observing  # calibrated ranges are kept


def test_modifier_calibrate_for_export():
    model = net()
    r = load_recipe("modifiers:\n  - {type: Quantization, num_calibration_steps: 2, "
                    "method: percentile, percentile: 99.9, ignore: ['8']}\n")
    x, _ = data()
    state = r.modifiers[0].calibrate(model, [x[:16], x[16:32], x[32:48]])
    assert set(state["layers"]) == {"0", "3"} and state["ignored"] == ["8"]


SPARSEML = """
version: 1.1.0
quant_epoch: 1.0
quantization_modifiers:
  - !QuantizationModifier
    start_epoch: eval(quant_epoch)
    freeze_bn_stats_epoch: eval(quant_epoch + 1)
    disable_quantization_observer_epoch: -1
    model_fuse_fn_name: fuse_module
    ignore: ['8', 'ReLU']
    scheme:
      input_activations: {num_bits: 8, symmetric: false}
      weights: {num_bits: 8, symmetric: true, strategy: channel}
"""


def test_sparseml_quantization_modifier_loads():
    r = load_recipe(SPARSEML)
    (m,) = [m for m in r.modifiers if isinstance(m, QuantizationModifier)]
    assert m.start_epoch == 1.0 and m.freeze_bn_stats_epoch == 2.0
    assert m.disable_quantization_observer_epoch is None and m.ignore == ["8", "ReLU"]
    session = sparsify.apply(net(), r, steps_per_epoch=1, start_epoch=1.0)
    assert not quant.is_quantized(session.model[8]) and quant.is_quantized(session.model[0])


def test_sparseml_fields_that_cannot_be_honoured():
    with pytest.raises(RecipeError, match="quantize_embeddings"):
        from_sparseml({"quantize_embeddings": True}, "QuantizationModifier")
    with pytest.raises(RecipeError, match="weight_bits"):
        from_sparseml({"weight_bits": 4}, "QuantizationModifier")
    with pytest.raises(RecipeError, match="tensorrt"):
        from_sparseml({"tensorrt": True}, "QuantizationModifier")
    out = from_sparseml({"start_epoch": -1, "submodules": ["features"],
                         "exclude_module_types": ["LayerNorm"]}, "Q")
    assert out == [{"type": "Quantization", "start_epoch": 0.0,
                    "targets": ["re:features(\\..*)?"], "ignore": ["LayerNorm"]}]


def test_resume_reinserts_structure():
    model = net()
    session = run(model, QAT, steps=12)
    saved_model = copy.deepcopy(model.state_dict())
    saved = session.state_dict()
    fresh = net()
    s2 = sparsify.apply(fresh, QAT, optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1),
                        steps_per_epoch=4, start_epoch=3.0)
    fresh.load_state_dict(saved_model)
    s2.load_state_dict({**saved, "start_epoch": 0.0})
    assert quant.is_quantized(fresh[0]) and type(fresh[1]) is quant.modules.FrozenBatchNorm2d
    x, _ = data()
    model.eval(), fresh.eval()
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), fresh(x).numpy(), atol=1e-6)
