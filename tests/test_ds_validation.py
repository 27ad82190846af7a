"""validate_deepspeed_config: every mistake in a DeepSpeed JSON is one ConfigError line naming its key."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch.distributed

from yolods import ds_validation
from yolods.config import PRECISIONS, ConfigError, default_deepspeed_config
from yolods.ds_validation import validate_deepspeed_config

SOURCE = "--deepspeed_config my.json"
DS_CONFIGS = sorted((Path(__file__).parent.parent / "ds_configs").glob("*.json"))


def rejection(config: object) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_deepspeed_config(config, source=SOURCE)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{SOURCE}: ")
    return message


def everything_yolods_writes() -> dict:
    """A config with every key yolods itself adds (resolve_deepspeed_config, place_monitor_outputs, --comms_logger)."""
    config = default_deepspeed_config(zero_stage=3, precision="bf16")
    config.update(
        bf16={"enabled": True},
        data_types={"buffer_dtype": "bf16"},
        comms_logger={"enabled": True, "verbose": False, "prof_all": True},
        tensorboard={"enabled": True, "output_path": "runs/x/deepspeed", "job_name": "tensorboard"},
        csv_monitor={"enabled": True, "output_path": "runs/x/deepspeed", "job_name": "csv_monitor"},
        train_micro_batch_size_per_gpu=8,
        gradient_accumulation_steps=2,
        train_batch_size=32,
    )
    del config["torch_autocast"]
    return config


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda path: path.name)
def test_shipped_configs_pass(path: Path) -> None:
    validate_deepspeed_config(json.loads(path.read_text()), source=str(path))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_default_configs_pass(stage: int, precision: str) -> None:
    validate_deepspeed_config(default_deepspeed_config(zero_stage=stage, precision=precision), source="defaults")


def test_everything_yolods_writes_passes() -> None:
    validate_deepspeed_config(everything_yolods_writes(), source="resolved")


def test_input_is_left_untouched() -> None:
    # DeepSpeed's parser writes into the dict it gets (data_efficiency); the validator must parse a copy.
    config = everything_yolods_writes()
    before = copy.deepcopy(config)
    validate_deepspeed_config(config, source="resolved")
    assert config == before


def test_comment_keys_are_allowed_where_deepspeed_ignores_them() -> None:
    config = default_deepspeed_config(zero_stage=2, precision="bf16")
    config["_comment"] = "tuned for yolov8n"
    config["torch_autocast"]["_note"] = "as Ultralytics AMP"
    validate_deepspeed_config(config, source="commented")


def test_comment_inside_a_pydantic_section_is_refused() -> None:
    # DeepSpeedZeroConfig forbids extra keys, so DeepSpeed itself would crash on it in deepspeed.initialize.
    message = rejection({"zero_optimization": {"stage": 2, "_comment": "x"}})
    assert "zero_optimization._comment" in message
    assert "comments included" in message


def test_cross_key_rule_of_deepspeed_is_not_blamed_on_one_key_alone() -> None:
    # bf16_master_weights_and_grads needs ZeRO 1-3: fine with stage 2, refused at stage 0.
    bf16 = {"enabled": True, "bf16_master_weights_and_grads": True}
    validate_deepspeed_config({"zero_optimization": {"stage": 2}, "bf16": bf16}, source="ok")
    assert "bf16_master_weights_and_grads" in rejection({"zero_optimization": {"stage": 0}, "bf16": bf16}).lower()


@pytest.mark.parametrize(
    ("config", "named", "hint"),
    [
        # unknown or misspelt top-level keys, which DeepSpeed silently ignores
        ({"zero_optimisation": {"stage": 2}}, "zero_optimisation", "did you mean zero_optimization?"),
        ({"gradient_cliping": 1.0}, "gradient_cliping", "did you mean gradient_clipping?"),
        ({"train_micro_batch_size": 8}, "train_micro_batch_size", "did you mean train_micro_batch_size_per_gpu?"),
        ({"totally_unrelated": 1}, "totally_unrelated", "remove it"),
        # keys DeepSpeed 0.19.8 removed: its own message
        ({"amp": {"enabled": True}}, "amp", "removed"),
        # unknown keys inside sections DeepSpeed validates with pydantic
        (
            {"zero_optimization": {"reduce_bucket_sise": 1}},
            "zero_optimization.reduce_bucket_sise",
            "did you mean zero_optimization.reduce_bucket_size?",
        ),
        (
            {"zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memroy": True}}},
            "zero_optimization.offload_optimizer.pin_memroy",
            "did you mean zero_optimization.offload_optimizer.pin_memory?",
        ),
        (
            {"bf16": {"enabled": True, "immediate_grad_updat": True}},
            "bf16.immediate_grad_updat",
            "immediate_grad_update",
        ),
        ({"fp16": {"enabled": True, "loss_scal": 0}}, "fp16.loss_scal", "did you mean fp16.loss_scale?"),
        ({"comms_logger": {"enabled": True, "verbos": True}}, "comms_logger.verbos", "comms_logger.verbose"),
        ({"tensorboard": {"enabled": True, "outpt_path": "x"}}, "tensorboard.outpt_path", "tensorboard.output_path"),
        ({"wandb": {"enabled": True, "projet": "x"}}, "wandb.projet", "wandb.project"),
        ({"csv_monitor": {"enabled": True, "jobname": "x"}}, "csv_monitor.jobname", "csv_monitor.job_name"),
        ({"timers": {"throughput": {"enabld": True}}}, "timers.throughput.enabld", "timers.throughput.enabled"),
        ({"compile": {"deepcompil": True}}, "compile.deepcompil", "compile.deepcompile"),
        # unknown keys inside sections DeepSpeed reads with plain dict.get (silently ignored)
        ({"torch_autocast": {"enable": True}}, "torch_autocast.enable", "did you mean torch_autocast.enabled?"),
        ({"data_types": {"buffer_dtyp": "bf16"}}, "data_types.buffer_dtyp", "data_types.buffer_dtype"),
        (
            {"activation_checkpointing": {"partition_activation": True}},
            "activation_checkpointing.partition_activation",
            "activation_checkpointing.partition_activations",
        ),
        ({"flops_profiler": {"enabled": True, "profile_steps": 1}}, "flops_profiler.profile_steps", "profile_step"),
        # out of range and wrong types inside pydantic sections
        ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage=7", "0, 1, 2 or 3"),
        ({"zero_optimization": {"reduce_bucket_size": "big"}}, "zero_optimization.reduce_bucket_size", "integer"),
        (
            {"zero_optimization": {"reduce_bucket_size": -1}},
            "zero_optimization.reduce_bucket_size=-1",
            "greater than 0",
        ),
        (
            {"zero_optimization": {"allgather_bucket_size": -1}},
            "zero_optimization.allgather_bucket_size=-1",
            "greater than or equal to 0",
        ),
        (
            {"zero_optimization": {"stage3_prefetch_bucket_size": -5}},
            "zero_optimization.stage3_prefetch_bucket_size=-5",
            "greater than or equal to 0",
        ),
        ({"zero_optimization": {"overlap_comm": "sometimes"}}, "zero_optimization.overlap_comm", "boolean"),
        ({"zero_optimization": {"offload_optimizer": {"device": "gpu"}}}, "offload_optimizer.device", "'cpu'"),
        ({"fp16": {"enabled": True, "loss_scale": -1}}, "fp16.loss_scale", ">= 0"),
        ({"csv_monitor": {"output_path": 3}}, "csv_monitor.output_path=3", "string"),
        # a section of the wrong JSON type
        ({"zero_optimization": 2}, "zero_optimization", "JSON object"),
        ({"zero_optimization": True}, "zero_optimization", "JSON object"),
        ({"torch_autocast": "bf16"}, "torch_autocast", "JSON object"),
        ({"tensorboard": [1]}, "tensorboard", "JSON object"),
        ({"bf16": None}, "bf16", "JSON object"),
        # scalars DeepSpeed reads without checking
        ({"gradient_clipping": -1.0}, "gradient_clipping=-1.0", ">= 0"),
        ({"gradient_clipping": "10"}, "gradient_clipping", "number"),
        ({"gradient_clipping": True}, "gradient_clipping", "number"),
        ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu=0", "positive integer"),
        ({"train_micro_batch_size_per_gpu": 8.5}, "train_micro_batch_size_per_gpu", "positive integer"),
        ({"gradient_accumulation_steps": -2}, "gradient_accumulation_steps", "positive integer"),
        ({"train_batch_size": "auto"}, "train_batch_size", "positive integer"),
        ({"train_batch_size": True}, "train_batch_size", "positive integer"),
        ({"steps_per_print": 0}, "steps_per_print", "positive integer"),
        ({"wall_clock_breakdown": "false"}, "wall_clock_breakdown", "true or false"),
        ({"zero_allow_untested_optimizer": 1}, "zero_allow_untested_optimizer", "true or false"),
        ({"torch_autocast": {"enabled": "false"}}, "torch_autocast.enabled", "true or false"),
        ({"bf16": {"enabled": "yes"}}, "bf16.enabled", "true or false"),
        # dtype names
        ({"torch_autocast": {"enabled": True, "dtype": "bf17"}}, "torch_autocast.dtype", "bf16"),
        ({"data_types": {"buffer_dtype": "half_float"}}, "data_types.buffer_dtype", "bf16"),
        # values DeepSpeed refuses outside pydantic, and rules across keys
        ({"communication_data_type": "fp8"}, "communication_data_type", "fp32"),
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "combination", "fp16"),
        ({"zero_optimization": {"stage": 3}, "gradient_allreduce_op": "sum"}, "gradient_allreduce_op", "stage 3"),
    ],
)
def test_mistake_is_named(config: dict, named: str, hint: str) -> None:
    message = rejection(config)
    assert named in message
    assert hint in message


def test_not_a_json_object() -> None:
    assert "JSON object" in rejection([{"zero_optimization": {"stage": 2}}])


def test_mistake_next_to_a_valid_config_is_found() -> None:
    config = default_deepspeed_config(zero_stage=2, precision="fp16")
    config["zero_optimization"]["reduce_bucket_sise"] = config["zero_optimization"].pop("reduce_bucket_size")
    assert "zero_optimization.reduce_bucket_sise" in rejection(config)


def test_known_keys_are_traced_from_deepspeed() -> None:
    known = ds_validation._deepspeed_top_level_keys()
    yolods_keys = set(everything_yolods_writes()) | {"zero_force_ds_cpu_optimizer", "fp16", "torch_autocast"}
    assert yolods_keys <= known
    # DeepSpeed 0.19.8 refuses these as removed; suggesting one would send the user to another error.
    assert not {"amp", "nebula", "elasticity", "sparse_attention"} & known
    assert {"zero_optimization", "bf16", "fp16", "torch_autocast", "tensorboard"} <= ds_validation._deepspeed_sections()
    assert "gradient_clipping" not in ds_validation._deepspeed_sections()


def test_fast_and_without_a_process_group() -> None:
    for derived in (
        ds_validation._deepspeed_top_level_keys,
        ds_validation._deepspeed_section_keys,
        ds_validation._deepspeed_sections,
        ds_validation._deepspeed_scalar_types,
    ):
        derived.cache_clear()
    start = time.perf_counter()
    for path in DS_CONFIGS:
        validate_deepspeed_config(json.loads(path.read_text()), source=str(path))
    rejection({"zero_optimization": {"stage": 7}})
    assert time.perf_counter() - start < 1.0
    assert not torch.distributed.is_initialized()
