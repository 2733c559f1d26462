"""What the sync and asyncio clients share: addresses, TLS, headers, the wire encoding of a turn on Triton's
``ModelStreamInfer``, status mapping, and the per-turn retry and deadline bookkeeping.

A turn is one bidirectional ``ModelStreamInfer`` call carrying one request, so cancelling the call cancels
exactly that request on the server (Triton then flags it cancelled and the ``gill`` model stops). The
tritonclient high-level stream API keeps one stream per client and, in asyncio, cannot ask for the final
flag; the generated service stubs over one shared channel give per-call deadlines, headers and cancel.
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from tritonclient.grpc import service_pb2

from gill_client.errors import (
    Cancelled,
    DeadlineExceeded,
    GillClientError,
    Internal,
    NotFound,
    Unauthenticated,
    Unavailable,
    error_for,
)
from gill_client.events import Done, Event, from_proto
from gill_client.messages import Messages, build_request
from gill_client.options import ChatOptions, RetryPolicy
from gill_client.reply import Reply, ReplyBuilder
from gill_client.v1 import dialogue_pb2 as pb

DEFAULT_MODEL = "gill"
DEFAULT_TIMEOUT_S = 600.0
# A turn that hears nothing (no event, no heartbeat) for this long is lost: a server sends a heartbeat every 5 s
# of quiet, and Triton leaves a stream open forever when the model serving it dies.
DEFAULT_IDLE_TIMEOUT_S = 30.0
# Triton's restricted-protocol header for the key `gill serve --api-key` sets (Triton prefixes gRPC keys).
API_KEY_HEADER = "triton-grpc-protocol-x-api-key"
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # a request with images, or a turn's event with a PNG, fits easily
_STREAM_METHOD_HINT = "is this the server's gRPC port (8001 by default)?"


@dataclass(frozen=True)
class TLS:
    """TLS settings: ``root_certificates`` (PEM) to trust instead of the system's, ``private_key`` and
    ``certificate_chain`` (PEM) for mutual TLS, ``server_name`` to expect instead of the URL's host."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(cls, ca: str | Path | None = None, key: str | Path | None = None,
                   cert: str | Path | None = None, server_name: str | None = None) -> TLS:
        """Returns TLS settings read from PEM files (any of them may be None)."""

        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return cls(read(ca), read(key), read(cert), server_name)


def parse_url(url: str, tls: bool | TLS) -> tuple[str, TLS | None]:
    """Returns the gRPC target (``host:port``) and TLS settings (None for plaintext) of ``url``: ``host:port``
    or ``grpc://host:port`` is plaintext unless ``tls`` is set, ``grpcs://host:port`` is TLS. Raises ValueError
    for other schemes (an ``http://`` URL is the HTTP port, not gRPC)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if scheme not in ("", "grpc", "grpcs"):
        raise ValueError(f"{url!r}: use host:port, grpc://host:port or grpcs://host:port (the gRPC port, 8001 by "
                         f"default; {scheme}:// is not gRPC)")
    target = rest.rstrip("/")
    if not target or "/" in target:
        raise ValueError(f"{url!r}: expected host:port")
    if ":" not in target.rsplit("]", 1)[-1]:
        target += ":8001"
    settings = tls if isinstance(tls, TLS) else (TLS() if tls or scheme == "grpcs" else None)
    return target, settings


def channel_options(tls: TLS | None) -> list[tuple[str, Any]]:
    """Returns the channel options: large messages, quick reconnects (the retry policy paces attempts, not
    gRPC's own one-second-and-up reconnect backoff)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        # No client keepalive pings: Triton's default policy answers pings more often than every 5 minutes
        # with GOAWAY "too_many_pings", which would drop every call on the channel.
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


def credentials(tls: TLS) -> grpc.ChannelCredentials:
    """Returns the channel credentials of ``tls``."""
    return grpc.ssl_channel_credentials(tls.root_certificates, tls.private_key, tls.certificate_chain)


def metadata(api_key: str | None, header: str) -> tuple[tuple[str, str], ...]:
    """Returns the call headers: the API key when one is set."""
    return ((header, api_key),) if api_key else ()


def infer_request(model: str, chat: pb.ChatRequest) -> service_pb2.ModelInferRequest:
    """Returns the Triton request of one turn: the serialized ``ChatRequest`` as the one-element BYTES input
    ``REQUEST`` (Triton's BYTES wire form: 4-byte little-endian length, then the bytes), asking for the
    empty final response so a stream that ends without ``Done`` is noticed."""
    data = chat.SerializeToString()
    request = service_pb2.ModelInferRequest(
        model_name=model,
        id=chat.request_id,
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(name="REQUEST", datatype="BYTES", shape=[1])],
        raw_input_contents=[struct.pack("<I", len(data)) + data],
    )
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


def chat_event(response: Any, request_id: str) -> tuple[pb.ChatEvent | None, bool]:
    """Returns the ``ChatEvent`` in one ``ModelStreamInferResponse`` (None for the empty final one) and whether
    it is the request's final response. Raises a typed error for a Triton error response."""
    if response.error_message:
        raise _triton_error(response.error_message, request_id)
    infer = response.infer_response
    final = bool(infer.parameters["triton_final_response"].bool_param) if "triton_final_response" in \
        infer.parameters else False
    if not infer.raw_output_contents:
        return None, final
    raw = infer.raw_output_contents[0]
    if len(raw) < 4 or struct.unpack_from("<I", raw)[0] > len(raw) - 4:
        # Seen when the server's dialogue model died while sending: the turn is lost, and the next one is served
        # once the model is back.
        raise Internal(f"malformed event from the server ({len(raw)} bytes): the turn was lost, for example because "
                       "the model serving it died; retry it", request_id)
    (length,) = struct.unpack_from("<I", raw)
    return pb.ChatEvent.FromString(raw[4:4 + length]), final


def _triton_error(message: str, request_id: str | None) -> GillClientError:
    if "unknown model" in message or "is not found" in message:
        return NotFound(f"{message} (is this a GILL server? the dialogue model is 'gill')", request_id)
    if "is not healthy" in message:  # the model's backend process died or hangs; gill serve reloads it
        return Unavailable(f"{message} (the server reloads a model whose process died; retry in a few seconds)",
                           request_id)
    return Internal(message, request_id)


def rpc_error(error: grpc.RpcError, target: str, request_id: str | None = None,
              timeout: float | None = None) -> GillClientError:
    """Returns the typed error of a failed call; the message says what to do where there is something to do."""
    # The asyncio stack's errors (grpc.aio.AioRpcError) carry the same code and details but are not grpc.Call.
    call = error if isinstance(error, (grpc.Call, grpc.aio.AioRpcError)) else None
    code = call.code() if call is not None else None
    details = (call.details() if call is not None else None) or str(error)
    if code == grpc.StatusCode.UNAVAILABLE and "restricted" in details:
        # Triton answers a missing or wrong restricted-protocol header with UNAVAILABLE; it is not transient.
        return Unauthenticated(f"the server at {target} requires an API key: pass api_key= (or --api-key); "
                               f"the server said: {details}", request_id)
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"cannot reach the GILL server at {target}: {details} "
                           f"(is it running? {_STREAM_METHOD_HINT})", request_id)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        limit = f" of {timeout:g} s" if timeout is not None else ""
        return DeadlineExceeded(f"the turn did not finish within its deadline{limit}; it was cancelled on the "
                                f"server (raise timeout= for long generations)", request_id)
    if code == grpc.StatusCode.CANCELLED:
        return Cancelled(f"the call was cancelled: {details}", request_id)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return NotFound(f"{target} does not serve Triton's gRPC inference API ({details}); {_STREAM_METHOD_HINT}",
                        request_id)
    return error_for(code.name if code is not None else "UNKNOWN", details, request_id)


class Turn:
    """The bookkeeping of one turn over its attempts: deadline, retries, events received, the reply so far."""

    def __init__(self, target: str, request_id: str, timeout: float | None, retry: RetryPolicy,
                 idle_timeout: float | None = None) -> None:
        self.target = target
        self.request_id = request_id
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.heard = time.monotonic()  # when the last response (an event or a heartbeat) arrived
        self.idle_expired = False
        self.retry = retry
        self.deadline = time.monotonic() + timeout if timeout is not None else None
        self.attempt = 0
        self.received = False
        self.cancelled = False
        self.complete = False  # the call ended by itself after the final flag: nothing left to cancel
        self.done: Done | None = None
        self.held: Unavailable | None = None  # the server's in-band UNAVAILABLE, before any event
        self.builder = ReplyBuilder()

    def remaining(self) -> float | None:
        """Returns the seconds left until the deadline (None without one); raises DeadlineExceeded at zero."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"the turn did not finish within its deadline of {self.timeout:g} s",
                                   self.request_id)
        return left

    def event(self, response: Any) -> tuple[Event | None, bool]:
        """Returns the typed event of one response (None if it carries none, and for ``Done``, which is held
        in :attr:`done`) and whether the turn is over: ``Done`` seen and the request's final flag arrived, so
        the server has closed the request itself and nothing is cancelled after a finished turn. Raises the
        server's typed error, or Internal if the request ends without ``Done``."""
        self.heard = time.monotonic()
        message, final = chat_event(response, self.request_id)
        if self.done is not None or self.held is not None:
            return None, final
        try:
            event = from_proto(message, self.request_id) if message is not None else None
        except Unavailable as error:
            if not self._retryable(error):
                raise
            self.held = error  # raised once this attempt's stream has ended, then retried
            return None, final
        if event is not None:
            self.received = True
            self.builder.add(event)
        if isinstance(event, Done):
            self.done = event
            return None, final
        if final:
            raise Internal("the server ended the turn without a Done event; see its log", self.request_id)
        return event, False

    def call_ended(self) -> None:
        """The attempt's stream ended by itself: marks the turn complete after ``Done``; else raises the held
        in-band UNAVAILABLE (to be retried) or Internal for a stream that closed before the turn ended."""
        if self.held is not None:
            error, self.held = self.held, None
            raise error
        if self.done is None:
            raise Internal("the server closed the stream before the turn ended; see its log", self.request_id)
        self.complete = True

    def idle(self) -> bool:
        """Whether the server has been silent for longer than the idle timeout (the turn is then lost)."""
        return self.idle_timeout is not None and time.monotonic() - self.heard > self.idle_timeout

    def idle_error(self) -> Unavailable:
        return Unavailable(f"no response from the server for {self.idle_timeout:g} s (not even a heartbeat): the "
                           "turn was lost, for example because the model serving it died; retry it",
                           self.request_id)

    def _retryable(self, error: GillClientError) -> bool:
        return type(error) is Unavailable and not self.received and self.attempt + 1 < self.retry.attempts

    def failure(self, error: grpc.RpcError | GillClientError) -> tuple[GillClientError, float | None]:
        """Returns the typed error of a failed attempt and the seconds to wait before retrying it, or None when
        it must not be retried: only UNAVAILABLE (the channel's, or the server's error event) before the first
        event, with attempts and time left."""
        if self.idle_expired:
            return self.idle_error(), None
        if self.cancelled:
            return Cancelled("cancelled by the client", self.request_id), None
        if isinstance(error, GillClientError):
            mapped = error
        else:
            mapped = rpc_error(error, self.target, self.request_id, self.timeout)
        if not self._retryable(mapped):
            return mapped, None
        wait = self.retry.backoff(self.attempt + 1)
        if self.deadline is not None and time.monotonic() + wait >= self.deadline:
            return mapped, None
        self.attempt += 1
        return mapped, wait


def call_options(turn: Turn, headers: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Returns the keyword arguments of one ``ModelStreamInfer`` attempt: the time left, and the headers."""
    return {"timeout": turn.remaining(), "metadata": tuple(headers)}


class ClientBase:
    """What the sync and asyncio clients share: the address, TLS, headers, per-turn defaults, and how a turn's
    request is built (see :class:`~gill_client.GillClient` for the arguments)."""

    def __init__(self, url: str, api_key: str | None, tls: bool | TLS, model: str, timeout: float | None,
                 retry: RetryPolicy | None, options: ChatOptions | None, api_key_header: str,
                 idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT_S) -> None:
        self.target, self._tls = parse_url(url, tls)
        self.model, self.timeout, self.idle_timeout = model, timeout, idle_timeout
        self.retry = retry or RetryPolicy()
        self.options = options or ChatOptions()
        self._headers = metadata(api_key, api_key_header)

    def _open(self, grpc_module: Any) -> Any:
        """Returns a channel made by ``grpc`` or ``grpc.aio`` (secure when TLS is set)."""
        options = channel_options(self._tls)
        if self._tls is not None:
            return grpc_module.secure_channel(self.target, credentials(self._tls), options)
        return grpc_module.insecure_channel(self.target, options)

    def _spec(self, stub: Any, messages: Messages, options: ChatOptions | None, timeout: float | None,
              request_id: str | None, on_done: Callable[[Reply], None] | None) -> TurnSpec:
        """Returns everything a stream needs to run one turn."""
        chat = build_request(messages, self.options.merged(options), request_id or uuid.uuid4().hex)
        return TurnSpec(stub, infer_request(self.model, chat), self._headers,
                        Turn(self.target, chat.request_id, timeout, self.retry, self.idle_timeout), on_done)


@dataclass(frozen=True)
class TurnSpec:
    """One turn, ready to send: the stub to call, the Triton request, headers, bookkeeping, and a callback for
    the finished reply (conversations use it)."""

    stub: Any
    request: Any
    headers: tuple[tuple[str, str], ...]
    turn: Turn
    on_done: Callable[[Reply], None] | None


class StreamBase:
    """What the sync and asyncio streams share: their turn, and iterating only once."""

    def __init__(self, spec: TurnSpec) -> None:
        self.request_id = spec.turn.request_id
        self._spec = spec
        self._turn = spec.turn
        self._call: Any = None
        self._started = False

    def _begin(self) -> None:
        if self._started:
            raise RuntimeError("a chat stream can be iterated once; call chat() again for another turn")
        self._started = True

    def _new_call(self) -> Any:
        spec = self._spec
        self._turn.heard = time.monotonic()
        return spec.stub.ModelStreamInfer(iter((spec.request,)), **call_options(self._turn, spec.headers))

    def _finish(self) -> Done:
        """The turn is over: record the reply (conversations) and return the ``Done`` to yield last."""
        if self._spec.on_done is not None:
            self._spec.on_done(self._turn.builder.reply())
        assert self._turn.done is not None
        return self._turn.done
