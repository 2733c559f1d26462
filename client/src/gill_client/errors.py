"""Typed errors: each carries the server's (or the transport's) status code and message.

Every failure a call can raise is a :class:`GillClientError`; catch a subclass to handle one code. The codes
are the gRPC status names, which ``gill.v1.ErrorCode`` mirrors (``ERROR_CODE_INVALID_ARGUMENT`` arrives as
:class:`InvalidArgument`).
"""

from __future__ import annotations

from typing import ClassVar


class GillClientError(Exception):
    """A failed call. ``code`` is the status name (``"INVALID_ARGUMENT"`` ...), ``message`` says what went wrong
    and what to do, ``request_id`` names the turn in the server's logs (None before a request was sent)."""

    code: ClassVar[str] = "UNKNOWN"

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        """Returns ``"CODE: message"``."""
        return f"{self.code}: {self.message}"


class InvalidArgument(GillClientError):
    """The request was rejected as invalid (the message says which field and what is allowed)."""

    code = "INVALID_ARGUMENT"


class ResourceExhausted(GillClientError):
    """The server is out of capacity for this request (queue full, too large); retry later or send less."""

    code = "RESOURCE_EXHAUSTED"


class Cancelled(GillClientError):
    """The turn was cancelled (by this client, or by the server shutting down)."""

    code = "CANCELLED"


class Unavailable(GillClientError):
    """The server could not be reached or is not serving; retried automatically before the first event."""

    code = "UNAVAILABLE"


class Internal(GillClientError):
    """The server failed while serving the turn; its log has the details under the request id."""

    code = "INTERNAL"


class DeadlineExceeded(GillClientError):
    """The turn did not finish within the call's deadline; the server-side request was cancelled."""

    code = "DEADLINE_EXCEEDED"


class Unauthenticated(GillClientError):
    """The server requires an API key and none, or the wrong one, was sent."""

    code = "UNAUTHENTICATED"


class NotFound(GillClientError):
    """The server does not serve the requested model."""

    code = "NOT_FOUND"


class Unknown(GillClientError):
    """A status this client does not know; ``message`` carries the server's text."""

    code = "UNKNOWN"


_BY_CODE: dict[str, type[GillClientError]] = {
    cls.code: cls
    for cls in (InvalidArgument, ResourceExhausted, Cancelled, Unavailable, Internal, DeadlineExceeded,
                Unauthenticated, NotFound, Unknown)
}


def error_for(code: str, message: str, request_id: str | None = None) -> GillClientError:
    """Returns the :class:`GillClientError` subclass instance for status ``code`` (a gRPC status name, or a
    ``gill.v1.ErrorCode`` name with or without its ``ERROR_CODE_`` prefix); :class:`Unknown` for any other."""
    name = code.upper().removeprefix("ERROR_CODE_")
    return _BY_CODE.get(name, Unknown)(message, request_id)
