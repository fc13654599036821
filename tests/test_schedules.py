"""Schedules: the Zhu & Gupta cubic ramp and friends, update grids, learning-rate curves."""

import math

import pytest

from sparsify import schedules


def test_cubic_matches_zhu_gupta_formula():
    for epoch in (0.0, 0.5, 1.0, 2.25, 3.0, 4.0):
        x = min(1.0, max(0.0, (epoch - 1.0) / 2.0))
        expected = 0.05 + (0.9 - 0.05) * (1 - (1 - x) ** 3)
        assert schedules.sparsity_at(epoch, 1.0, 3.0, 0.05, 0.9) == pytest.approx(expected, abs=1e-12)


def test_linear_and_inverse_cubic():
    assert schedules.sparsity_at(1.5, 1.0, 2.0, 0.0, 0.8, "linear") == pytest.approx(0.4)
    assert schedules.sparsity_at(1.5, 1.0, 2.0, 0.0, 0.8, "inverse_cubic") == pytest.approx(0.1)
    with pytest.raises(ValueError):
        schedules.sparsity_at(1.5, 1.0, 2.0, 0.0, 0.8, "exp")


def test_one_shot_when_start_equals_end():
    assert schedules.sparsity_at(0.99, 1.0, 1.0, 0.0, 0.8) == 0.0
    assert schedules.sparsity_at(1.0, 1.0, 1.0, 0.0, 0.8) == 0.8


def test_next_update_stays_on_the_grid():
    assert schedules.next_update(0.0, 0.0, 0.5) == 0.5
    assert schedules.next_update(0.7, 0.0, 0.5) == 1.0  # a late update does not shift the grid
    assert schedules.next_update(1.0 - 1e-12, 0.0, 0.5) == 1.5  # float drift counts as on time


def test_lr_curves():
    assert schedules.lr_at(0.0, 0.0, 4.0, 0.1, 0.0, "linear") == pytest.approx(0.1)
    assert schedules.lr_at(1.0, 0.0, 4.0, 0.1, 0.0, "linear") == pytest.approx(0.075)
    assert schedules.lr_at(2.0, 0.0, 4.0, 0.1, 0.0, "cosine") == pytest.approx(0.05)
    assert schedules.lr_at(1.0, 0.0, 4.0, 0.1, 0.0, "cosine") == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert schedules.lr_at(9.0, 0.0, 4.0, 0.1, 0.01, "cosine") == pytest.approx(0.01)


def test_step_decay():
    assert schedules.step_lr_at(2.5, 0.0, 1.0, 0.5, step_size=1.0) == 0.25
    assert schedules.step_lr_at(2.5, 0.0, 1.0, 0.1, milestones=[1.0, 3.0]) == pytest.approx(0.1)
    assert schedules.step_lr_at(3.0, 0.0, 1.0, 0.1, milestones=[1.0, 3.0]) == pytest.approx(0.01)
    assert schedules.step_lr_at(2.0, 1.0, 1.0, 0.5) == 0.5  # exponential: every epoch from start
