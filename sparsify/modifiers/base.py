"""The Modifier base class and the SessionState every modifier hook receives.

A modifier is a pydantic model: its public fields are exactly the keys a recipe may write for it
(`extra="forbid"`, so a typo is an error), and its runtime state lives in fields whose names end
with an underscore (never read from a recipe, never serialized with the recipe).

Lifecycle, driven by `sparsify.session.Session`:

1. ``initialize(state)`` once, right after ``sparsify.apply``: resolve targets against
   ``state.model`` and check that the recipe fits the model (raise ``RecipeError`` if not).
2. ``on_step_end(state)`` once more at apply time (``state.step == 0``) and then after every
   ``optimizer.step()``. ``state.epoch`` is the fractional epoch the *next* training step runs
   at, so a modifier brings the model, masks and optimizer up to date for that epoch.
3. ``on_loss(state, loss, **ctx) -> loss`` when the loop calls ``session.loss(loss, ...)``.
4. ``finalize(state)`` once at the end; afterwards the model holds plain tensors.

``state_dict()`` / ``load_state_dict()`` carry the runtime state needed to resume mid-run with
bit-identical results (plain Python values and tensors only, loadable with weights_only=True).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sparsify.errors import RecipeError


@dataclass
class SessionState:
    """What a session knows; shared by all its modifiers.

    model: the model being trained (unwrapped from DistributedDataParallel).
    optimizer: the user's optimizer, or None (then LR / weight-decay modifiers refuse to start).
    epoch: fractional epoch of the next training step, ``start_epoch + step / steps_per_epoch``.
    step: optimizer steps taken since ``apply`` (restored on resume).
    steps_per_epoch: optimizer steps per epoch (>= 1).
    teacher: the teacher model for distillation, or None.
    masks: parameter name -> bool tensor (True = keep). Pruning modifiers write it; the session
        applies every mask in it to the weight after each step and to the gradient in backward.
        Removing a name releases that parameter.
    claims: parameter name -> list of (start, end, label) epoch ranges during which a pruning
        modifier owns that parameter's mask; two overlapping claims are a recipe error.
    source: file name (or "<recipe text>") used in error messages.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    epoch: float = 0.0
    step: int = 0
    steps_per_epoch: int = 1
    start_epoch: float = 0.0
    teacher: torch.nn.Module | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    claims: dict[str, list[tuple[float, float, str]]] = field(default_factory=dict)
    source: str = "<recipe>"

    def param(self, name: str) -> torch.nn.Parameter:
        return self.model.get_parameter(name)

    def require_optimizer(self, label: str) -> torch.optim.Optimizer:
        if self.optimizer is None:
            raise RecipeError(
                f"{self.source}: {label} changes the optimizer, but none was given: "
                "pass optimizer=... to sparsify.apply"
            )
        return self.optimizer


# an epoch comparison tolerance: epochs are sums of 1/steps_per_epoch, so exact equality lies
EPS = 1e-9

NEVER = -1.0


def runtime(default: Any = None) -> Any:
    """A runtime-state field: not a recipe key, not part of the modifier's recipe form."""
    return Field(default=default, exclude=True, repr=False)


def explain_validation(err: ValidationError) -> str:
    """pydantic's first complaint as one sentence that names the field."""
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:
        return msg
    loc = str(first["loc"][0])  # union members add their type to loc: name the field only
    if first["type"] == "missing":
        return f"missing required field {loc!r}"
    if first["type"] == "extra_forbidden":
        return f"unknown field {loc!r}"
    return f"field {loc!r} = {first.get('input')!r}: {msg}"


class Modifier(BaseModel):
    """Base of every modifier. Subclasses add recipe fields and override the hooks they need.

    Built from Python (``MagnitudePruning(final_sparsity=0.9, ...)``) a bad field raises
    ``RecipeError`` naming the modifier and the field, as it does from a recipe file.
    """

    # a recipe number is finite: an epoch of .inf (or 1e400) would never be reached
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, allow_inf_nan=False)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise RecipeError(f"{type(self).__name__}: {explain_validation(err)}") from None

    start_epoch: float = Field(default=0.0, ge=0.0, description="epoch the modifier starts at")
    end_epoch: float = Field(
        default=NEVER, description="epoch it ends at; -1 means it never ends (until finalize)"
    )

    index_: int = runtime(0)

    @model_validator(mode="after")
    def _check_range(self) -> "Modifier":
        if self.end_epoch != NEVER and self.end_epoch < self.start_epoch:
            raise ValueError(
                f"end_epoch ({self.end_epoch:g}) is before start_epoch ({self.start_epoch:g}); "
                "use end_epoch >= start_epoch, or -1 for 'never ends'"
            )
        return self

    @property
    def label(self) -> str:
        """How error messages name this modifier: 'modifier #2 (MagnitudePruning)'."""
        return f"modifier #{self.index_ + 1} ({type(self).__name__})"

    @property
    def last_epoch(self) -> float:
        """The last epoch this modifier needs the training loop to reach."""
        return max(self.start_epoch, self.end_epoch)

    def ends(self) -> float:
        """end_epoch with -1 turned into +inf, for range checks."""
        return float("inf") if self.end_epoch == NEVER else self.end_epoch

    def active(self, epoch: float) -> bool:
        return self.start_epoch - EPS <= epoch < self.ends() - EPS

    # lifecycle hooks
    def initialize(self, state: SessionState) -> None:
        pass

    def on_step_end(self, state: SessionState) -> None:
        pass

    def on_loss(self, state: SessionState, loss: torch.Tensor, **ctx: Any) -> torch.Tensor:
        return loss

    def finalize(self, state: SessionState) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def recipe_fields(cls: type[BaseModel]) -> list[str]:
    """The keys a recipe may write for ``cls``: its fields and their aliases, minus runtime state."""
    names: list[str] = []
    for name, info in cls.model_fields.items():
        if name.endswith("_"):
            continue
        names.append(name)
        alias = info.validation_alias
        choices = getattr(alias, "choices", None)
        for choice in choices or ([alias] if isinstance(alias, str) else []):
            if isinstance(choice, str) and choice not in names:
                names.append(choice)
    return names
