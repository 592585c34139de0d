"""Errors a user can act on: the command prints the message in one line and exits with ``exit_code``."""

from __future__ import annotations


class MorphsetError(Exception):
    """A run-time condition the user must fix (not a usage error, not a bug)."""

    exit_code = 1


class ClusterLost(MorphsetError):
    """The Dask cluster can no longer run the build: no worker for a while, or the scheduler gone.
    Committed shards are kept; the build resumes when run again."""


class MissingPackage(MorphsetError, RuntimeError):
    """An optional package a setting needs is not installed; the message says which and how."""

    exit_code = 2
