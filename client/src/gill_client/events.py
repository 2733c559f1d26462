"""The typed events of one dialogue turn, in stream order: text deltas, previews and images, then ``Done``.

A server-side failure is not an event: it is raised as a :mod:`gill_client.errors` exception.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from gill_client.errors import error_for
from gill_client.v1 import dialogue_pb2 as pb

ImageSource = Literal["retrieved", "generated", "unspecified"]
Decision = Literal["generate", "retrieve"]


def _decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


@dataclass(frozen=True)
class TextDelta:
    """New text since the previous delta; never splits a character."""

    text: str


@dataclass(frozen=True)
class ImageEvent:
    """The image shown for image request ``index`` of the turn.

    ``source`` says where it came from (``"retrieved"`` from the corpus, ``"generated"`` by diffusion), ``png``
    holds the PNG-encoded image, ``url`` and ``caption`` describe a retrieved one (None for a generated one).
    ``score`` is the retrieval score of a retrieved image, or the cosine of a generated image to the text's
    retrieval vector. ``decision`` and ``p_generate`` / ``p_retrieve`` are the decision head's choice and
    probabilities (None when the checkpoint has no decision head). ``corpus_id`` is a retrieved image's row in
    the corpus: an ``ImageEvent`` passed back as a message part carries it, so the server does not show that
    image again in the conversation.
    """

    index: int
    source: ImageSource
    png: bytes = field(repr=False)
    url: str | None = None
    caption: str | None = None
    score: float | None = None
    decision: Decision | None = None
    p_generate: float | None = None
    p_retrieve: float | None = None
    corpus_id: int | None = None

    def pil(self) -> Image.Image:
        """Returns the image decoded as a PIL image (RGB, as the server encoded it)."""
        return _decode(self.png)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the PNG bytes to ``path`` (parent folders are created); returns the path written."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.png)
        return target


@dataclass(frozen=True)
class Preview:
    """A low-resolution look at image ``index`` after denoising ``step`` of ``total_steps``."""

    index: int
    step: int
    total_steps: int
    png: bytes = field(repr=False)

    def pil(self) -> Image.Image:
        """Returns the preview decoded as a PIL image."""
        return _decode(self.png)


@dataclass(frozen=True)
class Notice:
    """Something about image request ``index`` that did not stop the turn. ``code`` is stable:
    ``"retrieval_failed"`` (no top hit's image could be loaded, e.g. dead corpus URLs) or
    ``"retrieval_unavailable"`` (the corpus backend is down); ``message`` says what happened and what the turn
    did instead (usually: generated the image)."""

    index: int
    code: str
    message: str


@dataclass(frozen=True)
class Done:
    """The turn ended: the whole ``text``, token counts, ``stop_reason`` (``"eos"``, ``"newline"``,
    ``"length"`` or ``"cancelled"``) and stage ``timings`` in seconds (``"total_s"``, ``"first_token_s"`` ...)."""

    text: str
    prompt_tokens: int
    generated_tokens: int
    stop_reason: str
    timings: Mapping[str, float] = field(default_factory=dict)


Event = TextDelta | ImageEvent | Preview | Notice | Done

_SOURCES: dict[int, ImageSource] = {pb.IMAGE_SOURCE_RETRIEVED: "retrieved", pb.IMAGE_SOURCE_GENERATED: "generated"}
_DECISIONS: dict[int, Decision] = {pb.DECISION_GENERATE: "generate", pb.DECISION_RETRIEVE: "retrieve"}


def from_proto(message: pb.ChatEvent, request_id: str | None = None) -> Event | None:
    """Returns the typed event of a wire ``ChatEvent``, or None for an event kind this client does not know
    (a newer server). Raises the matching :class:`~gill_client.errors.GillClientError` for an ``Error``."""
    kind = message.WhichOneof("event")
    if kind == "text":
        return TextDelta(message.text.text)
    if kind == "image":
        image = message.image
        return ImageEvent(
            index=image.index,
            source=_SOURCES.get(image.source, "unspecified"),
            png=image.png,
            url=image.url or None,
            caption=image.caption or None,
            score=image.score if image.HasField("score") else None,
            decision=_DECISIONS.get(image.decision),
            p_generate=image.p_generate if image.HasField("p_generate") else None,
            p_retrieve=image.p_retrieve if image.HasField("p_retrieve") else None,
            corpus_id=image.corpus_id if image.HasField("corpus_id") else None,
        )
    if kind == "preview":
        preview = message.preview
        return Preview(preview.index, preview.step, preview.total_steps, preview.png)
    if kind == "notice":
        return Notice(message.notice.index, message.notice.code, message.notice.message)
    if kind == "done":
        done = message.done
        return Done(done.text, done.prompt_tokens, done.generated_tokens, done.stop_reason, dict(done.timings))
    if kind == "error":
        code = pb.ErrorCode.Name(message.error.code) if message.error.code in pb.ErrorCode.values() else "UNKNOWN"
        raise error_for(code, message.error.message, request_id)
    return None
