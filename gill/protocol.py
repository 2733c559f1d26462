"""Conversions between the wire contract (``gill.v1.dialogue_pb2``) and the library's types.

The one module that knows both worlds: a server decodes a :class:`ChatRequest` with
:func:`request_from_bytes`, turns it into pipeline input with :func:`parts_from_request` and
:func:`options_from_request`, and sends each pipeline event as :func:`event_to_proto` (or a failure as
:func:`error_event`). Every invalid input raises :class:`~gill.errors.InputError` saying what is allowed.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from gill.errors import InputError
from gill.events import DiffusionPreview, Done, Event, ImageRequest, ImageResult, Notice, TextDelta
from gill.images import png_bytes
from gill.limits import Limits
from gill.options import GenerationOptions
from gill_client.v1 import dialogue_pb2 as pb

if TYPE_CHECKING:
    from gill.pipeline import Part

_ROLES = {pb.ROLE_USER: "ROLE_USER", pb.ROLE_ASSISTANT: "ROLE_ASSISTANT"}
# Options fields that shape the prompt (read by parts_from_request), not GenerationOptions fields.
PROMPT_OPTIONS = frozenset({"raw_text"})


def request_from_bytes(data: bytes | bytearray | memoryview, limits: Limits = Limits()) -> pb.ChatRequest:
    """Parse a serialized :class:`ChatRequest`; returns it with every message's role known and specified.

    Raises :class:`InputError` for more than ``limits.max_request_bytes``, bytes that do not decode (invalid
    UTF-8 in a string field included), and roles other than ``ROLE_USER`` / ``ROLE_ASSISTANT`` (proto3 keeps
    unknown enum numbers; they are rejected).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InputError(f"a request must be the serialized gill.v1.ChatRequest bytes, got {type(data).__name__}")
    limits.check("max_request_bytes", memoryview(data).nbytes, f"request is {memoryview(data).nbytes} bytes",
                 "send fewer or smaller images")
    request = pb.ChatRequest()
    try:
        request.ParseFromString(bytes(data))
    except DecodeError as error:
        raise InputError(f"request bytes are not a valid gill.v1.ChatRequest: not protobuf, truncated, or a string "
                         f"field (text, mime_type, request_id) that is not UTF-8 ({error})") from None
    for index, message in enumerate(request.messages):
        _check_role(index, message.role)
    return request


def parts_from_request(request: pb.ChatRequest, limits: Limits = Limits()) -> list[Part]:
    """Flatten the conversation into the pipeline's interleaved parts; returns ``str`` and ``bytes`` parts.

    In message order and part order: an image becomes its encoded ``bytes``; text of a user message becomes
    ``"Q: {text}\\nA:"`` and text of an assistant message ``" {text}\\n"`` (the reference's dialogue format),
    or, with ``options.raw_text`` set, every text part exactly as written (the reference's interleaved
    evaluation prompts: the caller writes the whole prompt). The last message must be the user's. Raises
    :class:`InputError` for an empty conversation, an empty message or part, an unspecified or unknown role,
    an image with no data or a non-image MIME type, and more messages, parts, images or characters of text
    than ``limits`` allow.
    """
    messages = request.messages
    if not messages:
        raise InputError("request has no messages: send at least one user message")
    limits.check("max_messages", len(messages), f"request has {len(messages)} messages")
    total_parts = sum(len(message.parts) for message in messages)
    limits.check("max_parts", total_parts, f"request has {total_parts} parts over all messages")
    total_images = sum(part.HasField("image") for message in messages for part in message.parts)
    limits.check("max_images_per_request", total_images, f"request has {total_images} images")
    total_chars = sum(len(part.text) for message in messages for part in message.parts)
    limits.check("max_text_chars", total_chars, f"request has {total_chars} characters of text",
                 "shorten the conversation")
    raw_text = request.HasField("options") and request.options.raw_text
    parts: list[Part] = []
    for m, message in enumerate(messages):
        _check_role(m, message.role)
        if not message.parts:
            raise InputError(f"message {m} has no parts: give it at least one text or image part")
        for p, part in enumerate(message.parts):
            kind = part.WhichOneof("kind")
            if kind == "image":
                image = part.image
                if not image.data:
                    raise InputError(f"message {m} part {p}: image has no data")
                if image.mime_type and not image.mime_type.startswith("image/"):
                    raise InputError(f"message {m} part {p}: mime_type {image.mime_type!r} is not an image type "
                                     f"(allowed: 'image/...' or empty to detect from the data)")
                parts.append(bytes(image.data))
            elif kind == "text":
                if raw_text:
                    parts.append(part.text)
                elif message.role == pb.ROLE_USER:
                    parts.append(f"Q: {part.text}\nA:")
                else:
                    parts.append(f" {part.text}\n")
            else:
                raise InputError(f"message {m} part {p} is empty: set its text or its image")
    if messages[-1].role != pb.ROLE_USER:
        raise InputError(f"the last message ({len(messages) - 1}) is from the assistant; "
                         f"a request must end with a user message")
    return parts


def shown_corpus_ids(request: pb.ChatRequest) -> frozenset[int]:
    """Returns the corpus rows of the images in the conversation that were retrieved earlier
    (``Image.corpus_id``): the turn does not retrieve them again."""
    return frozenset(part.image.corpus_id for message in request.messages for part in message.parts
                     if part.HasField("image") and part.image.HasField("corpus_id"))


def options_from_request(request: pb.ChatRequest, defaults: GenerationOptions | None = None,
                         limits: Limits = Limits()) -> GenerationOptions:
    """Returns ``defaults`` (or :class:`GenerationOptions` ``()``) with the fields the request set overriding them.

    Only fields present on the wire count (``HasField``), except :data:`PROMPT_OPTIONS` (``raw_text``), which
    :func:`parts_from_request` reads; float32 values are read back as their shortest
    decimal (``0.7``, not ``0.699999988``). Nonsensical values (NaN, negative ...) raise :class:`InputError`
    from :class:`GenerationOptions`' own validation, values over ``limits`` from :meth:`Limits.check_options`;
    a default over a limit is lowered to the limit.
    """
    defaults = limits.cap(defaults if defaults is not None else GenerationOptions())
    if not request.HasField("options"):
        return defaults
    overrides: dict[str, Any] = {}
    for field, value in request.options.ListFields():  # exactly the fields present (HasField) on the wire
        if field.name in PROMPT_OPTIONS:
            continue
        if field.type == FieldDescriptor.TYPE_FLOAT:
            value = float(str(np.float32(value)))
        overrides[field.name] = value
    options = dataclasses.replace(defaults, **overrides)  # runs GenerationOptions' validation
    limits.check_options(options)
    return options


def event_to_proto(event: Event) -> pb.ChatEvent | None:
    """Returns the :class:`ChatEvent` a pipeline event is sent as (images PNG-encoded), or None for
    :class:`~gill.events.ImageRequest`, which is internal and never sent."""
    if isinstance(event, TextDelta):
        return pb.ChatEvent(text=pb.TextDelta(text=event.text))
    if isinstance(event, ImageResult):
        image = pb.ImageEvent(
            index=event.index,
            source=pb.IMAGE_SOURCE_RETRIEVED if event.source == "retrieved" else pb.IMAGE_SOURCE_GENERATED,
            png=png_bytes(event.image),
            url=event.url or "",
            caption=event.caption or "",
            decision=pb.DECISION_RETRIEVE if event.decision == "ret" else pb.DECISION_GENERATE,
        )
        if event.score is not None:
            image.score = event.score
        if event.probabilities is not None:
            image.p_generate, image.p_retrieve = event.probabilities
        if event.corpus_id is not None:
            image.corpus_id = event.corpus_id
        return pb.ChatEvent(image=image)
    if isinstance(event, DiffusionPreview):
        return pb.ChatEvent(preview=pb.DiffusionPreview(index=event.index, step=event.step,
                                                        total_steps=event.total_steps, png=png_bytes(event.image)))
    if isinstance(event, Notice):
        return pb.ChatEvent(notice=pb.Notice(index=event.index, code=event.code, message=event.message))
    if isinstance(event, Done):
        return pb.ChatEvent(done=pb.Done(text=event.text, prompt_tokens=event.prompt_tokens,
                                         generated_tokens=event.generated_tokens, stop_reason=event.stop_reason,
                                         timings=event.timings))
    if isinstance(event, ImageRequest):
        return None
    raise TypeError(f"not a pipeline event: {type(event).__name__}")


def error_event(code: str, message: str) -> pb.ChatEvent:
    """Returns a :class:`ChatEvent` carrying an :class:`Error`.

    ``code`` names an :class:`ErrorCode` with or without its prefix, in any case: ``"INVALID_ARGUMENT"``,
    ``"invalid_argument"`` or ``"ERROR_CODE_INVALID_ARGUMENT"``. Raises ValueError for any other name.
    """
    name = code.strip().upper()
    if not name.startswith("ERROR_CODE_"):
        name = "ERROR_CODE_" + name
    if name not in pb.ErrorCode.keys() or name == "ERROR_CODE_UNSPECIFIED":
        allowed = [key.removeprefix("ERROR_CODE_") for key in pb.ErrorCode.keys() if key != "ERROR_CODE_UNSPECIFIED"]
        raise ValueError(f"unknown error code {code!r}; allowed: {allowed}")
    return pb.ChatEvent(error=pb.Error(code=pb.ErrorCode.Value(name), message=message))


def _check_role(index: int, role: int) -> None:
    if role in _ROLES:
        return
    if role == pb.ROLE_UNSPECIFIED:
        raise InputError(f"message {index} has no role: set ROLE_USER or ROLE_ASSISTANT")
    raise InputError(f"message {index} has unknown role {role} (allowed: ROLE_USER = {pb.ROLE_USER}, "
                     f"ROLE_ASSISTANT = {pb.ROLE_ASSISTANT})")
