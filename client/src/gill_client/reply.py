"""A finished turn: its text and images in the order they streamed, and the ``Done`` event."""

from __future__ import annotations

from dataclasses import dataclass

from gill_client.events import Done, Event, ImageEvent, TextDelta
from gill_client.messages import Message, Part, assistant


@dataclass(frozen=True)
class Reply:
    """What the assistant answered: ``text`` (the whole generated text), ``images`` shown, ``parts`` (text
    segments and images interleaved as they streamed) and ``done`` (token counts, stop reason, timings)."""

    text: str
    images: tuple[ImageEvent, ...]
    parts: tuple[str | ImageEvent, ...]
    done: Done

    def as_message(self) -> Message:
        """Returns the reply as an assistant :class:`Message` (stripped text segments and the images, in order;
        a retrieved image keeps its corpus id, so it is not retrieved again) for the next turn's history."""
        parts: list[Part] = []
        for part in self.parts:
            if isinstance(part, ImageEvent):
                parts.append(part)
            elif part.strip():
                parts.append(part.strip())
        return assistant(*parts) if parts else assistant(self.text.strip() or " ")


class ReplyBuilder:
    """Collects a turn's events; :meth:`reply` once ``Done`` arrived."""

    def __init__(self) -> None:
        self._parts: list[str | ImageEvent] = []
        self._text: list[str] = []
        self.done: Done | None = None

    def add(self, event: Event) -> None:
        """Record one event (previews are not part of the reply)."""
        if isinstance(event, TextDelta):
            self._text.append(event.text)
        elif isinstance(event, ImageEvent):
            self._flush()
            self._parts.append(event)
        elif isinstance(event, Done):
            self._flush()
            self.done = event

    def _flush(self) -> None:
        if self._text:
            self._parts.append("".join(self._text))
            self._text = []

    def reply(self) -> Reply:
        """Returns the finished :class:`Reply`; raises RuntimeError before ``Done``."""
        if self.done is None:
            raise RuntimeError("the turn has not finished (no Done event yet)")
        images = tuple(p for p in self._parts if isinstance(p, ImageEvent))
        return Reply(self.done.text, images, tuple(self._parts), self.done)
