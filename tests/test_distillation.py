"""Output distillation through Session.loss."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify
from sparsify.errors import RecipeError
from sparsify.modifiers.distillation import distillation_loss


def models():
    torch.manual_seed(0)
    return nn.Linear(6, 3), nn.Linear(6, 3)


def test_loss_blend_and_epoch_range():
    student, teacher = models()
    recipe = "modifiers: [{type: Distillation, hardness: 0.25, temperature: 3.0, end_epoch: 1}]"
    session = sparsify.apply(student, recipe, teacher=teacher, steps_per_epoch=2)
    x = torch.randn(5, 6)
    logits = student(x)
    task = F.cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    soft = distillation_loss(logits, teacher(x).detach(), 3.0)
    assert session.loss(task, inputs=x, outputs=logits).item() == pytest.approx((0.75 * task + 0.25 * soft).item())
    session.step()
    session.step()  # epoch 1: distillation has ended
    assert session.loss(task, inputs=x, outputs=logits) is task


def test_distillation_loss_is_zero_for_identical_logits_and_scales_with_t_squared():
    logits = torch.randn(4, 7)
    assert distillation_loss(logits, logits, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(4, 7)
    assert distillation_loss(logits, other, 1.0).item() > 0


def test_gradients_flow_to_student_only():
    student, teacher = models()
    session = sparsify.apply(student, "modifiers: [{type: Distillation, hardness: 1.0}]", teacher=teacher)
    x = torch.randn(5, 6)
    logits = student(x)
    session.loss(logits.sum() * 0, inputs=x, outputs=logits).backward()
    assert student.weight.grad.abs().sum() > 0 and teacher.weight.grad is None


def test_errors():
    student, teacher = models()
    with pytest.raises(RecipeError, match="teacher"):
        sparsify.apply(student, "modifiers: [{type: Distillation}]")
    session = sparsify.apply(student, "modifiers: [{type: Distillation}]", teacher=teacher)
    with pytest.raises(RecipeError, match="inputs="):
        session.loss(torch.tensor(1.0))
    with pytest.raises(RecipeError, match="hardness"):
        sparsify.load_recipe("modifiers: [{type: Distillation, hardness: 1.5}]")


def test_sparseml_distillation_modifier():
    recipe = sparsify.load_recipe("d_modifiers:\n  - !DistillationModifier {hardness: 0.6, temperature: 4.0, start_epoch: -1}\n")
    (mod,) = recipe.modifiers
    assert (type(mod).__name__, mod.hardness, mod.temperature, mod.start_epoch) == ("Distillation", 0.6, 4.0, 0.0)
