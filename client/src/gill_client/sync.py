"""The blocking client: :class:`GillClient` and the :class:`ChatStream` of one turn."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gill_client import _transport as transport
from gill_client.conversation import Conversation
from gill_client.errors import Unavailable
from gill_client.events import Event
from gill_client.messages import Messages
from gill_client.options import ChatOptions, RetryPolicy
from gill_client.reply import Reply

log = logging.getLogger("gill_client")
_UNSET: Any = object()


class ChatStream(transport.StreamBase):
    """One turn in flight. Iterate it (once) for typed events; leaving the loop early, :meth:`cancel` (from any
    thread) or leaving a ``with`` block cancels the request on the server. Failures raise
    :class:`~gill_client.errors.GillClientError` subclasses."""

    def __init__(self, spec: transport.TurnSpec) -> None:
        super().__init__(spec)
        self._lock = threading.Lock()
        self._woken = threading.Event()

    def __iter__(self) -> Iterator[Event]:
        """Yields the turn's events until ``Done`` (inclusive); raises the typed error of a failed turn."""
        self._begin()
        return self._events()

    def _events(self) -> Iterator[Event]:
        turn = self._turn
        try:
            while True:
                call = self._new_call()
                with self._lock:
                    self._call = call
                    if turn.cancelled:
                        call.cancel()
                if turn.idle_timeout is not None:
                    threading.Thread(target=self._watch_idle, args=(call,), daemon=True).start()
                try:
                    finished = False
                    for response in call:
                        if finished:
                            continue  # after the final flag: read to the end so the call ends by itself
                        event, finished = turn.event(response)
                        if event is not None:
                            yield event
                    turn.call_ended()  # raises a held UNAVAILABLE (retried below) or a stream cut short
                    yield self._finish()  # the call is over: leaving the loop now cancels nothing
                    return
                except (grpc.RpcError, Unavailable) as error:
                    mapped, wait = turn.failure(error)
                    if wait is None:
                        raise mapped from None
                    log.warning("turn %s: %s; retry %d of %d in %.2f s", turn.request_id, mapped.message,
                                turn.attempt, turn.retry.attempts - 1, wait)
                    if self._woken.wait(wait):
                        raise turn.failure(error)[0] from None
        finally:
            self.cancel()

    def _watch_idle(self, call: Any) -> None:
        """Cancel ``call`` when the server stays silent past the idle timeout; ends with the call."""
        turn = self._turn
        assert turn.idle_timeout is not None
        while not self._woken.wait(min(1.0, turn.idle_timeout / 4)):
            with self._lock:
                if self._call is not call or turn.complete:
                    return
                if turn.idle():
                    turn.idle_expired = True
                    call.cancel()
                    return

    def cancel(self) -> None:
        """Cancel the turn on the server (a no-op once it ended)."""
        with self._lock:
            if self._turn.complete:
                return
            self._turn.cancelled = True
            call = self._call
        self._woken.set()
        if call is not None:
            call.cancel()

    def collect(self) -> Reply:
        """Consume the whole stream; returns the :class:`Reply` (text, images in order, ``Done``)."""
        for _ in self:
            pass
        return self._turn.builder.reply()

    def __enter__(self) -> ChatStream:
        """Returns the stream; the block's end cancels it if it is still running."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class GillClient(transport.ClientBase):
    """A blocking client of a GILL Triton server over one gRPC channel; thread-safe, turns may overlap.

    ``url`` is ``host:port`` (the gRPC port) or ``grpcs://host:port`` for TLS; ``tls`` (True or a
    :class:`~gill_client.TLS`) forces TLS; ``api_key`` is sent with every call in ``api_key_header``;
    ``timeout`` is each turn's default deadline in seconds (None: none); ``retry`` paces retries of turns that
    could not start (UNAVAILABLE before the first event); ``options`` are every turn's defaults;
    ``idle_timeout`` ends a turn that heard nothing, not even the server's heartbeat, for that many seconds
    (None: wait for the deadline). Close it, or use it as a context manager.
    """

    def __init__(self, url: str = "localhost:8001", *, api_key: str | None = None, tls: bool | transport.TLS = False,
                 model: str = transport.DEFAULT_MODEL, timeout: float | None = transport.DEFAULT_TIMEOUT_S,
                 retry: RetryPolicy | None = None, options: ChatOptions | None = None,
                 api_key_header: str = transport.API_KEY_HEADER,
                 idle_timeout: float | None = transport.DEFAULT_IDLE_TIMEOUT_S) -> None:
        super().__init__(url, api_key, tls, model, timeout, retry, options, api_key_header, idle_timeout)
        self._channel = self._open(grpc)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    def chat(self, messages: Messages, options: ChatOptions | None = None, *, timeout: float | None = _UNSET,
             request_id: str | None = None) -> ChatStream:
        """Start a turn; returns its :class:`ChatStream` (iterate it for events).

        ``messages`` is the conversation ending with a user message: a ``str`` (one user text), a
        :class:`~gill_client.Message` or a list of them (see :func:`~gill_client.user`). ``options`` override
        the client's. ``timeout`` overrides the client's deadline for this turn.
        """
        return self._chat(messages, options, self.timeout if timeout is _UNSET else timeout, request_id, None)

    def _chat(self, messages: Messages, options: ChatOptions | None, timeout: float | None, request_id: str | None,
              on_done: Callable[[Reply], None] | None) -> ChatStream:
        return ChatStream(self._spec(self._stub, messages, options, timeout, request_id, on_done))

    def conversation(self, options: ChatOptions | None = None) -> Conversation:
        """Returns a :class:`~gill_client.Conversation` that keeps the history (text and images) across turns."""
        return Conversation(self, options)

    def live(self, timeout: float = 5.0) -> bool:
        """Returns whether the server answers its liveness check (False when it cannot be reached)."""
        return self._health(lambda: self._stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=timeout,
                                                          metadata=self._headers).live)

    def ready(self, timeout: float = 5.0) -> bool:
        """Returns whether the server and its dialogue model are ready for turns (False when unreachable)."""
        return self._health(lambda: self._stub.ServerReady(
            service_pb2.ServerReadyRequest(), timeout=timeout, metadata=self._headers).ready and self._stub.ModelReady(
            service_pb2.ModelReadyRequest(name=self.model), timeout=timeout, metadata=self._headers).ready)

    def wait_until_ready(self, timeout: float = 300.0, interval: float = 0.5) -> None:
        """Block until :meth:`ready`; raises :class:`~gill_client.errors.Unavailable` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not self.ready(timeout=min(5.0, interval * 4)):
            if time.monotonic() >= deadline:
                raise Unavailable(f"the GILL server at {self.target} was not ready within {timeout:g} s")
            time.sleep(interval)

    def _health(self, check: Callable[[], bool]) -> bool:
        try:
            return bool(check())
        except grpc.RpcError as error:
            mapped = transport.rpc_error(error, self.target)
            if type(mapped) in (Unavailable,) or mapped.code in ("DEADLINE_EXCEEDED", "NOT_FOUND"):
                return False
            raise mapped from None

    def close(self) -> None:
        """Close the channel; turns in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> GillClient:
        """Returns the client; the block's end closes it."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



