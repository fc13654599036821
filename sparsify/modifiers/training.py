"""Training-loop modifiers: epoch range, learning rate (constant, linear/cosine ramp, step decay)
and weight decay. They set ``param_group["lr"]`` / ``["weight_decay"]`` on the user's optimizer
before each step; nothing wraps or replaces the optimizer."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from sparsify import schedules
from sparsify.errors import RecipeError
from sparsify.modifiers.base import EPS, NEVER, Modifier, SessionState, runtime


class EpochRange(Modifier):
    """Only says how long to train: the recipe's end_epoch is at least this one's."""


def _groups(state: SessionState, label: str, indices: Optional[list[int]]) -> list[dict]:
    groups = state.require_optimizer(label).param_groups
    if indices is None:
        return groups
    bad = [i for i in indices if not 0 <= i < len(groups)]
    if bad:
        raise RecipeError(
            f"{state.source}: {label}: param_groups {bad} out of range; the optimizer has "
            f"{len(groups)} group(s), numbered from 0"
        )
    return [groups[i] for i in indices]


class _OnceSetter(Modifier):
    """Sets one optimizer value once, at the first step at or after start_epoch."""

    param_groups: Optional[list[int]] = None
    applied_: bool = runtime(False)

    def initialize(self, state: SessionState) -> None:
        _groups(state, self.label, self.param_groups)

    def value(self) -> tuple[str, float]:
        raise NotImplementedError

    def on_step_end(self, state: SessionState) -> None:
        if self.applied_ or state.epoch < self.start_epoch - EPS:
            return
        key, value = self.value()
        for group in _groups(state, self.label, self.param_groups):
            group[key] = value
        self.applied_ = True

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied_}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.applied_ = state["applied"]


class SetLearningRate(_OnceSetter):
    learning_rate: float = Field(gt=0.0)

    def value(self) -> tuple[str, float]:
        return "lr", self.learning_rate


class SetWeightDecay(_OnceSetter):
    weight_decay: float = Field(ge=0.0)

    def value(self) -> tuple[str, float]:
        return "weight_decay", self.weight_decay


class LearningRateFunction(Modifier):
    """LR ramp from init_lr at start_epoch to final_lr at end_epoch, updated every step;
    cyclic_linear repeats the linear ramp every cycle_epochs."""

    lr_func: Literal["linear", "cosine", "cyclic_linear"] = "linear"
    init_lr: float = Field(gt=0.0)
    final_lr: float = Field(ge=0.0)
    cycle_epochs: Optional[float] = Field(default=None, gt=0.0)
    param_groups: Optional[list[int]] = None

    @model_validator(mode="after")
    def _needs_end(self) -> "LearningRateFunction":
        if self.end_epoch == NEVER or self.end_epoch <= self.start_epoch:
            raise ValueError("end_epoch must be set and after start_epoch for a learning-rate ramp")
        if (self.lr_func == "cyclic_linear") != (self.cycle_epochs is not None):
            raise ValueError("cycle_epochs is required with lr_func cyclic_linear, and only with it")
        return self

    def initialize(self, state: SessionState) -> None:
        _groups(state, self.label, self.param_groups)

    def on_step_end(self, state: SessionState) -> None:
        if not self.start_epoch - EPS <= state.epoch <= self.end_epoch + EPS:
            return
        lr = schedules.lr_at(
            state.epoch, self.start_epoch, self.end_epoch, self.init_lr, self.final_lr, self.lr_func,
            self.cycle_epochs,
        )
        for group in _groups(state, self.label, self.param_groups):
            group["lr"] = lr


class StepLearningRate(Modifier):
    """Step decay of the learning rate, applied every step while active.

    ``step_size`` epochs between decays (StepLR), or absolute ``milestones`` epochs (MultiStepLR),
    or neither: decay every epoch (ExponentialLR). ``init_lr`` defaults to each param group's lr
    when the modifier starts.
    """

    gamma: float = Field(default=0.1, gt=0.0)
    step_size: Optional[float] = Field(default=None, gt=0.0)
    milestones: Optional[list[float]] = None
    init_lr: Optional[float] = Field(default=None, gt=0.0)
    param_groups: Optional[list[int]] = None

    base_lrs_: list = runtime(None)

    @model_validator(mode="after")
    def _one_rule(self) -> "StepLearningRate":
        if self.step_size is not None and self.milestones is not None:
            raise ValueError("give step_size (StepLR) or milestones (MultiStepLR), not both")
        if self.milestones is not None and sorted(self.milestones) != self.milestones:
            raise ValueError(f"milestones {self.milestones} must be in increasing order")
        return self

    def initialize(self, state: SessionState) -> None:
        _groups(state, self.label, self.param_groups)

    def on_step_end(self, state: SessionState) -> None:
        if not self.active(state.epoch):
            return
        groups = _groups(state, self.label, self.param_groups)
        if self.base_lrs_ is None:
            self.base_lrs_ = [self.init_lr or g["lr"] for g in groups]
        for group, base in zip(groups, self.base_lrs_):
            group["lr"] = schedules.step_lr_at(
                state.epoch, self.start_epoch, base, self.gamma, self.step_size, self.milestones
            )

    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": self.base_lrs_}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_lrs_ = state["base_lrs"]
