"""Loading and validating recipes: the native format, variables, and every bad-input error."""

import pytest
import torch

from sparsify.errors import RecipeError
from sparsify.modifiers import MODIFIERS
from sparsify.modifiers.pruning import MagnitudePruning
from sparsify.recipe import load_recipe

torch.set_num_threads(1)

NATIVE = """
sparsity: 0.85
ramp_end: 2.5
modifiers:
  - type: MagnitudePruning
    params: [Conv2d, Linear]
    ignore: [conv1]
    init_sparsity: 0.05
    final_sparsity: eval(sparsity)
    start_epoch: 0.5
    end_epoch: eval(ramp_end)
    update_frequency: 0.25
  - type: EpochRange
    end_epoch: eval(ramp_end + 1)
"""


def test_native_recipe_with_variables_and_fractional_epochs():
    recipe = load_recipe(NATIVE)
    prune = recipe.modifiers[0]
    assert isinstance(prune, MagnitudePruning)
    assert prune.final_sparsity == 0.85
    assert (prune.start_epoch, prune.end_epoch, prune.update_frequency) == (0.5, 2.5, 0.25)
    assert prune.params == ["Conv2d", "Linear"] and prune.ignore == ["conv1"]
    assert recipe.end_epoch == 3.5
    assert recipe.variables["sparsity"] == 0.85
    assert recipe.path is None and "MagnitudePruning" in recipe.text


def test_recipe_from_file_and_targets_alias(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("modifiers:\n  - type: MagnitudePruning\n    targets: Linear\n    final_sparsity: 0.5\n")
    recipe = load_recipe(path)
    assert recipe.path == path and recipe.modifiers[0].params == ["Linear"]
    assert load_recipe(str(path)).modifiers[0].final_sparsity == 0.5


def test_every_modifier_in_the_table_is_reachable_by_name():
    minimal = {
        "MagnitudePruning": "final_sparsity: 0.5",
        "GlobalMagnitudePruning": "final_sparsity: 0.5",
        "SetLearningRate": "learning_rate: 0.1",
        "LearningRateFunction": "{init_lr: 0.1, final_lr: 0.0, end_epoch: 2}",
        "SetWeightDecay": "weight_decay: 0.0001",
    }
    for name in MODIFIERS:
        body = minimal.get(name, "{}")
        if body.startswith("{"):
            text = f"modifiers:\n  - {{type: {name}, {body[1:-1]}}}" if body != "{}" else f"modifiers:\n  - {{type: {name}}}"
        else:
            text = f"modifiers:\n  - type: {name}\n    {body}"
        if name == "Quantization":
            continue  # QUANT's own tests cover its fields
        assert type(load_recipe(text).modifiers[0]) is MODIFIERS[name]


def error(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(text)
    message = str(info.value)
    assert "\n" not in message  # one line for the CLI
    return message


def test_unknown_modifier_names_closest():
    message = error("modifiers:\n  - type: MagnitudePrunning\n    final_sparsity: 0.5\n")
    assert "MagnitudePrunning" in message and "did you mean 'MagnitudePruning'" in message


def test_misspelled_field_names_field_modifier_file_and_closest(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("modifiers:\n  - type: MagnitudePruning\n    final_sparsty: 0.9\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert str(path) in message
    assert "'final_sparsty'" in message and "MagnitudePruning" in message
    assert "did you mean 'final_sparsity'" in message
    assert "allowed fields:" in message and "update_frequency" in message


def test_runtime_fields_are_not_recipe_keys():
    message = error("modifiers:\n  - type: MagnitudePruning\n    final_sparsity: 0.5\n    names_: [x]\n")
    assert "unknown field 'names_'" in message


@pytest.mark.parametrize("value", ["1.0", "1.5", "-0.1"])
def test_sparsity_outside_unit_interval(value):
    message = error(f"modifiers:\n  - type: MagnitudePruning\n    final_sparsity: {value}\n")
    assert "final_sparsity" in message and "[0, 1)" in message


def test_end_before_start():
    message = error("modifiers:\n  - {type: MagnitudePruning, final_sparsity: 0.5, start_epoch: 3, end_epoch: 1}\n")
    assert "end_epoch" in message and "before start_epoch" in message


def test_update_frequency_must_be_positive():
    message = error("modifiers:\n  - {type: MagnitudePruning, final_sparsity: 0.5, update_frequency: 0}\n")
    assert "update_frequency" in message


def test_missing_required_field():
    assert "missing required field 'final_sparsity'" in error("modifiers:\n  - type: MagnitudePruning\n")


def test_modifiers_built_in_python_raise_recipe_errors_naming_the_field():
    assert MagnitudePruning(final_sparsity=0.5).final_sparsity == 0.5
    with pytest.raises(RecipeError, match=r"^MagnitudePruning: field 'final_sparsity' = 1.5: .*\[0, 1\)"):
        MagnitudePruning(final_sparsity=1.5)
    with pytest.raises(RecipeError, match=r"^MagnitudePruning: missing required field 'final_sparsity'"):
        MagnitudePruning()
    with pytest.raises(RecipeError, match=r"^MagnitudePruning: unknown field 'update_frequncy'"):
        MagnitudePruning(final_sparsity=0.5, update_frequncy=1)
    with pytest.raises(RecipeError, match=r"end_epoch .* before start_epoch"):
        MagnitudePruning(final_sparsity=0.5, start_epoch=3, end_epoch=1)


def test_bad_mask_type_and_nm_limit():
    assert "mask_type" in error("modifiers:\n  - {type: MagnitudePruning, final_sparsity: 0.5, mask_type: 3x}\n")
    message = error("modifiers:\n  - {type: MagnitudePruning, final_sparsity: 0.75, mask_type: '2:4'}\n")
    assert "0.5" in message and "2:4" in message


def test_malformed_yaml_reports_line_and_column():
    message = error("modifiers:\n  - type: MagnitudePruning\n    final_sparsity: [0.5\n    end_epoch: 3\n")
    assert "malformed YAML at line" in message and "column" in message
    message = error("modifiers:\n  - type: MagnitudePruning\n\tfinal_sparsity: 0.5\n")
    assert "line 3, column 1" in message


def test_structure_errors():
    assert "no 'modifiers'" in error("sparsity: 0.5\n")
    assert "'type' key" in error("modifiers:\n  - MagnitudePruning\n")
    assert "no modifiers" in error("modifiers: []\n")
    assert "does not exist" in error("missing_recipe.yaml")


def test_yaml_that_would_run_code_is_refused():
    message = error("modifiers: !!python/object/apply:os.system ['echo hi']\n")
    assert "malformed YAML" in message


SHIPPED = {
    "resnet18_mnist_prune90.yaml": ("resnet18", 0.9),
    "prune_2of4.yaml": ("resnet18", 0.5),
    "prune_block4_90.yaml": ("resnet18", 0.9),
    "prune_4x1_90.yaml": ("resnet18", 0.87),  # fc's 10 rows: blocks of 4 prune it coarser
    "transformer_prune80.yaml": ("transformer", 0.8),
    "sparseml_gmp_example.yaml": ("resnet18", 0.8),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_pruning_recipes_reach_their_targets(name):
    import pathlib

    import sparsify
    from sparsify.models import create_model

    model_name, least = SHIPPED[name]
    recipe = load_recipe(pathlib.Path(__file__).parent.parent / "recipes" / name)
    model = create_model(model_name)
    # starting at the end jumps straight to the final masks: one update instead of the ramp
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = sparsify.apply(model, recipe, optimizer=opt, start_epoch=recipe.end_epoch)
    sparsity = session.finalize() and session.sparsity()
    assert sparsity and min(sparsity.values()) >= least - 1e-3
    if model_name == "resnet18":
        assert "conv1.weight" not in sparsity and "fc.weight" in sparsity
    if name == "prune_4x1_90.yaml":  # every pruned weight in the shape the block kernel runs
        from sparsify.engine import kernels

        for pname in sparsity:
            w = dict(model.named_parameters())[pname].detach().numpy()
            if w.shape[0] % 4:  # the 10-class fc: its last block holds two rows
                continue
            packed = kernels.PackedWeight.pack(w.reshape(w.shape[0], -1), "sparse")
            assert packed.row_blocks == 4, pname


def test_a_path_that_is_not_a_recipe_file():
    assert "neither an existing .yaml file" in error("recipes/nope.txt")


def test_duplicate_key_is_an_error():
    message = error("modifiers:\n  - type: MagnitudePruning\n    final_sparsity: 0.5\n    final_sparsity: 0.9\n")
    assert "duplicate key 'final_sparsity'" in message and "line 4" in message


def test_field_error_from_a_file_names_the_file_and_the_modifier(tmp_path):
    path = tmp_path / "badval.yaml"
    path.write_text("modifiers:\n  - type: EpochRange\n    end_epoch: 1\n"
                    "  - type: MagnitudePruning\n    params: [Linear]\n    final_sparsity: abc\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}: modifier #2 (MagnitudePruning): field 'final_sparsity' "
                              f"= 'abc'"), message


@pytest.mark.parametrize("field,value", [("end_epoch", ".inf"), ("start_epoch", "1e400"),
                                         ("start_epoch", ".nan"), ("update_frequency", ".inf")])
def test_non_finite_numbers_are_refused(tmp_path, field, value):
    path = tmp_path / "inf.yaml"
    path.write_text(f"modifiers:\n  - type: MagnitudePruning\n    params: [Linear]\n"
                    f"    final_sparsity: 0.5\n    {field}: {value}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}: modifier #1 (MagnitudePruning): field '{field}'"), message
    assert "finite number" in message


def test_a_directory_or_a_non_yaml_file_as_recipe_is_named(tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match="is a directory"):
        load_recipe(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(RecipeError, match="is a file but not a recipe"):
        load_recipe("weights.npy")
