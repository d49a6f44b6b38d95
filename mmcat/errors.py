"""Every error a user can cause and fix (a setting, a path, the data, a model that cannot be found), in one place.

The CLI prints any ``UserError`` as one line and exits 2, with no traceback; any other exception is a bug and keeps
its traceback. The messages are one line that says what to change. Each class keeps the built-in base it had before
(``ValueError`` / ``RuntimeError``), so callers that catch those still do.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; its message is one line naming the setting, path or sample."""


class ConfigError(UserError, ValueError):
    """A user configuration problem; its message is one line and names the offending key or file."""


class DataError(UserError, ValueError):
    """A data-configuration problem with a one-line message that says what to change."""


class BadSampleError(UserError, RuntimeError):
    """A bad sample met with ``data.strict=true`` (instead of skipping and counting it)."""


class ModelLoadError(UserError, RuntimeError):
    """A model or tokenizer that cannot be found; the message is one line and says what to do."""


class OutputError(ConfigError):
    """The output could not be written (disk full, quota, read-only file system); one line naming the path."""


__all__ = ["UserError", "ConfigError", "DataError", "BadSampleError", "ModelLoadError", "OutputError"]
