"""Pruning modifiers: gradual magnitude pruning (per layer or global) and constant pruning.

Each writes keep-masks into ``state.masks``; the session multiplies weights by them after every
optimizer step and gradients by them in backward. Masks are recomputed only on update epochs
(start_epoch + k * update_frequency, and once at end_epoch with the final sparsity).
"""

from __future__ import annotations

from typing import Any, Literal, Union

import torch
from pydantic import AliasChoices, Field, field_validator, model_validator

from sparsify import masks as M
from sparsify import schedules, targets
from sparsify.errors import RecipeError
from sparsify.modifiers.base import EPS, NEVER, Modifier, SessionState, runtime

FROM_PARAM = "from_param"


def claim(state: SessionState, names: list[str], start: float, end: float, label: str) -> None:
    """Record that ``label`` writes these masks over [start, end]; overlapping writers are an
    error. Touching ranges are a hand-off (staged recipes): the later modifier takes the mask
    over from the earlier one's final state."""
    for name in names:
        for other_start, other_end, other in state.claims.get(name, []):
            same_start = abs(start - other_start) < EPS
            if same_start or (start < other_end - EPS and other_start < end - EPS):
                raise RecipeError(
                    f"{state.source}: {label} and {other} both prune {name!r} over overlapping "
                    "epochs; give each parameter one pruning modifier at a time (use 'ignore')"
                )
        state.claims.setdefault(name, []).append((start, end, label))


def _params_field() -> Any:
    return Field(
        default_factory=lambda: ["__ALL_PRUNABLE__"],
        validation_alias=AliasChoices("params", "targets"),
    )


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _resolve(modifier: Any, state: SessionState) -> list[str]:
    where = f"{state.source}: {modifier.label}"
    modifier.names_ = targets.resolve(state.model, modifier.params, modifier.ignore, where)
    return modifier.names_


class MagnitudePruning(Modifier):
    """Gradual magnitude pruning with a per-layer threshold: each targeted weight reaches the
    scheduled sparsity on its own."""

    params: list[str] = _params_field()  # alias: targets
    ignore: list[str] = Field(default_factory=list)
    init_sparsity: Union[float, Literal["from_param"]] = 0.0
    final_sparsity: float
    update_frequency: float = Field(default=1.0, gt=0.0)
    inter_func: Literal["cubic", "linear", "inverse_cubic"] = "cubic"
    mask_type: Union[str, list[int]] = "unstructured"
    nm_dim: Literal["input", "output"] = "input"
    score: Literal["l1", "l2"] = "l1"
    leave_enabled: bool = True

    names_: list = runtime(None)
    mask_type_: Any = runtime(None)
    init_: dict = runtime(None)  # param name -> init sparsity (per param for from_param)
    next_update_: float = runtime(None)
    done_: bool = runtime(False)
    released_: bool = runtime(False)
    applied_: dict = runtime(None)  # param name -> scheduled sparsity at the last update

    _lists = field_validator("params", "ignore", mode="before")(_one_or_many)

    @field_validator("init_sparsity", "final_sparsity")
    @classmethod
    def _fraction(cls, value: Any) -> Any:
        if isinstance(value, float) and not 0.0 <= value < 1.0:
            raise ValueError(f"sparsity {value:g} is outside [0, 1): use e.g. 0.9 for 90%")
        return value

    @model_validator(mode="after")
    def _check(self) -> "MagnitudePruning":
        self.mask_type_ = M.parse_mask_type(self.mask_type, self.nm_dim)
        limit = self.mask_type_.max_sparsity
        if self.final_sparsity > limit + 1e-12:
            raise ValueError(
                f"final_sparsity {self.final_sparsity:g} is above {limit:g}, the most that "
                f"mask_type {self.mask_type_} allows"
            )
        if isinstance(self.init_sparsity, float) and self.init_sparsity > limit + 1e-12:
            raise ValueError(f"init_sparsity {self.init_sparsity:g} is above {limit:g} ({self.mask_type_})")
        return self

    # epoch at which the final sparsity is reached; -1 (and end == start) means one shot at start
    def _end(self) -> float:
        return self.start_epoch if self.end_epoch == NEVER else self.end_epoch

    def _release_epoch(self) -> float:
        return float("inf") if self.leave_enabled or self.end_epoch == NEVER else self.end_epoch

    def initialize(self, state: SessionState) -> None:
        names = _resolve(self, state)
        for name in names:
            problem = M.check_shape(state.param(name).shape, self.mask_type_)
            if problem:
                raise RecipeError(f"{state.source}: {self.label}: {name!r}: {problem}")
        claim(state, names, self.start_epoch, self._end(), self.label)
        self.next_update_ = self.start_epoch
        self.applied_ = {}

    def _init_sparsities(self, state: SessionState) -> dict[str, float]:
        if self.init_sparsity == FROM_PARAM:
            return {n: min(M.sparsity(state.param(n)), self.mask_type_.max_sparsity) for n in self.names_}
        return {n: float(self.init_sparsity) for n in self.names_}

    def target(self, name: str, epoch: float) -> float:
        """Scheduled sparsity of ``name`` at ``epoch``."""
        return schedules.sparsity_at(
            epoch, self.start_epoch, self._end(), self.init_[name], self.final_sparsity, self.inter_func
        )

    def on_step_end(self, state: SessionState) -> None:
        epoch = state.epoch
        if self.released_ or epoch < self.start_epoch - EPS:
            return
        if self.done_:
            if epoch >= self._release_epoch() - EPS:
                for name in self.names_:
                    state.masks.pop(name, None)
                self.released_ = True
            return
        final = epoch >= self._end() - EPS
        if not (final or epoch >= self.next_update_ - EPS):
            return
        if self.init_ is None:
            self.init_ = self._init_sparsities(state)
        self.update_masks(state, epoch)
        self.next_update_ = schedules.next_update(epoch, self.start_epoch, self.update_frequency)
        self.done_ = final
        if final and epoch >= self._release_epoch() - EPS:
            self.on_step_end(state)

    @torch.no_grad()
    def update_masks(self, state: SessionState, epoch: float) -> None:
        for name in self.names_:
            sparsity = self.target(name, epoch)
            state.masks[name] = M.layer_mask(state.param(name), sparsity, self.mask_type_, self.score)
            self.applied_[name] = sparsity

    def state_dict(self) -> dict[str, Any]:
        return {
            "init": self.init_,
            "next_update": self.next_update_,
            "done": self.done_,
            "released": self.released_,
            "applied": dict(self.applied_ or {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.init_ = state["init"]
        self.next_update_ = state["next_update"]
        self.done_ = state["done"]
        self.released_ = state["released"]
        self.applied_ = dict(state["applied"])


class GlobalMagnitudePruning(MagnitudePruning):
    """Gradual magnitude pruning with one threshold across all targeted weights: layers with many
    small weights end up sparser than the schedule, sensitive ones less sparse."""

    @model_validator(mode="after")
    def _global_masks_only(self) -> "GlobalMagnitudePruning":
        if self.mask_type_.kind not in ("unstructured", "block"):
            raise ValueError(
                f"mask_type {self.mask_type_} cannot be pruned globally (its sparsity is fixed per "
                "group or per layer); use MagnitudePruning, or an unstructured / block mask"
            )
        if self.init_sparsity == FROM_PARAM:
            raise ValueError("init_sparsity from_param needs per-layer pruning (MagnitudePruning)")
        return self

    @torch.no_grad()
    def update_masks(self, state: SessionState, epoch: float) -> None:
        sparsity = self.target(self.names_[0], epoch)
        weights = {name: state.param(name) for name in self.names_}
        for name, mask in M.global_masks(weights, sparsity, self.mask_type_, self.score).items():
            state.masks[name] = mask
            self.applied_[name] = sparsity


class ConstantPruning(Modifier):
    """Keep the zeros a weight already has: at start_epoch the mask becomes ``weight != 0`` and is
    held until end_epoch (-1: until finalize). For fine-tuning an already pruned model."""

    params: list[str] = _params_field()  # alias: targets
    ignore: list[str] = Field(default_factory=list)

    names_: list = runtime(None)
    started_: bool = runtime(False)
    released_: bool = runtime(False)

    _lists = field_validator("params", "ignore", mode="before")(_one_or_many)

    def initialize(self, state: SessionState) -> None:
        claim(state, _resolve(self, state), self.start_epoch, self.ends(), self.label)

    def on_step_end(self, state: SessionState) -> None:
        if self.released_ or state.epoch < self.start_epoch - EPS:
            return
        if not self.started_:
            for name in self.names_:
                state.masks[name] = state.param(name).detach() != 0
            self.started_ = True
        if state.epoch >= self.ends() - EPS:
            for name in self.names_:
                state.masks.pop(name, None)
            self.released_ = True

    def state_dict(self) -> dict[str, Any]:
        return {"started": self.started_, "released": self.released_}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.started_ = state["started"]
        self.released_ = state["released"]
