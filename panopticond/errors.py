"""The one error type of panopticon, and the exit codes it maps to.

Every failure an operator can act on is raised as `PanopticonError` with a hint that
says what to do; the CLI catches it once, prints `panopticon: error: ...` and the hint,
and exits with its status. Tracebacks are shown only with `--debug`.
"""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    OK = 0
    # 1 is left to the agent's own failures and to `policy test` meaning DENY.
    ERROR = 2  # anything unexpected; the jail was torn down
    CONFIG = 3  # the config is invalid; nothing was touched
    USAGE = 64  # EX_USAGE: wrong command-line use
    NOPERM = 77  # EX_NOPERM: not root, or a refused user
    UNAVAILABLE = 69  # EX_UNAVAILABLE: a required tool, user or kernel feature is missing
    INTERRUPTED = 130


class PanopticonError(Exception):
    """An error the operator can fix. `hint` says how; never put a secret in either."""

    status = ExitStatus.ERROR

    def __init__(self, message: str, hint: str | None = None, status: ExitStatus | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message


class ConfigError(PanopticonError):
    """The config is invalid. `where` is `file:line` (or just the file) and `key` the dotted key."""

    status = ExitStatus.CONFIG

    def __init__(
        self,
        message: str,
        *,
        file: str = "",
        line: int | None = None,
        key: str | None = None,
        hint: str | None = None,
    ):
        self.file = file
        self.line = line
        self.key = key
        where = file
        if line is not None:
            where = f"{file}:{line}"
        prefix = where
        if key:
            prefix = f"{where}: {key}" if where else key
        super().__init__(f"{prefix}: {message}" if prefix else message, hint)
