"""The asyncio client: :class:`AsyncGillClient` and the :class:`AsyncChatStream` of one turn."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gill_client import _transport as transport
from gill_client.conversation import AsyncConversation
from gill_client.errors import Cancelled, Unavailable
from gill_client.events import Event
from gill_client.messages import Messages
from gill_client.options import ChatOptions, RetryPolicy
from gill_client.reply import Reply

log = logging.getLogger("gill_client")
_UNSET: Any = object()


class AsyncChatStream(transport.StreamBase):
    """One turn in flight. ``async for`` it (once) for typed events; cancelling the task, :meth:`cancel`,
    leaving an ``async with`` block, or leaving the loop early (once the stream is garbage-collected) cancels
    the request on the server. Failures raise :class:`~gill_client.errors.GillClientError` subclasses."""

    def __init__(self, spec: transport.TurnSpec) -> None:
        super().__init__(spec)
        self._woken = asyncio.Event()

    def __aiter__(self) -> AsyncIterator[Event]:
        """Yields the turn's events until ``Done`` (inclusive); raises the typed error of a failed turn."""
        self._begin()
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        turn = self._turn
        try:
            while True:
                self._call = call = self._new_call()
                if turn.cancelled:
                    call.cancel()
                try:
                    finished = False
                    async for response in self._responses(call):
                        if finished:
                            continue  # after the final flag: read to the end so the call ends by itself
                        event, finished = turn.event(response)
                        if event is not None:
                            yield event
                    turn.call_ended()  # raises a held UNAVAILABLE (retried below) or a stream cut short
                    yield self._finish()  # the call is over: leaving the loop now cancels nothing
                    return
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise  # this task is being cancelled: let it end; the finally below cancels the call
                    raise Cancelled("cancelled by the client", turn.request_id) from None
                except (grpc.RpcError, Unavailable) as error:
                    mapped, wait = turn.failure(error)
                    if wait is None:
                        raise mapped from None
                    log.warning("turn %s: %s; retry %d of %d in %.2f s", turn.request_id, mapped.message,
                                turn.attempt, turn.retry.attempts - 1, wait)
                    try:
                        await asyncio.wait_for(self._woken.wait(), wait)
                        raise turn.failure(error)[0] from None
                    except TimeoutError:
                        pass
        finally:
            self.cancel()

    async def _responses(self, call: Any) -> AsyncIterator[Any]:
        """The call's responses; raises the idle error (and cancels the call) when the server stays silent past
        the idle timeout."""
        turn = self._turn
        responses = call.__aiter__()
        while True:
            try:
                yield await asyncio.wait_for(responses.__anext__(), turn.idle_timeout)
            except StopAsyncIteration:
                return
            except TimeoutError:
                turn.idle_expired = True
                call.cancel()
                raise turn.idle_error() from None

    def cancel(self) -> None:
        """Cancel the turn on the server (a no-op once it ended)."""
        if self._turn.complete:
            return
        self._turn.cancelled = True
        self._woken.set()
        if self._call is not None:
            self._call.cancel()

    async def collect(self) -> Reply:
        """Consume the whole stream; returns the :class:`Reply` (text, images in order, ``Done``)."""
        async for _ in self:
            pass
        return self._turn.builder.reply()

    async def __aenter__(self) -> AsyncChatStream:
        """Returns the stream; the block's end cancels it if it is still running."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncGillClient(transport.ClientBase):
    """An asyncio client of a GILL Triton server over one gRPC channel; turns may run concurrently.

    Takes the same arguments as :class:`~gill_client.GillClient`. Create it inside the running event loop,
    and ``await client.close()`` (or use ``async with``).
    """

    def __init__(self, url: str = "localhost:8001", *, api_key: str | None = None, tls: bool | transport.TLS = False,
                 model: str = transport.DEFAULT_MODEL, timeout: float | None = transport.DEFAULT_TIMEOUT_S,
                 retry: RetryPolicy | None = None, options: ChatOptions | None = None,
                 api_key_header: str = transport.API_KEY_HEADER,
                 idle_timeout: float | None = transport.DEFAULT_IDLE_TIMEOUT_S) -> None:
        super().__init__(url, api_key, tls, model, timeout, retry, options, api_key_header, idle_timeout)
        self._channel = self._open(grpc.aio)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    def chat(self, messages: Messages, options: ChatOptions | None = None, *, timeout: float | None = _UNSET,
             request_id: str | None = None) -> AsyncChatStream:
        """Start a turn; returns its :class:`AsyncChatStream` (``async for`` it for events). Arguments as
        :meth:`gill_client.GillClient.chat`."""
        return self._chat(messages, options, self.timeout if timeout is _UNSET else timeout, request_id, None)

    def _chat(self, messages: Messages, options: ChatOptions | None, timeout: float | None, request_id: str | None,
              on_done: Callable[[Reply], None] | None) -> AsyncChatStream:
        return AsyncChatStream(self._spec(self._stub, messages, options, timeout, request_id, on_done))

    def conversation(self, options: ChatOptions | None = None) -> AsyncConversation:
        """Returns an :class:`~gill_client.AsyncConversation` that keeps the history across turns."""
        return AsyncConversation(self, options)

    async def live(self, timeout: float = 5.0) -> bool:
        """Returns whether the server answers its liveness check (False when it cannot be reached)."""
        async def check() -> bool:
            response = await self._stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=timeout,
                                                   metadata=self._headers)
            return bool(response.live)

        return await self._health(check)

    async def ready(self, timeout: float = 5.0) -> bool:
        """Returns whether the server and its dialogue model are ready for turns (False when unreachable)."""
        async def check() -> bool:
            server = await self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout,
                                                  metadata=self._headers)
            model = await self._stub.ModelReady(service_pb2.ModelReadyRequest(name=self.model), timeout=timeout,
                                                metadata=self._headers)
            return bool(server.ready and model.ready)

        return await self._health(check)

    async def wait_until_ready(self, timeout: float = 300.0, interval: float = 0.5) -> None:
        """Wait until :meth:`ready`; raises :class:`~gill_client.errors.Unavailable` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not await self.ready(timeout=min(5.0, interval * 4)):
            if time.monotonic() >= deadline:
                raise Unavailable(f"the GILL server at {self.target} was not ready within {timeout:g} s")
            await asyncio.sleep(interval)

    async def _health(self, check: Callable[[], Awaitable[bool]]) -> bool:
        try:
            return await check()
        except grpc.RpcError as error:
            mapped = transport.rpc_error(error, self.target)
            if type(mapped) is Unavailable or mapped.code in ("DEADLINE_EXCEEDED", "NOT_FOUND"):
                return False
            raise mapped from None

    async def close(self) -> None:
        """Close the channel; turns in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncGillClient:
        """Returns the client; the block's end closes it."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
