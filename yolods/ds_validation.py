"""Check a DeepSpeed JSON against what DeepSpeed itself accepts, before any process group exists.

Glue around `deepspeed.runtime.config.DeepSpeedConfig`, the parser `deepspeed.initialize` runs; it needs no
process group (it falls back to rank 0 of 1). The config is parsed as a whole, and when DeepSpeed refuses it,
each top-level key again on its own to name the culprit. Errors of DeepSpeed's pydantic models
(`DeepSpeedZeroConfig` and its offload models, `DeepSpeedBF16Config`, `DeepSpeedFP16Config`, `CommsLoggerConfig`,
the tensorboard/wandb/csv_monitor/comet, compile, timers, hybrid_engine, tensor_parallel models) become one line
with the full key path; DeepSpeed's other refusals (removed keys, bf16 with fp16, ...) keep DeepSpeed's words.

Written here by hand, because DeepSpeed does not check them (it reads them with a bare `dict.get`):

- top-level keys it does not know (it ignores them silently); the known ones are traced from DeepSpeed's own
  parser, see `_deepspeed_top_level_keys`;
- keys inside the sections it reads key by key with no pydantic model (`_PLAIN_SECTIONS`);
- JSON types: sections must be objects, `enabled` a boolean, batch sizes positive integers, flags true/false,
  `gradient_clipping` a number >= 0, dtypes names DeepSpeed's `DtypeEnum` knows (it checks `data_types.*` only
  at engine setup).

Keys starting with "_" at the top level or inside a plain section are taken as comments ("_comment": "...") and
skipped: DeepSpeed never reads them there. Inside a section DeepSpeed validates with pydantic it refuses every
unknown key, comments included, so there they are reported like any other unknown key.

Not caught, because DeepSpeed accepts them: inside pydantic sections DeepSpeedConfigModel drops every key whose
value is "auto" before validating (a Hugging Face convention), so a misspelt key set to "auto" passes.
Batch keys are only type-checked: their product depends on the world size, which `resolve_deepspeed_config`
checks.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import math
import re
import typing
from collections.abc import Iterable, Iterator
from functools import cache
from typing import Any

import deepspeed
import pydantic
from deepspeed.runtime import constants as ds_constants
from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError, DtypeEnum
from deepspeed.runtime.config_utils import DeepSpeedConfigModel
from deepspeed.utils import logger as ds_logger

from yolods.config import GRADIENT_CLIP_NORM
from yolods.ds_offload import offload_problem
from yolods.errors import ConfigError

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")

# Read by DeepSpeed only once torch.distributed is up (deepspeed/__init__.py `initialize`, and
# runtime/config.py `DeepSpeedConfig.__init__` after `dist.get_rank()`), so the trace below cannot see them.
_KEYS_READ_AFTER_DIST_INIT = frozenset({"sequence_parallel_size", "data_parallel_size"})

# Sections DeepSpeed reads key by key with plain `dict.get` (no pydantic model, so unknown keys are silently
# ignored) and only while parsing the config, so a trace of that parse lists every key it reads:
# torch_autocast (runtime/config.py get_torch_autocast_*), data_types (runtime/config.py _initialize_params),
# activation_checkpointing (runtime/activation_checkpointing/config.py), flops_profiler (profiling/config.py).
# Not optimizer/scheduler/checkpoint/pipeline/...: DeepSpeed reads those elsewhere or passes them through.
_PLAIN_SECTIONS = ("torch_autocast", "data_types", "activation_checkpointing", "flops_profiler")

# Keys whose value DeepSpeed hands to DtypeEnum (torch_autocast.dtype at parse time, with an error that names
# no key; data_types.* only in engine setup, long after the process group is up).
_DTYPE_KEYS = {"torch_autocast": ("dtype",), "data_types": ("grad_accum_dtype", "param_dtype", "buffer_dtype")}

# What DeepSpeed's parser raises on a value it cannot take: pydantic errors are ValueErrors, hand-written checks
# raise DeepSpeedConfigError (an Exception), ValueError or AssertionError, and a value of the wrong JSON type
# surfaces as TypeError/AttributeError/KeyError from `**section`, `.get`, `.lower()`.
_PARSE_ERRORS = (DeepSpeedConfigError, ValueError, AssertionError, TypeError, AttributeError, KeyError)


def validate_deepspeed_config(config: dict[str, Any], *, source: str) -> None:
    """Raise ConfigError for the first thing in `config` DeepSpeed would reject or silently ignore.

    Runs in a plain process: no process group, no accelerator, no engine (a few ms after `import deepspeed`).

    Args:
        config: The DeepSpeed config as loaded from JSON.
        source: Where it came from, e.g. "--deepspeed_config my.json"; every message starts with it.

    Raises:
        ConfigError: One line naming the offending key path and what to write instead.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: a DeepSpeed config is a JSON object {{...}}, not {_json_type(config)}")
    keys = [key for key in config if not _is_comment(key)]
    with _deepspeed_logs_muted():
        problem = (
            _first(_typed_problem(key, config[key]) for key in keys)
            # DeepSpeed's own verdict before ours on unknown keys: it refuses removed ones ("amp", ...) itself.
            or _deepspeed_problem(config, keys=keys)
            or _first(_known_key_problem(key) for key in keys)
            or offload_problem(config)  # what initialize refuses later, or ignores (yolods/ds_offload.py)
        )
    if problem:
        raise ConfigError(f"{source}: {problem}")


def _typed_problem(key: str, value: Any) -> str | None:
    """What DeepSpeed does not check about one top-level key: JSON types, ranges, keys in plain sections."""
    if key in BATCH_KEYS:
        # DeepSpeed checks them only against each other and the world size, which it knows only in initialize.
        return _positive_int_problem(key, value, fix="drop it and let yolods fill it from --batch")
    return (
        _section_type_problem(key, value)
        or _scalar_problem(key, value)
        or _plain_section_problem(key, value)
        or _dtype_problem(key, value)
    )


def _deepspeed_problem(config: dict[str, Any], *, keys: list[str]) -> str | None:
    """What DeepSpeedConfig (the parser deepspeed.initialize runs) says about `config`, pinned on one key if it can.

    Each key is parsed again on its own to find the culprit. Its own error counts when a pydantic model raised it
    (a model sees only its section) or when the whole config fails the same way; any other error alone comes
    from a rule across keys that the defaults of the absent keys broke (bf16_master_weights_and_grads without
    a ZeRO stage), and then the whole config's error is reported as a combination.
    """
    whole = _parse_error(config)
    if whole is None:
        return None
    for key in keys:
        alone = None if key in BATCH_KEYS else _parse_error({key: config[key]})
        if isinstance(alone, pydantic.ValidationError) or (alone is not None and str(alone) == str(whole)):
            return _describe(alone, config={key: config[key]}, what=key)
    return _describe(whole, config=config, what="this combination of settings")


def _section_type_problem(key: str, value: Any) -> str | None:
    """A section (a key DeepSpeed reads as a JSON object) holding something else, or a non-boolean `enabled`."""
    if key in _deepspeed_sections() and not isinstance(value, dict):
        return f"{key} must be a JSON object {{...}}, not {_json_type(value)} ({json.dumps(value)}); see DeepSpeed's config-json docs for its keys"
    if isinstance(value, dict) and "enabled" in value and not isinstance(value["enabled"], bool):
        # pydantic reads "false" as False, but torch_autocast's plain dict.get (and yolods' precision check)
        # as true: only a JSON boolean means the same thing everywhere.
        return f"{key}.enabled={json.dumps(value['enabled'])} must be true or false"
    return None


def _scalar_problem(key: str, value: Any) -> str | None:
    """A top-level flag or number of the wrong type or range (DeepSpeed reads them with a bare dict.get)."""
    expected = _deepspeed_scalar_types().get(key)
    if expected is bool and not isinstance(value, bool):
        return f"{key}={json.dumps(value)} must be true or false"
    if expected is float and not _is_number(value):
        return f"{key}={json.dumps(value)} must be a number"
    if key == "gradient_clipping" and _is_number(value) and value < 0:
        # DeepSpeed clips only when the value is > 0, so a negative one silently turns clipping off.
        return f"gradient_clipping={value} must be >= 0 (0 turns clipping off; yolods' default is {GRADIENT_CLIP_NORM})"
    if key == "steps_per_print" and value is not None:
        # DeepSpeed prints when global_steps % steps_per_print == 0: 0 divides by zero.
        return _positive_int_problem(key, value, fix="use a large number such as 1000000000 to silence it")
    return None


def _plain_section_problem(key: str, value: Any) -> str | None:
    """Unknown keys inside a section DeepSpeed reads with dict.get, where a typo is silently ignored."""
    if key not in _PLAIN_SECTIONS or not isinstance(value, dict):
        return None
    known = _deepspeed_section_keys(key)
    unknown = [sub_key for sub_key in value if not _is_comment(sub_key) and sub_key not in known]
    if not unknown:
        return None
    return _unknown_key_problem([key, unknown[0]], candidates=known, consequence="it would be silently ignored")


def _dtype_problem(key: str, value: Any) -> str | None:
    """A dtype name DeepSpeed's DtypeEnum does not know."""
    for sub_key in _DTYPE_KEYS.get(key, ()) if isinstance(value, dict) else ():
        dtype = value.get(sub_key)
        if dtype is None:
            continue
        try:
            DtypeEnum(dtype)
        except (ValueError, TypeError):
            names = ", ".join(member.name for member in DtypeEnum)
            return f"{key}.{sub_key}={json.dumps(dtype)} is not a dtype DeepSpeed knows; use {names} (or an alias such as bfloat16, float16)"
    return None


def _known_key_problem(key: str) -> str | None:
    """A top-level key DeepSpeed never reads, with the closest one it does."""
    if key in _deepspeed_top_level_keys():
        return None
    return _unknown_key_problem(
        [key], candidates=_deepspeed_top_level_keys(), consequence="DeepSpeed would silently ignore it"
    )


def _positive_int_problem(key: str, value: Any, *, fix: str) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return None
    return f"{key}={json.dumps(value)} must be a positive integer; {fix}"


def _unknown_key_problem(path: list[str], *, candidates: Iterable[str], consequence: str) -> str:
    """`path`'s last key is not one DeepSpeed knows there: name it and the closest known one."""
    where = f" in {'.'.join(path[:-1])}" if len(path) > 1 else ""
    parent = "".join(f"{part}." for part in path[:-1])
    matches = difflib.get_close_matches(path[-1], sorted(candidates), n=1)
    fix = f"did you mean {parent}{matches[0]}?" if matches else "remove it (see DeepSpeed's config-json docs)"
    return f"{'.'.join(path)} is not a key DeepSpeed {deepspeed.__version__} knows{where} ({consequence}); {fix}"


def _parse_error(config: dict[str, Any]) -> Exception | None:
    """The exception DeepSpeedConfig raises on `config`, or None."""
    try:
        _deepspeed_parse(config)
    except _PARSE_ERRORS as error:
        return error
    return None


def _describe(error: Exception, *, config: dict[str, Any], what: str) -> str:
    """DeepSpeed's complaint about `config` as one line."""
    if isinstance(error, pydantic.ValidationError):
        return _pydantic_problem(error, config=config)
    return f"DeepSpeed rejects {what}: {_one_line(str(error)) or type(error).__name__}"


def _deepspeed_parse(config: dict[str, Any]) -> DeepSpeedConfig:
    """DeepSpeedConfig(config) with the batch keys replaced by micro batch 1, which holds at any world size."""
    # Deep copy: DeepSpeed's parser writes into the dict it is given (e.g. adds data_efficiency.data_routing).
    probe = {key: copy.deepcopy(value) for key, value in config.items() if key not in BATCH_KEYS}
    probe["train_micro_batch_size_per_gpu"] = 1
    return DeepSpeedConfig(probe)


def _pydantic_problem(error: pydantic.ValidationError, *, config: dict[str, Any]) -> str:
    """One line for the first error of a DeepSpeed pydantic model, named by its full key path in `config`."""
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    section = list(config) if len(config) == 1 else []
    path = _path_in(config, loc) or [*section, *loc]
    if first["type"] == "extra_forbidden":
        fields = _model_field_names(error.title, first["loc"][:-1])
        problem = _unknown_key_problem(path, candidates=fields, consequence="DeepSpeed refuses it")
        if path[-1].startswith("_"):
            problem += f"; DeepSpeed refuses every unknown key in {'.'.join(path[:-1])}, comments included"
        return problem
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "enum":
        message = f"Input should be {_unique_choices(first['ctx']['expected'])}"
    dotted = ".".join(path)
    if message.startswith(dotted):  # DeepSpeed's own validators often name the key already
        return message
    shown = f"={json.dumps(first['input'], default=str)}" if loc else ""
    return f"{dotted}{shown}: {message[:1].lower()}{message[1:]}"


def _path_in(config: dict[str, Any], loc: list[str]) -> list[str] | None:
    """Where `loc` (relative to the model that failed) lies in `config`, as a full key path.

    Most models get a whole section (zero_optimization), the monitor model the whole config, the timers model
    only timers.throughput; so look for the first nested dict from which `loc` leads to an existing value.
    """
    if not loc:
        return None
    node: Any = config
    for part in loc[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and loc[-1] in node:
        return loc
    children = config.items() if isinstance(config, dict) else ()
    for key, child in children:
        if isinstance(child, dict) and (found := _path_in(child, loc)):
            return [key, *found]
    return None


@cache
def _deepspeed_top_level_keys() -> frozenset[str]:
    """Every top-level key DeepSpeedConfig reads, found by running it on a dict that records lookups.

    This follows DeepSpeedConfig.__init__ -> _initialize_params and each sub-config reader it calls
    (zero, precision, monitor, comms, checkpoint, aio, autotuning, ...; key names in runtime/constants.py and
    the readers' modules), so the list moves with the installed DeepSpeed. DeepSpeedConfig also looks up the
    keys it has removed ("amp", "nebula", ...) only to refuse them; those are dropped so that no suggestion
    points at one.
    """
    recorder = _KeyRecorder(train_micro_batch_size_per_gpu=1)
    with _deepspeed_logs_muted():
        DeepSpeedConfig(recorder)
    read = frozenset(recorder.read) | _KEYS_READ_AFTER_DIST_INIT
    return frozenset(key for key in read if not _is_removed(key))


def _is_removed(key: str) -> bool:
    """DeepSpeed refuses the key whatever it holds (runtime/config.py `_reject_removed_config_keys`)."""
    with _deepspeed_logs_muted():
        try:
            _deepspeed_parse({key: {}})
        except DeepSpeedConfigError:
            return True
        except _PARSE_ERRORS:
            return False
    return False


@cache
def _deepspeed_section_keys(section: str) -> frozenset[str]:
    """The keys DeepSpeedConfig reads inside `section` (one of _PLAIN_SECTIONS), traced like the top level."""
    recorder = _KeyRecorder()
    with _deepspeed_logs_muted():
        DeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, section: recorder})
    return frozenset(recorder.read)


@cache
def _deepspeed_sections() -> frozenset[str]:
    """Top-level keys DeepSpeed reads as a JSON object: it parses {} there, but not a number."""
    return frozenset(
        key for key in _deepspeed_top_level_keys() - set(BATCH_KEYS) if _parses({key: {}}) and not _parses({key: 1})
    )


@cache
def _deepspeed_scalar_types() -> dict[str, type]:
    """Top-level flags and numbers, typed by their defaults in deepspeed/runtime/constants.py.

    constants.py pairs each key NAME = "key" with NAME_DEFAULT; a bool default means a flag and a float default
    a number (gradient_clipping, gradient_predivide_factor). DeepSpeed reads them with a bare dict.get, so
    "wall_clock_breakdown": "false" would count as true.
    """
    names = vars(ds_constants)
    types: dict[str, type] = {}
    for name, key in names.items():
        default = names.get(f"{name}_DEFAULT", None)
        if isinstance(key, str) and key in _deepspeed_top_level_keys() and isinstance(default, (bool, float)):
            types[key] = type(default)
    return types


def _parses(config: dict[str, Any]) -> bool:
    with _deepspeed_logs_muted():
        return _parse_error(config) is None


class _KeyRecorder(dict):
    """A dict that records which keys are looked up (get, [], in, in .keys()) while DeepSpeed parses it."""

    def __init__(self, **items: Any) -> None:
        super().__init__(**items)
        self.read: set[str] = set()

    def __contains__(self, key: object) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def keys(self) -> _RecordingKeys:  # type: ignore[override]
        # DeepSpeed often writes `KEY in param_dict.keys()`; dict's own view would bypass __contains__.
        return _RecordingKeys(self)

    def __copy__(self) -> _KeyRecorder:
        # DeepSpeedConfig parses copy.copy(config): keep recording into the same object.
        return self


class _RecordingKeys:
    def __init__(self, recorder: _KeyRecorder) -> None:
        self._recorder = recorder

    def __contains__(self, key: object) -> bool:
        return key in self._recorder

    def __iter__(self) -> Iterator[str]:
        return iter(dict.keys(self._recorder))


def _model_field_names(title: str, loc: tuple[Any, ...]) -> list[str]:
    """Field names (and aliases) of the DeepSpeed model named `title`, or of its sub-model at `loc`."""
    model = next((cls for cls in _config_models() if cls.__name__ == title), None)
    for part in loc:
        field = model.model_fields.get(str(part)) if model else None
        model = _model_in(field.annotation) if field else None
    if model is None:
        return []
    return [name for key, field in model.model_fields.items() for name in (key, field.alias) if name]


def _config_models() -> Iterator[type[DeepSpeedConfigModel]]:
    pending = [DeepSpeedConfigModel]
    while pending:
        cls = pending.pop()
        yield cls
        pending.extend(cls.__subclasses__())


def _model_in(annotation: Any) -> type[DeepSpeedConfigModel] | None:
    """The DeepSpeed model inside an annotation such as Optional[DeepSpeedZeroOffloadParamConfig]."""
    if isinstance(annotation, type) and issubclass(annotation, DeepSpeedConfigModel):
        return annotation
    return next((model for arg in typing.get_args(annotation) if (model := _model_in(arg))), None)


def _unique_choices(expected: str) -> str:
    """'0, 1, 2, 3 or 3' (ZeroStageEnum has max_stage = 3) -> '0, 1, 2 or 3'."""
    choices = list(dict.fromkeys(re.split(r", | or ", expected)))
    return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"


@contextlib.contextmanager
def _deepspeed_logs_muted() -> Iterator[None]:
    """Silence DeepSpeed's deprecation warnings while we probe: it prints them again when it really parses."""
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ds_logger.setLevel(level)


def _first(problems: Iterable[str | None]) -> str | None:
    return next((problem for problem in problems if problem), None)


def _is_comment(key: object) -> bool:
    return isinstance(key, str) and key.startswith("_")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__
