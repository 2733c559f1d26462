"""Multi-turn dialogue: the history (user messages and the assistant's replies, images included) kept for you.

A turn joins the history only when it finished (``Done``): a failed or cancelled turn leaves it unchanged, so
sending again retries from the same point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gill_client.messages import Message, Part, user
from gill_client.options import ChatOptions
from gill_client.reply import Reply

if TYPE_CHECKING:
    from gill_client.aio import AsyncChatStream, AsyncGillClient
    from gill_client.sync import ChatStream, GillClient

_UNSET: Any = object()


class _History:
    def __init__(self, options: ChatOptions | None) -> None:
        self.options = options
        self.messages: list[Message] = []

    def _next(self, parts: tuple[Part, ...], options: ChatOptions | None) -> tuple[list[Message], Any, Any]:
        message = user(*parts)

        def remember(reply: Reply) -> None:
            self.messages.extend([message, reply.as_message()])

        merged = (self.options or ChatOptions()).merged(options)
        return [*self.messages, message], merged, remember

    def reset(self) -> None:
        """Forget the history."""
        self.messages.clear()


class Conversation(_History):
    """A dialogue over a :class:`~gill_client.GillClient`; ``messages`` is the history so far."""

    def __init__(self, client: GillClient, options: ChatOptions | None = None) -> None:
        super().__init__(options)
        self._client = client

    def send(self, *parts: Part, options: ChatOptions | None = None, timeout: float | None = _UNSET) -> ChatStream:
        """Start the next turn with a user message of ``parts`` (text and images); returns its stream. The turn
        and its reply join the history when the stream reaches ``Done``."""
        messages, merged, remember = self._next(parts, options)
        timeout = self._client.timeout if timeout is _UNSET else timeout
        return self._client._chat(messages, merged, timeout, None, remember)

    def ask(self, *parts: Part, options: ChatOptions | None = None, timeout: float | None = _UNSET) -> Reply:
        """Send a turn and wait for it; returns the :class:`~gill_client.Reply`."""
        return self.send(*parts, options=options, timeout=timeout).collect()


class AsyncConversation(_History):
    """A dialogue over an :class:`~gill_client.AsyncGillClient`; ``messages`` is the history so far."""

    def __init__(self, client: AsyncGillClient, options: ChatOptions | None = None) -> None:
        super().__init__(options)
        self._client = client

    def send(self, *parts: Part, options: ChatOptions | None = None,
             timeout: float | None = _UNSET) -> AsyncChatStream:
        """Start the next turn with a user message of ``parts``; returns its async stream. The turn and its
        reply join the history when the stream reaches ``Done``."""
        messages, merged, remember = self._next(parts, options)
        timeout = self._client.timeout if timeout is _UNSET else timeout
        return self._client._chat(messages, merged, timeout, None, remember)

    async def ask(self, *parts: Part, options: ChatOptions | None = None, timeout: float | None = _UNSET) -> Reply:
        """Send a turn and wait for it; returns the :class:`~gill_client.Reply`."""
        return await self.send(*parts, options=options, timeout=timeout).collect()
