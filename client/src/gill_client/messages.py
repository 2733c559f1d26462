"""Conversation messages and how they become a wire ``gill.v1.ChatRequest``.

A part is text (``str``) or an image: ``bytes`` of an encoded image, a path (``pathlib.Path`` or any
``os.PathLike``; a plain ``str`` is always text), a ``PIL.Image.Image`` (sent PNG-encoded), or an
:class:`~gill_client.ImageEvent` the server sent (its PNG, with its corpus id so it is not retrieved again).
"""

from __future__ import annotations

import io
import mimetypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

from PIL import Image

from gill_client.events import ImageEvent
from gill_client.options import ChatOptions
from gill_client.v1 import dialogue_pb2 as pb

ImageInput: TypeAlias = bytes | bytearray | memoryview | os.PathLike[str] | Image.Image | ImageEvent
Part: TypeAlias = str | ImageInput
Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class Message:
    """One message of the conversation: who wrote it and its text and image parts, in order."""

    role: Role
    parts: tuple[Part, ...]

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise ValueError(f"role must be 'user' or 'assistant', got {self.role!r}")
        if not self.parts:
            raise ValueError("a message needs at least one text or image part")
        for part in self.parts:
            if not isinstance(part, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image, ImageEvent)):
                raise TypeError(f"a part is text (str) or an image (bytes, a path, a PIL image, an ImageEvent), "
                                f"got {type(part).__name__}")


def user(*parts: Part) -> Message:
    """Returns a user message of ``parts`` (text and images, in order)."""
    return Message("user", parts)


def assistant(*parts: Part) -> Message:
    """Returns an assistant message of ``parts`` (earlier answers, for multi-turn context)."""
    return Message("assistant", parts)


Messages: TypeAlias = str | Message | Sequence[Message]


def as_messages(messages: Messages) -> list[Message]:
    """Returns ``messages`` as a list: a ``str`` is one user message of that text, a :class:`Message` a list
    of one. Raises ValueError for an empty conversation."""
    if isinstance(messages, str):
        result = [user(messages)]
    elif isinstance(messages, Message):
        result = [messages]
    else:
        result = list(messages)
    if not result:
        raise ValueError("a conversation needs at least one message")
    for message in result:
        if not isinstance(message, Message):
            raise TypeError(f"messages must be Message objects (see gill_client.user), got {type(message).__name__}")
    return result


def image_proto(image: ImageInput) -> pb.Image:
    """Returns the wire ``Image`` of an image part: file bytes with the MIME type its suffix suggests, bytes
    as given (the server detects the format), a PIL image PNG-encoded, an ``ImageEvent``'s PNG with its corpus
    id. Raises OSError for an unreadable path."""
    if isinstance(image, ImageEvent):
        wire = pb.Image(data=image.png, mime_type="image/png")
        if image.corpus_id is not None:
            wire.corpus_id = image.corpus_id
        return wire
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return pb.Image(data=buffer.getvalue(), mime_type="image/png")
    if isinstance(image, os.PathLike):
        path = Path(image)
        mime, _ = mimetypes.guess_type(path.name)
        return pb.Image(data=path.read_bytes(), mime_type=mime if mime and mime.startswith("image/") else "")
    return pb.Image(data=bytes(image))


def build_request(messages: Messages, options: ChatOptions | None = None, request_id: str = "") -> pb.ChatRequest:
    """Returns the ``gill.v1.ChatRequest`` of a conversation (which should end with a user message; the server
    says so if not) and its options."""
    request = pb.ChatRequest(request_id=request_id)
    for message in as_messages(messages):
        wire = request.messages.add(role=pb.ROLE_USER if message.role == "user" else pb.ROLE_ASSISTANT)
        for part in message.parts:
            if isinstance(part, str):
                wire.parts.add(text=part)
            else:
                wire.parts.add(image=image_proto(part))
    if options is not None:
        request.options.CopyFrom(options.to_proto())
    return request
