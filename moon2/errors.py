"""Exceptions that carry a message meant for the user.

The CLI turns these into one clear sentence and an exit code; library code raises them
instead of printing or exiting.
"""

from __future__ import annotations


class Moon2Error(Exception):
    """Base class for errors whose message is shown to the user as is."""

    exit_code = 1


class InputError(Moon2Error):
    """The input cannot be read at all: missing path, not Parquet, wrong columns."""

    exit_code = 2


class ConfigError(Moon2Error):
    """A configuration file or option is invalid."""

    exit_code = 2


class ImageDecodeError(Moon2Error):
    """An image cell cannot be turned into pixels (corrupt bytes, missing file, bad URI)."""
