"""Schedules as pure functions of the epoch: sparsity ramps, update timing, learning rates."""

from __future__ import annotations

import math

INTER_FUNCS = ("cubic", "linear", "inverse_cubic")
LR_FUNCS = ("linear", "cosine", "cyclic_linear")

# epochs are sums of 1/steps_per_epoch: compare with a tolerance, never with ==
EPS = 1e-9


def progress(epoch: float, start: float, end: float) -> float:
    """Fraction of [start, end] elapsed at ``epoch``, clamped to [0, 1]; a zero-length range is
    complete as soon as it starts."""
    if end <= start:
        return 1.0 if epoch >= start - EPS else 0.0
    return min(1.0, max(0.0, (epoch - start) / (end - start)))


def interpolate(x: float, init: float, final: float, inter_func: str = "cubic") -> float:
    """Value at progress ``x`` in [0, 1] between init and final.

    cubic (Zhu & Gupta 2017): prune fast while many redundant weights remain, then slow down so the
    network can recover: ``init + (final - init) * (1 - (1 - x)^3)``.
    inverse_cubic: the mirror image, slow first: ``init + (final - init) * x^3``.
    """
    if inter_func == "cubic":
        f = 1.0 - (1.0 - x) ** 3
    elif inter_func == "linear":
        f = x
    elif inter_func == "inverse_cubic":
        f = x**3
    else:
        raise ValueError(f"unknown inter_func {inter_func!r}; use one of {', '.join(INTER_FUNCS)}")
    return init + (final - init) * f


def sparsity_at(
    epoch: float, start: float, end: float, init: float, final: float, inter_func: str = "cubic"
) -> float:
    """Target sparsity at ``epoch`` of a gradual pruning schedule from ``start`` to ``end``."""
    return interpolate(progress(epoch, start, end), init, final, inter_func)


def next_update(epoch: float, start: float, update_frequency: float) -> float:
    """The first scheduled update epoch strictly after an update made at ``epoch``.

    Updates sit on the grid start + k * update_frequency, so a late update (the loop's epochs
    fall between grid points) does not shift every later one.
    """
    k = math.floor((epoch - start) / update_frequency + EPS) + 1
    return start + k * update_frequency


def lr_at(
    epoch: float, start: float, end: float, init_lr: float, final_lr: float, func: str,
    cycle_epochs: float | None = None,
) -> float:
    """Learning rate of a linear or cosine ramp from init_lr at ``start`` to final_lr at ``end``;
    cyclic_linear restarts the linear ramp every ``cycle_epochs``."""
    if func == "cyclic_linear":
        if not cycle_epochs or cycle_epochs <= 0:
            raise ValueError("cyclic_linear needs cycle_epochs > 0")
        x = ((max(epoch, start) - start) % cycle_epochs) / cycle_epochs
        return init_lr + (final_lr - init_lr) * x
    x = progress(epoch, start, end)
    if func == "linear":
        return init_lr + (final_lr - init_lr) * x
    if func == "cosine":
        return final_lr + (init_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * x))
    raise ValueError(f"unknown lr_func {func!r}; use one of {', '.join(LR_FUNCS)}")


def step_lr_at(
    epoch: float,
    start: float,
    init_lr: float,
    gamma: float,
    step_size: float | None = None,
    milestones: list[float] | None = None,
) -> float:
    """Step decay: multiply by gamma every ``step_size`` epochs after ``start`` (StepLR), at each
    epoch in ``milestones`` (MultiStepLR), or every epoch when neither is given (ExponentialLR).
    Milestones are absolute epochs (the epochs a user reads in the training log)."""
    if milestones is not None:
        n = sum(1 for m in milestones if epoch >= m - EPS)
    elif step_size is not None:
        n = math.floor((epoch - start) / step_size + EPS)
    else:
        n = math.floor(epoch - start + EPS)
    return init_lr * gamma ** max(0, n)
