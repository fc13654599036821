"""Output distillation: blend the task loss with a soft-target loss from a frozen teacher.

    loss = (1 - hardness) * task_loss + hardness * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The T^2 factor keeps the soft-target gradients on the same scale as the task loss when the
temperature changes (Hinton et al., 2015). The teacher is passed to ``sparsify.apply(...,
teacher=model)``; the loop hands each batch to ``session.loss(loss, inputs=x, outputs=logits)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from sparsify.errors import RecipeError
from sparsify.modifiers.base import Modifier, SessionState


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-scaled KL divergence of the student's from the teacher's class distribution,
    averaged over every position but the class axis (the last)."""
    classes = student.shape[-1]
    s = F.log_softmax(student.reshape(-1, classes) / temperature, dim=-1)
    t = F.log_softmax(teacher.reshape(-1, classes).to(student.dtype) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


class Distillation(Modifier):
    hardness: float = Field(default=0.5, ge=0.0, le=1.0, description="weight of the teacher term")
    temperature: float = Field(default=2.0, gt=0.0)

    def initialize(self, state: SessionState) -> None:
        if state.teacher is None:
            raise RecipeError(
                f"{state.source}: {self.label} needs a teacher model: pass teacher=... to sparsify.apply"
            )
        state.teacher.eval()

    def on_loss(self, state: SessionState, loss: torch.Tensor, **ctx: Any) -> torch.Tensor:
        if not self.active(state.epoch):
            return loss
        inputs, outputs = ctx.get("inputs"), ctx.get("outputs")
        if inputs is None or not isinstance(outputs, torch.Tensor):
            raise RecipeError(
                f"{state.source}: {self.label}: call session.loss(loss, inputs=batch_inputs, "
                "outputs=student_logits) so the teacher can see the batch"
            )
        with torch.no_grad():
            if isinstance(inputs, dict):
                teacher_out = state.teacher(**inputs)
            elif isinstance(inputs, (tuple, list)):
                teacher_out = state.teacher(*inputs)
            else:
                teacher_out = state.teacher(inputs)
        if not isinstance(teacher_out, torch.Tensor) or teacher_out.shape != outputs.shape:
            raise RecipeError(
                f"{state.source}: {self.label}: the teacher's output "
                f"{getattr(teacher_out, 'shape', type(teacher_out).__name__)} does not match the "
                f"student's logits {tuple(outputs.shape)}"
            )
        soft = distillation_loss(outputs, teacher_out, self.temperature)
        return (1.0 - self.hardness) * loss + self.hardness * soft
