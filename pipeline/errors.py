"""Errors a user can act on: the command prints the message in one line and exits with ``exit_code``."""

from __future__ import annotations


class MorphsetError(Exception):
    """A run-time condition the user must fix (not a usage error, not a bug)."""

    exit_code = 1
