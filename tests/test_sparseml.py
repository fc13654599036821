"""SparseML recipes: tags, variables, eval() through the safe evaluator, groups, stages, and the
translation of each modifier; fields that cannot be honoured are errors."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify
from sparsify.errors import RecipeError
from sparsify.recipe import load_recipe
from sparsify.sparseml import safe_eval

torch.set_num_threads(1)

GMP = """
num_epochs: 4.0
init_lr: 0.05
pruning_start: 0.5
pruning_end: eval(num_epochs - 1.5)
target: &target 0.75
ratio: eval(min(target, 0.8) * 1)

training_modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
  - !LearningRateFunctionModifier
    lr_func: cosine
    init_lr: eval(init_lr)
    final_lr: eval(init_lr / 10)
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
    update_frequency: -1

pruning_modifiers:
  - !GMPruningModifier
    params: ["re:conv2.*", "fc.weight"]
    init_sparsity: 0.05
    final_sparsity: *target
    start_epoch: eval(pruning_start)
    end_epoch: eval(pruning_end)
    update_frequency: 0.5
    inter_func: cubic
    mask_type: unstructured
    leave_enabled: True
    log_types: __ALL__
"""


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 12)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).mean((2, 3)))


def test_gmp_recipe_translates_to_native_modifiers():
    recipe = load_recipe(GMP)
    kinds = [type(m).__name__ for m in recipe.modifiers]
    assert kinds == ["EpochRange", "LearningRateFunction", "MagnitudePruning"]
    prune = recipe.modifiers[2]
    assert (prune.start_epoch, prune.end_epoch, prune.final_sparsity) == (0.5, 2.5, 0.75)
    assert prune.params == ["re:conv2.*", "fc.weight"]
    assert recipe.modifiers[1].final_lr == pytest.approx(0.005)
    assert recipe.end_epoch == 4.0 and recipe.variables["ratio"] == 0.75


def test_translated_recipe_runs():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    session = sparsify.apply(model, GMP, optimizer=opt, steps_per_epoch=2)
    for i in range(8):
        x = torch.randn(4, 3, 5, 5)
        opt.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 12, (4,))).backward()
        opt.step()
        session.step()
    assert session.sparsity() == {"conv2.weight": 0.75, "fc.weight": 0.75}
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)


def test_final_sparsity_map_from_param_block_and_constant():
    recipe = load_recipe("""
modifiers:
  - !GMPruningModifier
    params: __ALL_PRUNABLE__
    init_sparsity: __FROM_PARAM__
    final_sparsity: {0.5: [conv2], 0.75: ["fc.weight"]}
    start_epoch: 0
    end_epoch: 2
    update_frequency: 1
    mask_type: [1, 4]
  - !ConstantPruningModifier
    params: [conv1.weight]
    start_epoch: -1
    end_epoch: -1
    update_frequency: -1
""")
    first, second, constant = recipe.modifiers
    assert (first.params, first.final_sparsity, first.init_sparsity) == (["conv2"], 0.5, "from_param")
    assert (second.params, second.final_sparsity, second.mask_type) == (["fc.weight"], 0.75, [1, 4])
    assert type(constant).__name__ == "ConstantPruning" and constant.start_epoch == 0.0
    model = Net()
    with torch.no_grad():
        model.fc.weight[:6] = 0  # 50% already pruned: from_param starts there
    session = sparsify.apply(model, recipe, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert session.sparsity()["fc.weight"] == 0.5
    session.step()
    assert session.sparsity()["fc.weight"] == pytest.approx(0.5 + 0.25 * (1 - 0.5**3), abs=4 / 192 + 1e-9)  # one 1x4 block


def test_global_and_lr_class_translations():
    recipe = load_recipe("""
pruning_modifiers:
  - !GlobalMagnitudePruningModifier
    init_sparsity: 0.0
    final_sparsity: 0.6
    start_epoch: 0
    end_epoch: 1
    update_frequency: 0.5
    mask_type: block4
    leave_enabled: false
lr_modifiers:
  - !LearningRateModifier
    lr_class: StepLR
    lr_kwargs: {step_size: 2, gamma: 0.3}
    init_lr: 0.1
    start_epoch: 0
  - !SetWeightDecayModifier
    weight_decay: 0.0
  - !SetLearningRateModifier
    learning_rate: 0.2
    start_epoch: 5
""")
    glob, step, wd, setlr = recipe.modifiers
    assert type(glob).__name__ == "GlobalMagnitudePruning" and glob.params == ["__ALL_PRUNABLE__"]
    assert not glob.leave_enabled and glob.mask_type == "block4"
    assert (step.step_size, step.gamma, step.init_lr) == (2, 0.3, 0.1)
    assert wd.weight_decay == 0.0 and setlr.start_epoch == 5


def test_staged_recipe_runs_stages_in_sequence():
    recipe = load_recipe("""
sparsity: 0.5
stage_one:
  pruning_modifiers:
    - !GMPruningModifier
      params: [fc]
      init_sparsity: 0.0
      final_sparsity: eval(sparsity)
      start_epoch: 0
      end_epoch: 2
      update_frequency: 1
stage_two:
  sparsity: 0.8
  pruning_modifiers:
    - !GMPruningModifier
      params: [fc]
      init_sparsity: eval(sparsity - 0.3)
      final_sparsity: eval(sparsity)
      start_epoch: 0
      end_epoch: 1
      update_frequency: 1
""")
    one, two = recipe.modifiers
    assert (one.start_epoch, one.end_epoch, one.final_sparsity) == (0, 2, 0.5)
    assert (two.start_epoch, two.end_epoch, two.final_sparsity) == (2, 3, 0.8)
    assert two.init_sparsity == pytest.approx(0.5)
    model = Net()
    session = sparsify.apply(model, recipe, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(3):
        session.step()
    assert session.sparsity()["fc.weight"] == round(0.8 * 192) / 192


def test_markdown_front_matter(tmp_path):
    path = tmp_path / "recipe.md"
    path.write_text("---\n" + GMP + "---\n\n# My recipe\n\nSome prose.\n")
    assert len(load_recipe(path).modifiers) == 3


def error(text):
    with pytest.raises(RecipeError) as info:
        load_recipe(text)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_field_that_cannot_be_honoured_is_named():
    message = error("m_modifiers:\n  - !GMPruningModifier\n    final_sparsity: 0.5\n    phased: true\n")
    assert "phased" in message
    message = error("m_modifiers:\n  - !GMPruningModifier\n    final_sparsity: 0.5\n    mystery_knob: 3\n")
    assert "'mystery_knob'" in message and "GMPruningModifier" in message and "line 2" in message
    message = error("m_modifiers:\n  - !GMPruningModifier\n    final_sparsity: 0.5\n    leave_enable: true\n")
    assert "did you mean 'leave_enabled'" in message
    assert "'exp'" in error("m_modifiers:\n  - !LearningRateFunctionModifier {lr_func: exp, init_lr: 0.1, final_lr: 0.0}\n")
    assert "CosineAnnealingWarmRestarts" in error("m_modifiers:\n  - !LearningRateModifier {lr_class: CosineAnnealingWarmRestarts}\n")


def test_unknown_sparseml_modifier_names_closest():
    message = error("m_modifiers:\n  - !GMPrunningModifier {final_sparsity: 0.5}\n")
    assert "did you mean !GMPruningModifier" in message


def test_native_validation_applies_after_translation():
    assert "[0, 1)" in error("m_modifiers:\n  - !GMPruningModifier {final_sparsity: 1.5, end_epoch: 2}\n")


@pytest.mark.parametrize("expr", [
    "__import__('os').system('echo pwned')",
    "lr.real",
    "'a' * 3",
    "(lambda: 1)()",
    "[1, 2][0]",
    "open('x')",
    "lr if lr else 1",
    "undefined_name + 1",
    "2 ** 100000",
    "1 / 0",
])
def test_eval_that_is_not_arithmetic_is_refused(expr):
    message = error(f"lr: 0.1\nm_modifiers:\n  - !SetLearningRateModifier\n    learning_rate: \"eval({expr})\"\n")
    assert "eval(" in message and "not allowed" in message


def test_safe_eval_arithmetic():
    variables = {"a": 3, "b": 0.5}
    assert safe_eval("a * (b + 1) - 2 ** 2 // 3 % 5", variables, "x") == 3 * 1.5 - 1
    assert safe_eval("-a + max(a, 10) + round(2.6) + int(b) + abs(-1)", variables, "x") == 11
    with pytest.raises(RecipeError):
        safe_eval("min(a, key=b)", variables, "x")


def test_variable_cycles_and_order():
    recipe = load_recipe("a: eval(b + 1)\nb: eval(c * 2)\nc: 0.1\nm_modifiers:\n  - !SetLearningRateModifier {learning_rate: eval(a)}\n")
    assert recipe.modifiers[0].learning_rate == pytest.approx(1.2)
    assert "cycle" in error("a: eval(b)\nb: eval(a)\nm_modifiers:\n  - !EpochRangeModifier {}\n")


def test_python_tags_are_refused():
    assert "malformed YAML" in error("m_modifiers:\n  - !!python/object/apply:os.system ['echo pwned']\n")


def test_untagged_items_in_a_group():
    assert "tagged" in error("m_modifiers:\n  - !EpochRangeModifier {}\n  - {start_epoch: 1}\n")


def test_quantization_modifier_routes_to_the_quant_module():
    recipe = load_recipe("q_modifiers:\n  - !QuantizationModifier\n    start_epoch: 2.0\n    freeze_bn_stats_epoch: 3.0\n")
    (mod,) = recipe.modifiers
    assert type(mod).__name__ in ("Quantization", "QuantizationModifier") and mod.start_epoch == 2.0


def test_nm_mask_type_and_all_token():
    recipe = load_recipe("""
m_modifiers:
  - !MagnitudePruningModifier
    params: __ALL__
    init_sparsity: 0.5
    final_sparsity: 0.5
    start_epoch: 0
    end_epoch: 0
    update_frequency: 1
    mask_type: "2:4"
""")
    model = Net()
    with pytest.raises(RecipeError, match="conv1.weight.*not a multiple of 4"):
        sparsify.apply(model, recipe)  # conv1 has 3 input channels
    recipe.modifiers[0].ignore = ["conv1"]
    sparsify.apply(model, recipe)
    groups = model.conv2.weight.permute(0, 2, 3, 1).reshape(-1, 4)
    assert ((groups != 0).sum(-1) == 2).all()


def test_metadata_mappings_are_skipped():
    recipe = load_recipe("__metadata__: {framework: pytorch}\nm_modifiers:\n  - !EpochRangeModifier {end_epoch: 2}\n")
    assert recipe.end_epoch == 2


def test_cyclic_linear_lr():
    recipe = load_recipe("m_modifiers:\n  - !LearningRateFunctionModifier {lr_func: cyclic_linear, cycle_epochs: 1.0, init_lr: 0.1, final_lr: 0.0, start_epoch: 0, end_epoch: 3}\n")
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    session = sparsify.apply(model, recipe, optimizer=opt, steps_per_epoch=4)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(6):
        session.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.075, 0.05, 0.025, 0.1, 0.075, 0.05])
    assert "cycle_epochs" in error("m_modifiers:\n  - !LearningRateFunctionModifier {lr_func: cyclic_linear, init_lr: 0.1, final_lr: 0.0, end_epoch: 2}\n")


def test_stage_offsets_move_every_epoch_field():
    recipe = load_recipe("""
stage_a:
  m_modifiers:
    - !EpochRangeModifier {start_epoch: 0, end_epoch: 3}
stage_b:
  m_modifiers:
    - !LearningRateModifier {lr_class: MultiStepLR, lr_kwargs: {milestones: [1, 2], gamma: 0.1}, start_epoch: 0}
    - !EpochRangeModifier {start_epoch: 0, end_epoch: 2}
""")
    _, step, epochs = recipe.modifiers
    assert step.start_epoch == 3 and step.milestones == [4, 5] and step.end_epoch == -1
    assert (epochs.start_epoch, epochs.end_epoch) == (3, 5) and recipe.end_epoch == 5


def test_eval_result_beyond_the_float_range_is_a_recipe_error():
    message = error("a: 99999999999999999999999999999999\nm_modifiers:\n"
                    "  - !GMPruningModifier {final_sparsity: eval(a*a*a*a*a*a*a*a*a*a), "
                    "end_epoch: 2}\n")
    assert "eval(a*a*a*a*a*a*a*a*a*a) is not allowed" in message and "too large" in message
    big = "1" + "0" * 400
    assert "eval(float(a)) is not allowed" in error(
        f"a: {big}\nm_modifiers:\n  - !GMPruningModifier {{final_sparsity: eval(float(a))}}\n")


def test_lr_kwargs_that_is_not_a_mapping_is_named():
    message = error("m_modifiers:\n  - !LearningRateModifier {lr_class: StepLR, lr_kwargs: 5, "
                    "init_lr: 0.1, start_epoch: 0, end_epoch: 2}\n")
    assert "!LearningRateModifier (line 2): field 'lr_kwargs' = 5 must be a mapping" in message
    assert "step_size" in message


def test_stage_epoch_that_is_not_a_number_is_named():
    message = error("""
stage_a:
  m_modifiers:
    - !GMPruningModifier {final_sparsity: 0.5, start_epoch: 0, end_epoch: abc}
stage_b:
  m_modifiers:
    - !EpochRangeModifier {start_epoch: 0, end_epoch: 1}
""")
    assert "stage 'stage_a': !GMPruningModifier (line 4): field 'end_epoch' = 'abc' is not a " \
           "number" in message
