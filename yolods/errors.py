"""The exception types for user mistakes and a diverged run, importable by every module without cycles."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake in flags, files or configuration; its message is one line saying what to change.

    `yolods.train` prints it as `yolods: error: ...` on rank 0 and exits 2; on every rank with `every_rank`, for a
    mistake in the launcher's variables, where which rank is 0 is itself in doubt.
    """

    def __init__(self, message: str, *, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


class TrainingDiverged(Exception):
    """The train loss became NaN or infinite; raised on every rank together, before the epoch is saved.

    `yolods.train` prints it as `yolods: error: ...` on rank 0, after the run's summary, and exits 1.
    """
