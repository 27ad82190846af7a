"""Memory features on real 2-rank jobs: activation checkpointing changes no number, at ZeRO-3 with bf16 and EMA."""

from __future__ import annotations

import csv

import pytest
from conftest import assert_ok, run_train, shipped_config_args

pytestmark = pytest.mark.multirank


def results(run_dir) -> list[dict[str, str]]:
    with (run_dir / "results.csv").open() as file:
        return [{key: value for key, value in row.items() if key != "time"} for row in csv.DictReader(file)]


def test_activation_checkpointing_trains_exactly_as_without(shipped_config_run, shapes_data, tmp_path):
    """ZeRO-3 (parameters gathered again for the recomputation), bf16 autocast, EMA and validation: every digit.

    Against the shipped ZeRO-3 bf16 config's run (test_train reads it too), with the same flags plus checkpointing.
    """
    plain = shipped_config_run("zero3_bf16.json")
    args = shipped_config_args("zero3_bf16.json", shapes_data, tmp_path, "--activation_checkpointing")
    assert_ok(run_train(args, nproc=2))
    assert results(tmp_path / "zero3_bf16") == results(plain)
