"""Ultralytics' train settings (its cfg/default.yaml) with this run's values: the adapter for `ultralytics.cfg`.

The model's loss, the datasets and the validator all read these settings by Ultralytics' names, so yolods keeps
them in Ultralytics' own namespace type instead of a copy of its own.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from yolods.errors import ConfigError


def is_ultralytics_setting(key: str) -> bool:
    """True if `key` names a setting in Ultralytics' default.yaml (lr0, mosaic, box, ...)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return key in DEFAULT_CFG_DICT


def ultralytics_settings(overrides: dict[str, Any]) -> SimpleNamespace:
    """Ultralytics' defaults with `overrides`, type- and range-checked by Ultralytics itself.

    Raises:
        ConfigError: a value Ultralytics rejects (its own message, first line).
    """
    from ultralytics.cfg import get_cfg

    try:
        return get_cfg(overrides=overrides)
    except (SyntaxError, TypeError, ValueError, KeyError) as error:
        raise ConfigError(str(error).strip().splitlines()[0]) from None


def with_data(hyp: SimpleNamespace, data_yaml: str) -> SimpleNamespace:
    """A copy of `hyp` naming the data.yaml actually trained on (the synthetic set's is known only once drawn)."""
    return SimpleNamespace(**{**vars(hyp), "data": data_yaml})
