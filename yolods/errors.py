"""The one exception type for user mistakes, importable by every module without cycles."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake in flags, files or configuration; its message is one line saying what to change.

    `yolods.train` prints it as `yolods: error: ...` on rank 0 and exits 2.
    """
