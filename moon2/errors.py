"""Exceptions that carry a message meant for the user.

The CLI turns these into one clear sentence and an exit code; library code raises them
instead of printing or exiting.
"""

from __future__ import annotations

import errno
import os

DEBUG_ENV = "MOON2_DEBUG"

USER_OS_ERRORS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files",
}
"""OS errors a user's files or machine cause (not moon2's bugs), in words."""


def os_error_reason(exc: OSError) -> str | None:
    """The words for an OS error a user can cause, or None for any other (a bug)."""
    code = exc.errno
    if code is None and isinstance(exc, FileNotFoundError):  # pyarrow sets no errno
        code = errno.ENOENT
    return USER_OS_ERRORS.get(code or 0)


def debug_enabled() -> bool:
    """``MOON2_DEBUG=1``: show the traceback of every error, and let code that would turn a
    failure into a warning raise it instead."""
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


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
