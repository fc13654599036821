"""Run a recipe inside any training loop.

    session = sparsify.apply(model, recipe, optimizer=opt, steps_per_epoch=len(loader))
    for epoch in range(int(math.ceil(recipe.end_epoch))):
        for x, y in loader:
            logits = model(x)
            loss = session.loss(F.cross_entropy(logits, y), inputs=x, outputs=logits)
            opt.zero_grad(); loss.backward(); opt.step()
            session.step()
    session.finalize()

How masks hold: the loop calls ``step()`` after ``optimizer.step()``, so the optimizer has
already moved every weight. Two things keep pruned weights at exactly zero anyway:
- a gradient hook on each masked parameter multiplies its gradient by the mask, so momentum
  and Adam moments of pruned entries receive nothing (their old state is zeroed when a mask
  changes), and gradient-norm clipping sees the gradients that really train;
- ``step()`` multiplies each masked weight by its mask in place (one fused foreach call),
  which removes whatever the optimizer added to pruned entries (e.g. stale momentum or decay).
Masks are recomputed only on the modifiers' update epochs; between updates a step costs one
multiply per masked weight and per gradient. No global state: everything lives on the session.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from sparsify.errors import CheckpointError, RecipeError
from sparsify.modifiers.base import SessionState
from sparsify.recipe import Recipe, load_recipe
from sparsify.targets import unwrap


class Session:
    """A recipe applied to one model and optimizer. Create it with ``sparsify.apply``."""

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe | str | Path,
        optimizer: torch.optim.Optimizer | None = None,
        steps_per_epoch: int = 1,
        start_epoch: float = 0.0,
        teacher: nn.Module | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise RecipeError(f"sparsify.apply needs a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise RecipeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(recipe, Recipe):
            recipe = load_recipe(recipe)
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise RecipeError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
        if start_epoch < 0:
            raise RecipeError(f"start_epoch must be >= 0, got {start_epoch!r}")
        self.model = model
        self.recipe = recipe
        # copies, so one Recipe object can be applied to several models
        self.modifiers = [m.model_copy(deep=True) for m in recipe.modifiers]
        self.state = SessionState(
            model=unwrap(model),
            optimizer=optimizer,
            epoch=float(start_epoch),
            step=0,
            steps_per_epoch=steps_per_epoch,
            start_epoch=float(start_epoch),
            teacher=teacher,
            source=recipe.source,
        )
        self._bool: dict[str, torch.Tensor] = {}  # the mask objects last seen in state.masks
        self._float: dict[str, torch.Tensor] = {}  # the same masks in the weight's dtype
        self._hooks: dict[str, Any] = {}
        self._params: list[torch.Tensor] = []
        self._factors: list[torch.Tensor] = []
        self._finalized = False
        for modifier in self.modifiers:
            modifier.initialize(self.state)
        self._advance()

    # --- the loop's calls -----------------------------------------------------------------------

    @property
    def epoch(self) -> float:
        """Fractional epoch of the next training step."""
        return self.state.epoch

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Parameter name -> bool keep-mask, for every parameter currently masked."""
        return dict(self.state.masks)

    def step(self) -> None:
        """Call after every ``optimizer.step()``."""
        self._check_open()
        self.state.step += 1
        self.state.epoch = self.state.start_epoch + self.state.step / self.state.steps_per_epoch
        self._advance()

    def loss(self, loss: torch.Tensor, **ctx: Any) -> torch.Tensor:
        """Let modifiers change the loss (distillation adds its term; needs inputs=, outputs=)."""
        self._check_open()
        for modifier in self.modifiers:
            loss = modifier.on_loss(self.state, loss, **ctx)
        return loss

    def finalize(self) -> nn.Module:
        """End the recipe: weights keep their exact zeros, hooks are removed. Returns the model."""
        self._check_open()
        for modifier in self.modifiers:
            modifier.finalize(self.state)
        self._sync()
        self._apply_masks()
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._finalized = True
        return self.model

    def sparsity(self) -> dict[str, float]:
        """Fraction of exact zeros of every parameter a pruning modifier targets, in model order."""
        names = set(self.state.claims)
        return {
            name: float((p.detach() == 0).sum()) / p.numel()
            for name, p in self.state.model.named_parameters()
            if name in names
        }

    # --- resume ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this session bit-identically (tensors and plain values;
        save it with torch.save, load it with weights_only=True)."""
        return {
            "step": self.state.step,
            "start_epoch": self.state.start_epoch,
            "steps_per_epoch": self.state.steps_per_epoch,
            "masks": {name: mask.detach().cpu().clone() for name, mask in self.state.masks.items()},
            "modifiers": [{"type": type(m).__name__, "state": m.state_dict()} for m in self.modifiers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a session saved by ``state_dict`` (after loading the model and optimizer)."""
        self._check_open()
        keys = ("step", "start_epoch", "steps_per_epoch", "masks", "modifiers")
        if not isinstance(state, dict) or not set(keys) <= set(state):
            found = ", ".join(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(
                f"the saved session state is not one Session.state_dict() wrote: it needs "
                f"{', '.join(keys)}; found {found or 'nothing'}"
            )
        saved = [entry["type"] for entry in state["modifiers"]]
        ours = [type(m).__name__ for m in self.modifiers]
        if saved != ours:
            raise CheckpointError(
                f"the saved session ran modifiers {saved}, this recipe has {ours}: resume with the "
                "recipe the run started with"
            )
        if state["steps_per_epoch"] != self.state.steps_per_epoch:
            raise CheckpointError(
                f"the saved session had steps_per_epoch={state['steps_per_epoch']}, this one "
                f"{self.state.steps_per_epoch}: resume with the same data and batch size"
            )
        params = dict(self.state.model.named_parameters())
        for name, mask in state["masks"].items():
            if name not in params or params[name].shape != mask.shape:
                raise CheckpointError(f"saved mask {name!r} does not fit the model's parameters")
        for modifier, entry in zip(self.modifiers, state["modifiers"]):
            modifier.load_state_dict(entry["state"])
        self.state.step = int(state["step"])
        self.state.start_epoch = float(state["start_epoch"])
        self.state.epoch = self.state.start_epoch + self.state.step / self.state.steps_per_epoch
        self.state.masks.clear()
        self.state.masks.update(
            {name: mask.to(device=params[name].device, dtype=torch.bool) for name, mask in state["masks"].items()}
        )
        self._sync()
        self._apply_masks()

    # --- masks ----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._finalized:
            raise RuntimeError("this session is finalized; create a new one with sparsify.apply")

    def _advance(self) -> None:
        for modifier in self.modifiers:
            modifier.on_step_end(self.state)
        self._sync()
        self._apply_masks()

    def _sync(self) -> None:
        """Pick up masks the modifiers added, changed or released since the last step."""
        masks = self.state.masks
        changed = False
        for name in [n for n in self._bool if n not in masks]:
            self._hooks.pop(name).remove()
            del self._bool[name], self._float[name]
            changed = True
        for name, mask in masks.items():
            if self._bool.get(name) is mask:
                continue
            param = self.state.param(name)
            factor = mask.to(device=param.device, dtype=param.dtype)
            self._bool[name], self._float[name] = mask, factor
            self._clear_optimizer_state(param, factor)
            if name not in self._hooks:
                self._hooks[name] = param.register_hook(partial(self._mask_grad, name))
            changed = True
        if changed:
            self._params = [self.state.param(n) for n in self._float]
            self._factors = list(self._float.values())

    def _mask_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad * self._float[name]

    @torch.no_grad()
    def _clear_optimizer_state(self, param: torch.Tensor, factor: torch.Tensor) -> None:
        # momentum / Adam moments of newly pruned weights would otherwise keep pushing them
        if self.state.optimizer is None:
            return
        for value in self.state.optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.mul_(factor)

    @torch.no_grad()
    def _apply_masks(self) -> None:
        if self._params:
            torch._foreach_mul_(self._params, self._factors)


def apply(
    model: nn.Module,
    recipe: Recipe | str | Path,
    optimizer: torch.optim.Optimizer | None = None,
    steps_per_epoch: int = 1,
    start_epoch: float = 0.0,
    teacher: nn.Module | None = None,
) -> Session:
    """Apply ``recipe`` (a Recipe, a YAML path or YAML text) to ``model`` for a training loop."""
    return Session(model, recipe, optimizer, steps_per_epoch, start_epoch, teacher)
