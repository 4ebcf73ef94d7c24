"""Errors a user can cause. The CLI prints them as one line and exits with code 2 (1 for a
collective timeout, a failure of the job rather than of the input)."""

from __future__ import annotations


class PnnhError(Exception):
    """A user's mistake (bad name, bad number, missing file): one clear line, exit code 2.

    The message names the offending field or file. ``field`` is kept for programmatic use.
    """

    exit_code = 2
    every_rank = False  #: under torchrun, only rank 0 prints it (every rank meets the same error)

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class ConfigError(PnnhError):
    """A configuration value (flag or config-file key) is wrong."""


class DataError(PnnhError):
    """A dataset name, directory or file is wrong or unreadable."""


class CheckpointError(PnnhError):
    """A checkpoint is missing, truncated, corrupted or not a pnnh checkpoint."""


class CollectiveTimeout(PnnhError):
    """A torchrun collective waited longer than ``dist_timeout``: another rank hung or died.
    A failure of the job, not of the input: exit code 1, and every rank that meets it says so
    (torchrun then stops the others, or restarts the job under ``--max-restarts``)."""

    exit_code = 1
    every_rank = True


class TrainingDiverged(PnnhError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
