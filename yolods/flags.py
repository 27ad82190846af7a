"""argparse for yolods' commands, with yolods' one-line errors.

argparse prints its usage and an error of its own and exits; yolods' commands raise ConfigError instead, which
they print as `yolods: error: ...` (exit 2), with the fix when there is one: Ultralytics' `key=value` habit
becomes `--key value` (or `--hyp key=value`), a misspelled flag gets the nearest real one. Flags are never
abbreviated: argparse would take `--epoch 3` for `--epochs 3` and `--close` for whichever flag it begins.
"""

from __future__ import annotations

import argparse
import difflib
from typing import NoReturn

from yolods.errors import ConfigError

UNRECOGNIZED = "unrecognized arguments: "


class FlagParser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        hints = [self._hint(word) for word in _unrecognized(message)]
        raise ConfigError("; ".join([message, *(hint for hint in hints if hint)]))

    def _hint(self, word: str) -> str | None:
        flags = [flag for flag in self._option_string_actions if flag.startswith("--")]
        key, is_setting, value = word.partition("=")
        if is_setting and not key.startswith("-"):
            if f"--{key}" in flags:
                return f"pass {word} as --{key} {value} (yolods takes flags, not Ultralytics' key=value)"
            if "--hyp" in flags and _is_ultralytics_setting(key):
                return f"pass {word} as --hyp {word}"
            return f"{key} is neither a flag of {self.prog} nor an Ultralytics setting (see --help)"
        nearest = difflib.get_close_matches(key, flags, n=2)
        return f"did you mean {' or '.join(nearest)}?" if key.startswith("-") and nearest else None


def _unrecognized(message: str) -> list[str]:
    return message.removeprefix(UNRECOGNIZED).split() if message.startswith(UNRECOGNIZED) else []


def _is_ultralytics_setting(key: str) -> bool:
    from yolods.hyp import is_ultralytics_setting  # imports Ultralytics: only for this hint

    return is_ultralytics_setting(key)
