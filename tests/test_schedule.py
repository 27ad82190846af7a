"""Ultralytics' warmup, lr schedule and accumulation ramp as a pure function of the iteration."""

from __future__ import annotations

import pytest

from yolods.schedule import Schedule


def make_schedule(**overrides) -> Schedule:
    fields = dict(
        epochs=10,
        batches_per_epoch=50,
        accumulate=4,
        lr0_per_group=(0.01, 0.01, 0.01),
        bias_groups=(False, False, True),
        lrf=0.01,
        cos_lr=False,
        momentum=0.937,
        warmup_epochs=3.0,
        warmup_momentum=0.8,
        warmup_bias_lr=0.1,
    )
    return Schedule(**{**fields, **overrides})


def test_warmup_starts_from_ultralytics_values_and_lands_on_targets():
    schedule = make_schedule()
    assert schedule.warmup_iterations == 150
    start = schedule.at(0, epoch=0)
    assert start.lrs == [0.0, 0.0, 0.1] and start.momentum == pytest.approx(0.8) and start.accumulate == 1
    end = schedule.at(150, epoch=2)
    target = 0.01 * schedule.lr_factor(2)
    assert end.lrs == pytest.approx([target] * 3) and end.momentum == pytest.approx(0.937) and end.accumulate == 4


def test_accumulation_ramps_monotonically_during_warmup():
    schedule = make_schedule()
    ramp = [schedule.at(i, epoch=i // 50).accumulate for i in range(151)]
    assert ramp == sorted(ramp) and set(ramp) == {1, 2, 3, 4}


def test_linear_and_cosine_factors_end_at_lrf():
    assert make_schedule().lr_factor(0) == 1.0
    assert make_schedule().lr_factor(10) == pytest.approx(0.01)
    assert make_schedule(cos_lr=True).lr_factor(10) == pytest.approx(0.01)
    assert make_schedule(cos_lr=True).lr_factor(5) == pytest.approx(0.505)


def test_single_epoch_runs_have_no_warmup():
    """Ultralytics keeps at least the last epoch out of warmup."""
    schedule = make_schedule(epochs=1)
    assert schedule.warmup_iterations == 0
    assert schedule.at(0, epoch=0).lrs == [0.01, 0.01, 0.01]


def test_without_warmup_momentum_is_left_as_the_optimizer_has_it():
    """Ultralytics sets momentum only during warmup: with none, SGD keeps the momentum it was built with."""
    schedule = make_schedule(epochs=1)
    assert schedule.warmup_iterations == 0  # the last epoch is never warmup
    assert schedule.at(0, epoch=0).momentum is None and schedule.at(0, epoch=0).lrs == [0.01] * 3
