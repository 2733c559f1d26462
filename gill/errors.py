"""Typed errors. Every error message says what was wrong and what is allowed or what to do."""


class GillError(Exception):
    """Base class of the errors this library raises on purpose."""


class InputError(GillError, ValueError):
    """A request, prompt, image or option is invalid; the message says what is allowed."""


class ConfigError(GillError):
    """A server or model setting (a limit, a config parameter) is invalid; the message names it and what is allowed."""


class CheckpointError(GillError):
    """A checkpoint directory or file is missing, malformed, or unsafe to load."""


class UnsafeFileError(CheckpointError):
    """A file would need arbitrary code execution to load (for example a pickle that calls a function)."""


class DownloadError(GillError):
    """A download failed or its content did not match the pinned sha256."""
