"""Target patterns: names with or without .weight, regexes, module types, ignore, and errors."""

import pytest
import torch.nn as nn

from sparsify.errors import RecipeError
from sparsify.targets import prunable_params, resolve


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.attn = nn.MultiheadAttention(8, 2)
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 4)


def names(patterns, ignore=()):
    return resolve(Net(), list(patterns), list(ignore), "r.yaml: modifier #1")


def test_prunable_params_are_conv_linear_and_attention_projections():
    assert list(prunable_params(Net())) == [
        "conv1.weight", "block.0.weight", "block.2.weight", "attn.in_proj_weight", "attn.out_proj.weight", "fc.weight",
    ]


def test_name_with_or_without_weight():
    assert names(["conv1"]) == ["conv1.weight"]
    assert names(["conv1.weight", "block.2"]) == ["conv1.weight", "block.2.weight"]
    assert names(["attn"]) == ["attn.in_proj_weight"]


def test_regex_type_all_and_ignore():
    assert names(["re:block\\..*"]) == ["block.0.weight", "block.2.weight"]
    assert names(["re:block"]) == ["block.0.weight", "block.2.weight"]  # re.match, as SparseML
    assert names(["re:.*\\.2$"]) == ["block.2.weight"]  # a whole module name
    assert names(["Conv2d"], ignore=["conv1"]) == ["block.0.weight", "block.2.weight"]
    assert names(["Linear"]) == ["attn.out_proj.weight", "fc.weight"]
    assert len(names(["__ALL_PRUNABLE__"], ignore=["re:attn.*"])) == 4


def check(patterns, ignore=(), *fragments):
    with pytest.raises(RecipeError) as info:
        names(patterns, ignore)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_name_that_matches_nothing_suggests_closest():
    check(["conv_1"], (), "'conv_1' matches no parameter", "did you mean 'conv1'", "r.yaml")


def test_regex_that_matches_nothing():
    check(["re:layer4.*"], (), "regex 're:layer4.*' matches no prunable parameter")
    check(["re:bn1.*"], (), "not prunable")
    check(["re:("], (), "not a valid regular expression")


def test_non_prunable_targets():
    check(["bn1.weight"], (), "not prunable", "BatchNorm2d")
    check(["fc.bias"], (), "not prunable")
    check(["bn1"], (), "BatchNorm2d", "no prunable weight")
    check(["emb"], (), "Embedding")
    check(["BatchNorm2d"], (), "not a prunable layer type")


def test_ignore_typo_is_an_error_and_empty_selection_too():
    check(["Conv2d"], ["conv9"], "ignore", "'conv9'")
    check(["conv1"], ["conv1"], "leave no parameter")
