"""Memory features on real 2-rank jobs: activation checkpointing changes no number, at ZeRO-3 with bf16 and EMA."""

from __future__ import annotations

import csv

import pytest
from conftest import assert_ok, run_train, small_run_args

pytestmark = pytest.mark.multirank


def results(run_dir) -> list[dict[str, str]]:
    with (run_dir / "results.csv").open() as file:
        return [{key: value for key, value in row.items() if key != "time"} for row in csv.DictReader(file)]


def test_activation_checkpointing_trains_exactly_as_without(shapes_data, tmp_path):
    """ZeRO-3 (parameters gathered again for the recomputation), bf16 autocast, EMA and validation: every digit."""
    flags = ("--zero", "3", "--precision", "bf16", "--nbs", "8")
    runs = {}
    for name, extra in (("plain", ()), ("checkpointed", ("--activation_checkpointing",))):
        assert_ok(run_train(small_run_args(shapes_data, tmp_path, name, *flags, *extra, epochs=1), nproc=2))
        runs[name] = results(tmp_path / name)
    assert runs["checkpointed"] == runs["plain"]
