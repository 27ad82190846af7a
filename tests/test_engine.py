"""The Trainer's own rules, checked against Ultralytics' objects where it has one."""

from __future__ import annotations

import pytest

import yolods  # noqa: F401  (offline environment before Ultralytics is imported)
from yolods.engine import patience_exhausted


@pytest.mark.parametrize(
    "history",
    [
        [0.1, 0.2, 0.2, 0.2],  # a tie is no improvement
        [0.3, 0.1, 0.2],
        [0.0, 0.0, 0.0, 0.0],  # a best of 0 moves with every epoch
        [0.0, 0.1, 0.1, 0.05, 0.1],
        [0.2, None, 0.1, 0.1],  # an epoch without fitness
        [0.5, 0.4, None],
        [0.1, 0.2, 0.3, 0.4],
    ],
)
@pytest.mark.parametrize("patience", [0, 1, 2, 3])
def test_early_stopping_decides_as_ultralytics_does_after_every_epoch(history, patience):
    from ultralytics.utils.torch_utils import EarlyStopping

    stopper = EarlyStopping(patience=patience)
    for epoch in range(1, len(history) + 1):
        ultralytics_stops = stopper(epoch, history[epoch - 1])
        assert patience_exhausted(history[:epoch], patience) == ultralytics_stops, (history[:epoch], patience)
